"""--mode=eval and --mode=sample: restore EMA parameters, sample sharded, score, write results.

eval writes eval/step_<N>.json for every checkpoint without one (or eval.checkpoint_step);
sample writes samples/sample_step_<N>.png, an .npz of uint8 images (arr_0, the layout
guided-diffusion's evaluator reads, plus labels) and a picture of the reverse process.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import checkpointing, export, metrics_io, parallel
from diffusion_jax import config as config_lib
from diffusion_jax import diffusion as dm
from diffusion_jax.data import pipeline
from diffusion_jax.evaluation import digits_classifier, inception, metrics, sampling
from diffusion_jax.training import loop

log = logging.getLogger(__name__)

METRICS = ("digits_fd", "bpd", "fid", "is", "precision", "recall", "reconstruction")
INCEPTION_METRICS = ("fid", "is", "precision", "recall")


def eval_dir(workdir) -> Path:
    return Path(workdir) / "eval"


def restore_ema(config, workdir, step: int | None, run=None):
    """(step, EMA params placed for this run's mesh, setup) from a checkpoint or from
    eval.params_file (an exported single file); `run` is built when not given."""
    if run is None:
        run = loop.setup_run(config, loop.run_keys(config)[0])
    if config.eval.params_file:
        params, _ = export.load_params(config.eval.params_file)
        shardings = run.state_sharding.params
        params = jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x), s), params, shardings)
        return 0, params, run
    manager = checkpointing.make_manager(workdir, read_only=True)
    available = manager.all_steps()
    if not available:
        raise FileNotFoundError(
            f"no checkpoint in {checkpointing.checkpoint_dir(workdir)}; "
            "train first (--mode=train) or set eval.params_file"
        )
    step = max(available) if step is None else step
    if step not in available:
        raise config_lib.ConfigError(
            f"config.eval.checkpoint_step: no checkpoint {step} in {manager.directory} "
            f"(have {sorted(available)})"
        )
    params = checkpointing.restore_ema(manager, step, run.abstract_state.ema_params)
    return step, params, run


def generate(config, run, params, num: int, key, *, labels=None, progress_every: int = 1):
    """`num` samples as uint8 (num, H, W, C), drawn in batches of sampling.batch_size split
    over all devices, with samples/s and ETA in the log.

    labels: (num,) class labels or, for text models, (num, M, D) contexts; None draws
    random classes for class-conditional models and samples the others unconditionally."""
    sample_fn = run.sample_fn()
    batch = sampling.padded_batch(min(config.sampling.batch_size, num), run.mesh.size)
    progress = metrics_io.Progress(num, unit="samples")
    out, done = [], 0
    for i in range(-(-num // batch)):
        batch_labels = None
        if labels is not None:
            batch_labels = jnp.asarray(labels[done : done + batch])
        elif config.model.class_conditional:
            batch_labels = jax.random.randint(
                jax.random.fold_in(key, 10_000 + i), (batch,), 0, config.data.num_classes
            )
        if batch_labels is not None and batch_labels.shape[0] < batch:
            pad = [(0, batch - batch_labels.shape[0])] + [(0, 0)] * (batch_labels.ndim - 1)
            batch_labels = jnp.pad(batch_labels, pad)
        images = sampling.gather(sample_fn(params, jax.random.fold_in(key, i), batch_labels, batch))
        out.append(metrics_io.to_uint8(images))
        done = min(done + batch, num)
        if (i + 1) % progress_every == 0 or done == num:
            log.info("sampling %s", progress.line(done, progress.update(done)))
    return np.concatenate(out)[:num]


def uint8_to_model_range(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 127.5 - 1.0


def digits_scores(config, images_uint8: np.ndarray) -> dict:
    """digits_fd: the Frechet distance between the digits classifier's features of the
    samples and of the held-out split; digits_confident: the fraction of samples the
    classifier assigns to one class with probability > 0.9 (legible digits)."""
    params = digits_classifier.load_params()
    real, _ = pipeline.load_in_memory(config, config.data.eval_split)
    real_feats, _ = digits_classifier.features_and_logits(params, real)
    fake_feats, fake_logits = digits_classifier.features_and_logits(
        params, uint8_to_model_range(images_uint8)
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
        raise config_lib.ConfigError(
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
            raise config_lib.ConfigError(
                "config.eval.reference_stats: needed for FID; make one with `python -m "
                "diffusion_jax.evaluation.reference_stats` or use guided-diffusion's batch"
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
    batch = sampling.padded_batch(
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
            sampling.gather(
                bpd(
                    params,
                    b["image"],
                    b["label"] if labels_used else None,
                    jax.random.fold_in(key, i),
                )
            )
        )
    return float(np.concatenate(values).mean())


def reconstruction_scores(config, run, params) -> dict:
    """An autoencoder's held-out errors over eval.num_samples images of data.eval_split: MSE
    and L1 of the decoded posterior mean, PSNR (images in [-1, 1], peak-to-peak 2), and the
    MSE of the blur baseline (`autoencoder.blur_baseline` at the latent resolution)."""
    from diffusion_jax.models import autoencoder as ae_lib

    factor = ae_lib.downsampling_factor(config.autoencoder.ch_mult)
    batch = sampling.padded_batch(
        min(config.sampling.batch_size, config.eval.num_samples), run.mesh.size
    )
    batches = pipeline.create_iterator(
        config, run.mesh, split=config.data.eval_split, global_batch=batch, train=False
    )

    reconstruct = run.reconstruct_fn()
    blur = jax.jit(lambda x: ae_lib.blur_baseline(x, factor))

    def per_image(error):
        return error.reshape(error.shape[0], -1).mean(axis=1)

    mse, l1, blur_mse = [], [], []
    for _ in range(-(-config.eval.num_samples // batch)):
        x = next(batches)["image"]
        x_hat, x_blur = sampling.gather(reconstruct(params, x)), sampling.gather(blur(x))
        x = sampling.gather(x)
        mse.append(per_image((x - x_hat) ** 2))
        l1.append(per_image(np.abs(x - x_hat)))
        blur_mse.append(per_image((x - x_blur) ** 2))
    num = config.eval.num_samples
    mse, l1, blur_mse = (np.concatenate(v)[:num] for v in (mse, l1, blur_mse))
    return {
        "reconstruction_mse": float(mse.mean()),
        "reconstruction_l1": float(l1.mean()),
        "psnr": float(np.mean(10 * np.log10(4.0 / np.maximum(mse, 1e-12)))),
        "blur_mse": float(blur_mse.mean()),
    }


def evaluate_step(config, workdir, step, params, run) -> dict:
    e = config.eval
    if config.training.objective == "autoencoder":
        return {
            "step": step,
            "num_samples": e.num_samples,
            **reconstruction_scores(config, run, params),
        }
    _, _, sample_key = loop.run_keys(config)
    key = jax.random.fold_in(sample_key, 1_000_000 + step)
    t0 = time.perf_counter()
    images = generate(config, run, params, e.num_samples, key, progress_every=5)
    result = {
        "step": step,
        "num_samples": e.num_samples,
        "sampler": config.sampling.sampler,
        "sampling_steps": config.sampling.num_steps,
        "eta": config.sampling.eta,
        "guidance_scale": config.sampling.guidance_scale,
        "seed": config.training.seed,
        "sampling_seconds": round(time.perf_counter() - t0, 2),
    }
    unknown = set(e.metrics) - set(METRICS)
    if unknown:
        raise config_lib.ConfigError(
            f"config.eval.metrics: unknown {sorted(unknown)}; choose from {METRICS}"
        )
    if "digits_fd" in e.metrics:
        result.update(digits_scores(config, images))
        result["feature_network"] = "digits_classifier " + metrics.file_hash(
            digits_classifier.WEIGHTS
        )
    if any(m in INCEPTION_METRICS for m in e.metrics):
        result.update(inception_scores(config, images, run.mesh))
    if "bpd" in e.metrics:
        result["bpd"] = bits_per_dim(config, run, params, jax.random.fold_in(key, 7))
        result["bpd_num_examples"] = e.bpd_num_examples
    return result


def evaluate_and_write(config, workdir, step, params, run) -> dict:
    """Scores `params` (the EMA weights of `step`) and writes eval/step_<step>.json."""
    result = evaluate_step(config, workdir, step, params, run)
    if parallel.is_main_process():
        path = eval_dir(workdir) / f"step_{step}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        scores = {
            k: result[k]
            for k in result
            if k in METRICS + ("digits_confident", "reconstruction_mse", "blur_mse")
        }
        log.info("eval: wrote %s: %s", path, scores)
    return result


def evaluate(config, workdir, steps=None) -> list[dict]:
    """Scores each checkpoint that has no eval/step_<N>.json yet, or eval.checkpoint_step,
    or the given steps."""
    config_lib.validate(config, jax.device_count())
    if steps is None and config.eval.checkpoint_step >= 0:
        steps = [config.eval.checkpoint_step]
    if steps is None:
        steps = checkpointing.make_manager(workdir, read_only=True).all_steps()
    todo = [s for s in sorted(steps) if not (eval_dir(workdir) / f"step_{s}.json").exists()]
    if not todo:
        log.info("eval: every checkpoint in %s already has a result", workdir)
    results, run = [], None  # one run setup (and compiled sampler) for every checkpoint
    for step in todo:
        step, params, run = restore_ema(config, workdir, step, run)
        results.append(evaluate_and_write(config, workdir, step, params, run))
    return results


def sample(config, workdir) -> Path:
    """Writes samples of the newest checkpoint (or eval.checkpoint_step): a grid PNG, an .npz
    of uint8 images and labels, and the x0 predictions along the reverse process."""
    config_lib.validate(config, jax.device_count())
    if config.pretrained:
        from diffusion_jax.evaluation import text_to_image

        return text_to_image.sample(config, workdir)
    step_arg = config.eval.checkpoint_step if config.eval.checkpoint_step >= 0 else None
    step, params, run = restore_ema(config, workdir, step_arg)
    if config.training.objective == "autoencoder":
        path = Path(workdir) / "samples" / f"reconstructions_step_{step}.png"
        loop.write_reconstructions(run, params, config, path)
        return path
    _, _, sample_key = loop.run_keys(config)
    key = jax.random.fold_in(sample_key, 2_000_000 + step)
    num = config.sampling.num_samples
    labels = sampling.grid_labels(config, num)
    if config_lib.is_text_conditioned(config) and config.sampling.prompt:
        labels = prompt_contexts(config, num)
    images = generate(config, run, params, num, key, labels=labels)
    out_dir = Path(workdir) / "samples"
    out = out_dir / f"sample_step_{step}"
    if parallel.is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        np.savez(
            out.with_suffix(".npz"),
            arr_0=images,
            labels=np.asarray(labels) if np.ndim(labels) == 1 else np.zeros(0, np.int32),
        )
        rows = config.data.num_classes if config.model.class_conditional else None
        metrics_io.save_grid(out.with_suffix(".png"), uint8_to_model_range(images), rows=rows)
    write_reverse_process(config, run, params, key, out_dir / f"reverse_step_{step}.png")
    return out.with_suffix(".png")


def prompt_contexts(config, num: int) -> np.ndarray:
    """sampling.prompt through text_encoder.weights, repeated: (num, M, D)."""
    from diffusion_jax.prompts import PromptEncoder

    if not config.text_encoder.weights:
        raise config_lib.ConfigError(
            "config.text_encoder.weights: sampling.prompt needs the text encoder the model was "
            "trained with (a folder with text_encoder/ and tokenizer/)"
        )
    context = PromptEncoder.from_folder(config.text_encoder.weights)(config.sampling.prompt)
    return np.broadcast_to(context, (num,) + context.shape[1:])


def write_reverse_process(config, run, params, key, path, num_images: int = 8, frames: int = 8):
    """One row per image, one column per chosen step: the x0 prediction as sampling goes."""
    steps = config.sampling.num_steps
    at = tuple(sorted({round(i * (steps - 1) / (frames - 1)) for i in range(frames)}))
    batch = sampling.padded_batch(num_images, run.mesh.size)
    fn = run.sample_fn(return_x0_at=at)
    labels = sampling.grid_labels(config, batch)
    _, traj = fn(params, key, labels, batch)
    traj = sampling.gather(traj)[:, :num_images]  # (frames, N, H, W, C)
    grid = np.swapaxes(traj, 0, 1).reshape((-1,) + traj.shape[2:])
    metrics_io.save_grid(path, grid, rows=num_images)


def export_ema(config, workdir) -> Path:
    """Writes the EMA parameters of the newest checkpoint (or eval.checkpoint_step) to
    <workdir>/export/ema_step_<N>.msgpack with the run config beside it (.json)."""
    config_lib.validate(config, jax.device_count())
    step_arg = config.eval.checkpoint_step if config.eval.checkpoint_step >= 0 else None
    step, params, _ = restore_ema(config, workdir, step_arg)
    path = Path(workdir) / "export" / f"ema_step_{step}.msgpack"
    if parallel.is_main_process():
        export.save_params(path, params, config)
        log.info("export: wrote %s and %s", path, export.config_path(path).name)
    return path
