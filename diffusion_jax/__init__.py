"""diffusion_jax: denoising diffusion models in JAX/Flax, from one CPU to a pod.

The package is built in layers, lowest first. A module imports only from its own layer and
the layers below it (imports inside functions included), never in a circle;
tests/test_layers.py checks both and names any import that breaks them.

1. Math: `diffusion/` — pure functions of arrays: schedules, the forward process and the
   eps/x0/v conversions, losses, samplers, likelihood, the power-function EMA profiles and
   their post-hoc weights. Imports nothing of the package.
2. Config: `errors.py` — the errors that end a run with one line; `paths.py` — the one
   path layer for local folders and buckets (gs://), through which every file under the
   workdir and the data and weight files a config names are read and written;
   `config.py` — the base config every recipe starts from (its fields, defaults and
   comments) and its predicates; `validation.py` — whether a config can work, one line
   naming the field; `recipes.py` — the helpers the files in configs/ call (smoke, DDPM
   and improved-DDPM setups). Import the math (for the names of schedules and samplers).
3. Infrastructure: `parallel.py` (mesh, shardings, host <-> global arrays),
   `checkpointing/` (orbax), `export.py` (single-file weights), `metrics_io.py` (metric
   writers, progress, image grids). Import the config.
4. Parts: `models/` (U-Net, DiT, KL autoencoder, CLIP text encoder, layers, the prompt
   encoder, the denoiser trained with its text encoder; `models/convert/`, importers of
   diffusers/transformers weights, one file per family, and the torch-free reader of
   `.pt` / `.pth` files they and Inception use) and `data/` (sources, the input pipeline,
   the latent shard format) know nothing of each other. Above them in this layer:
   `objectives/` (diffusion | autoencoder: the model, its init inputs, batch shapes,
   step inputs, loss, picture and scores, chosen once),
   `training/state.py` (the TrainState and optimizer) and `training/step.py` (the pure,
   sharded train step, given an objective).
5. Generation and weights: `generation.py` — the jitted sample function, grid labels,
   drawing many samples, the sample grid, used by training's pictures, evaluation and sample
   mode; `weights.py` — which parameters a job uses (a checkpoint's EMA, an exported file,
   a post-hoc EMA, a pipeline folder, the autoencoder of a latent run), each read once.
6. Run setup: `run.py` — what every job builds from a config: mesh, schedule, objective,
   model, optimizer, abstract and restored state, the autoencoder of a latent run, keys.
7. Evaluation: `evaluation/` — Inception, the digits classifier, metrics, reference
   statistics, and the eval job (`evaluation/evaluate.py`). Never imports `training/`:
   the run setup hands it what it needs.
8. Jobs: `jobs/`, one module per --mode: `train.py`, `sample.py` (text-to-image
   included), `encode.py`, `export_ema.py` (--mode=export), `posthoc_ema.py` (EMAs of
   any length from snapshots); `preflight/`,
   the run config resolved once (`preflight.resolve`) and everything a job needs checked
   before anything compiles or is written; `tools/`,
   command-line programs other than the main one (`python -m diffusion_jax.tools.<name>`),
   which nothing imports.
9. Command line: `main.py` — flags, help, pre-flight, dispatch by --mode, exit statuses;
   `cli_args.py`, the command line's arguments checked into one-line errors. Only
   `__main__.py` (`python -m diffusion_jax`) imports main.
"""

__version__ = "0.1.0"
