"""--mode=eval: restore EMA parameters, score them, write eval/step_<N>.json.

Every checkpoint without a result is scored (or eval.checkpoint_step, or the steps training
hands over). What is scored is the objective's (`objectives.Objective.scores`): samples of
a diffusion model, scored here by the metrics of eval.metrics (digits_fd, FID, IS,
precision/recall, bits/dim), or an autoencoder's held-out reconstructions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import checkpointing, errors, metrics_io, parallel, paths
from diffusion_jax import config as config_lib
from diffusion_jax import diffusion as dm
from diffusion_jax.data import pipeline
from diffusion_jax.evaluation import digits_classifier, inception, metrics
from diffusion_jax.run import run_keys, setup_run
from diffusion_jax.weights import (
    current_posthoc_step,
    describe,
    is_rebuilt,
    job_params,
    posthoc_steps,
)

log = logging.getLogger(__name__)

METRICS = config_lib.EVAL_METRICS
INCEPTION_METRICS = config_lib.INCEPTION_METRICS


def eval_dir(workdir) -> Path:
    return paths.path(workdir) / "eval"


def digits_scores(config, images_uint8: np.ndarray) -> dict:
    """digits_fd: the Frechet distance between the digits classifier's features of the
    samples and of the held-out split; digits_confident: the fraction of samples the
    classifier assigns to one class with probability > 0.9 (legible digits)."""
    params = digits_classifier.load_params()
    real, _ = pipeline.load_in_memory(config, config.data.eval_split)
    real_feats, _ = digits_classifier.features_and_logits(params, real)
    fake_feats, fake_logits = digits_classifier.features_and_logits(
        params, metrics_io.from_uint8(images_uint8)
    )
    fd = metrics.frechet_distance(*metrics.statistics(fake_feats), *metrics.statistics(real_feats))
    confident = float((jax.nn.softmax(fake_logits).max(axis=1) > 0.9).mean())
    return {"digits_fd": fd, "digits_confident": confident}


def inception_scores(config, images_uint8: np.ndarray, mesh) -> dict:
    """FID against eval.reference_stats, Inception Score (10 splits) and improved
    precision/recall (k=3, against the reference file's images) with the FID InceptionV3."""
    e = config.eval
    wanted = [m for m in e.metrics if m in INCEPTION_METRICS]
    weights = e.inception_weights
    if not weights:
        raise errors.ConfigError(
            f"config.eval.inception_weights: needed for {wanted}; download "
            f"{inception.WEIGHTS_URL} and pass its path"
        )
    params = inception.load_params(weights)
    feats, logits = inception.fid_features_and_logits(params, images_uint8, mesh=mesh)
    out = {
        "inception_weights": Path(weights).name,
        "inception_weights_sha256": metrics.file_hash(weights),
    }
    if "is" in wanted:
        out["is"], out["is_std"] = metrics.inception_score(logits, num_splits=10)
    if "fid" in wanted or "precision" in wanted or "recall" in wanted:
        if not e.reference_stats:
            raise errors.ConfigError(
                "config.eval.reference_stats: needed for FID; make one with `python -m "
                "diffusion_jax.tools.reference_stats` or use guided-diffusion's batch"
            )
        reference = metrics.load_stats(e.reference_stats)
        out["reference_stats"] = Path(e.reference_stats).name
        out["reference_stats_sha256"] = metrics.file_hash(e.reference_stats)
        if "fid" in wanted:
            out["fid"] = metrics.frechet_distance(
                *metrics.statistics(feats), reference["mu"], reference["sigma"]
            )
        if "precision" in wanted or "recall" in wanted:
            real = metrics.reference_features(e.reference_stats, params, mesh)
            out["precision"], out["recall"] = metrics.precision_recall(real, feats, k=3)
    return out


def bits_per_dim(config, run, params, key) -> float:
    """Mean bits/dim of the full variational bound over eval.bpd_num_examples examples of
    data.eval_split (rounded up to whole batches of sampling.batch_size)."""
    f = config.diffusion
    batch = parallel.padded_batch(
        min(config.sampling.batch_size, config.eval.bpd_num_examples), run.mesh.size
    )
    batches = pipeline.create_iterator(
        config, run.mesh, split=config.data.eval_split, global_batch=batch, train=False
    )

    @jax.jit
    def bpd(params, x, labels, key):
        def model_fn(x, t, y):
            return run.model.apply({"params": params}, x, t, y, train=False)

        # The bound is defined on the 256-level grid the data came from.
        x = jnp.round((x + 1.0) * 127.5) / 127.5 - 1.0
        return dm.bits_per_dim(
            model_fn,
            run.sched,
            x,
            key,
            prediction=f.prediction,
            variance=f.variance,
            clip_denoised=True,
            labels=labels,
        )["bpd"]

    labels_used = config.model.class_conditional
    values = []
    for i in range(-(-config.eval.bpd_num_examples // batch)):
        b = next(batches)
        values.append(
            parallel.gather(
                bpd(
                    params,
                    b["image"],
                    b["label"] if labels_used else None,
                    jax.random.fold_in(key, i),
                )
            )
        )
    return float(np.concatenate(values).mean())


def metric_scores(config, run, images_uint8, params, key) -> dict:
    """The eval.metrics of generated images (uint8 (N, H, W, C)); bits/dim, a bound on the
    held-out data, takes the parameters instead of the images."""
    e = config.eval
    unknown = set(e.metrics) - set(METRICS)
    if unknown:
        raise errors.ConfigError(
            f"config.eval.metrics: unknown {sorted(unknown)}; choose from {METRICS}"
        )
    result = {}
    if "digits_fd" in e.metrics:
        result.update(digits_scores(config, images_uint8))
        result["feature_network"] = "digits_classifier " + metrics.file_hash(
            digits_classifier.WEIGHTS
        )
    if any(m in INCEPTION_METRICS for m in e.metrics):
        result.update(inception_scores(config, images_uint8, run.mesh))
    if "bpd" in e.metrics:
        result["bpd"] = bits_per_dim(config, run, params, jax.random.fold_in(key, 7))
        result["bpd_num_examples"] = e.bpd_num_examples
    return result


def evaluate_step(config, step, params, run) -> dict:
    """The objective's scores of `params`, the EMA weights of `step`."""
    _, _, sample_key = run_keys(config)
    key = jax.random.fold_in(sample_key, 1_000_000 + step)

    def score_samples(images_uint8, params, key):
        return metric_scores(config, run, images_uint8, params, key)

    scores = run.objective.scores(run, params, key, score_samples)
    return {"step": step, "ema": ema_name(config), "num_samples": config.eval.num_samples, **scores}


def ema_name(config) -> str:
    """Which average of the weights was scored: the power-function EMA of eval.ema_sigma_rel
    (tracked, or rebuilt by --mode=posthoc_ema), or the exponential one of optim.ema_decay."""
    width = config.eval.ema_sigma_rel
    if config.eval.params_file:
        return f"file {Path(config.eval.params_file).name}"
    if width > 0:
        how = "tracked" if width in tuple(config.optim.ema_sigma_rels) else "posthoc"
        return f"power sigma_rel={width:g} ({how})"
    return f"exponential decay={config.optim.ema_decay:g}"


def settings_key(config) -> str:
    """A short hash of everything that decides an evaluation's numbers besides the weights:
    the sampling and eval sections (but eval.checkpoint_step, and the list of a post-hoc
    sweep: each width of it is scored as eval.ema_sigma_rel alone is) and the seed. Results
    are keyed by it, so new settings give a new result instead of "already done"."""
    e = config.eval.to_dict()
    e.pop("checkpoint_step", None)
    e["ema_sigma_rels"] = ()  # base_config's, so that results keep their keys
    sampling = config.sampling.to_dict()
    if sampling.get("sigma_max") is None:
        sampling.pop("sigma_max", None)  # a field newer than some results: keep their keys
    fields = {"sampling": sampling, "eval": e, "seed": config.training.seed}
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def result_name(config, step: int) -> str:
    """What a result is named after: eval/step_<step> for the weights of a training step,
    eval/file_<name> for eval.params_file (whatever step it was exported at)."""
    if config.eval.params_file:
        return f"file_{Path(config.eval.params_file).stem}"
    return f"step_{step}"


def existing_result(workdir, name: str, key: str) -> Path | None:
    """The result file `name` (`result_name`) made with the settings `key`, if there is one."""
    folder = eval_dir(workdir)
    for path in [folder / f"{name}.json", *sorted(folder.glob(f"{name}-*.json"))]:
        try:
            if json.loads(path.read_text()).get("settings") == key:
                return path
        except (OSError, ValueError):
            continue
    return None


def result_path(workdir, name: str, key: str) -> Path:
    """eval/<name>.json, or eval/<name>-<key>.json when that holds a result of other
    settings."""
    plain = eval_dir(workdir) / f"{name}.json"
    if not plain.exists() or existing_result(workdir, name, key) == plain:
        return plain
    return eval_dir(workdir) / f"{name}-{key}.json"


def evaluate_and_write(config, workdir, step, params, run, board=None) -> dict:
    """Scores `params` (the EMA weights of `step`, or eval.params_file) and writes
    eval/<result_name>.json (or <result_name>-<settings>.json beside a result of other
    settings), and its scores to TensorBoard: through `board` (the training run's
    `metrics_io.MetricWriter`) when given, else a writer of its own."""
    key = settings_key(config)
    result = {**evaluate_step(config, step, params, run), "settings": key}
    if config.eval.params_file:
        result.update(step=None, params_file=str(config.eval.params_file))
    if parallel.is_main_process():
        path = result_path(workdir, result_name(config, step), key)
        paths.write_text(path, json.dumps(result, indent=2) + "\n")
        scores = {
            k: result[k]
            for k in result
            if k in METRICS + ("digits_confident", "reconstruction_mse", "blur_mse")
        }
        log.info("eval: wrote %s (%s): %s", path, result["ema"], scores)
        if step is not None and not config.eval.params_file:
            # TensorBoard too, beside the training curves; other settings under their key.
            prefix = "eval" if path.name == f"{result_name(config, step)}.json" else f"eval-{key}"
            tagged = {f"{prefix}/{k}": v for k, v in scores.items()}
            if board is not None:
                board.add(step, tagged)
            else:
                with contextlib.closing(metrics_io.MetricWriter(workdir, filename=None)) as own:
                    own.add(step, tagged)
    return result


def evaluate(config, workdir, steps=None) -> list[dict]:
    """Scores what has no result with these settings yet and says in the log what it scored:
    the given steps, or eval.checkpoint_step, or every checkpoint (every rebuild of an
    untracked eval.ema_sigma_rel, the newest being current); eval.params_file once, as
    eval/file_<name>.json; each width of a sweep eval.ema_sigma_rels as eval.ema_sigma_rel."""
    if steps is None and config.eval.ema_sigma_rels:
        results = []
        for width in config.eval.ema_sigma_rels:
            one = config.copy_and_resolve_references()
            one.eval.ema_sigma_rel, one.eval.ema_sigma_rels = width, ()
            results += evaluate(one, workdir)
        return results
    if config.eval.params_file:
        steps = [0]
    elif steps is None and config.eval.checkpoint_step >= 0:
        steps = [config.eval.checkpoint_step]
    elif steps is None and is_rebuilt(config):
        width = config.eval.ema_sigma_rel
        current_posthoc_step(workdir, width)  # a stale rebuild is one line, not scored
        steps = posthoc_steps(workdir, width)
    elif steps is None:
        steps = checkpointing.make_manager(workdir, read_only=True).all_steps()
    key = settings_key(config)
    done = {s: existing_result(workdir, result_name(config, s), key) for s in sorted(steps)}
    todo = [s for s, path in done.items() if path is None]
    if not todo:
        names = ", ".join(str(p.relative_to(paths.path(workdir))) for p in done.values() if p)
        log.info(
            "eval: nothing new to score in %s: %s already scored with these settings (%s); "
            "other eval.* or sampling.* settings make a new result",
            workdir,
            names,
            describe(config, max(done)),
        )
    results = []
    run = setup_run(config, run_keys(config)[0]) if todo else None  # one for every step
    for asked in todo:
        # A corrupt checkpoint is moved aside and an older one restored in its place.
        step, params = job_params(config, workdir, run, asked)
        if step != asked and (
            step in {r["step"] for r in results}
            or existing_result(workdir, result_name(config, step), key)
        ):
            log.info(
                "eval: checkpoint %d could not be read; %d, restored instead, is already scored",
                asked,
                step,
            )
            continue
        log.info("eval: scoring %s", describe(config, step))
        results.append(evaluate_and_write(config, workdir, step, params, run))
    if todo:
        log.info(
            "eval: scored %s of %s", [result_name(config, r["step"] or 0) for r in results], workdir
        )
    return results
