"""The jobs: what `--mode` runs, one module each.

- `train.py` (--mode=train): the training loop, its checkpoints, pictures and evaluations.
- `sample.py` (--mode=sample): pictures from a checkpoint's EMA, or text to image from a
  pipeline folder.
- `encode.py` (--mode=encode): a latent run's data set through its autoencoder, once.
- `export_ema.py` (--mode=export): the EMA weights as one file or a diffusers folder.
- `posthoc_ema.py` (--mode=posthoc_ema): EMAs of any length rebuilt from snapshots.

`--mode=eval` is `evaluation/evaluate.py`, one floor lower, because training evaluates too.
"""
