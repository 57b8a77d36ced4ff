"""--mode=posthoc_ema: power-function EMAs of any width rebuilt after training (EDM2).

Training with optim.ema_sigma_rels and training.ema_snapshot_every writes snapshots of the
tracked profiles to <workdir>/ema_snapshots/. This job takes every snapshot up to the newest
(or up to eval.checkpoint_step), solves the least-squares weights that combine them into the
profile of width eval.ema_sigma_rel at that time (`diffusion.posthoc_weights`), and writes

    <workdir>/posthoc_ema/sigma_rel_<width>_step_<N>.msgpack (+ .json: config; weights)

where --mode=eval, sample and export find it (with the same eval.ema_sigma_rel). With
eval.ema_sigma_rels it rebuilds every width of the list, scores each with eval.metrics, and
writes the EMA-length curve posthoc_ema/curve_step_<N>.json and .png.
"""

from __future__ import annotations

import functools
import json
import logging

import jax
import numpy as np

from diffusion_jax import checkpointing, errors, export, metrics_io, parallel, paths
from diffusion_jax import diffusion as dm
from diffusion_jax.evaluation.evaluate import (
    evaluate_and_write,
    existing_result,
    result_name,
    settings_key,
)
from diffusion_jax.run import run_keys, setup_run
from diffusion_jax.weights import posthoc_path

log = logging.getLogger(__name__)


def read_snapshots(workdir, up_to: int | None = None):
    """(manager, [(step, meta)]) of the snapshots in <workdir>/ema_snapshots/ up to step
    `up_to` (None: all), oldest first. meta: {"step", "t", "sigma_rels", "gammas"}."""
    manager = checkpointing.make_manager(
        workdir, read_only=True, folder=checkpointing.EMA_SNAPSHOTS
    )
    steps = [s for s in sorted(manager.all_steps()) if up_to is None or s <= up_to]
    if not steps:
        folder = checkpointing.checkpoint_dir(workdir, checkpointing.EMA_SNAPSHOTS)
        raise FileNotFoundError(
            f"no EMA snapshot{f' up to step {up_to}' if up_to is not None else ''} in {folder}; "
            "train with optim.ema_sigma_rels and training.ema_snapshot_every > 0"
        )
    metas = [(s, checkpointing.restore_meta(manager, s)) for s in steps]
    return manager, metas


def snapshot_profiles(metas) -> tuple[np.ndarray, np.ndarray]:
    """(t, gamma), each (num_snapshots x profiles,): the profile of every snapshotted array,
    in the order `combine` reads them."""
    t = [m["t"] for _, m in metas for _ in m["gammas"]]
    gamma = [g for _, m in metas for g in m["gammas"]]
    return np.float64(t), np.float64(gamma)


def combine(manager, metas, weights: np.ndarray, run) -> list:
    """The weighted sums sum_i weights[i, j] snapshot_i for each column j, as parameter
    pytrees sharded like the run's parameters. Each snapshot is read once; memory holds
    one snapshot and one sum per column."""
    abstract = run.abstract_state.params

    @functools.partial(jax.jit, donate_argnums=0)  # the sums are updated in place
    def accumulate(sums, profile, w):
        return tuple(
            jax.tree.map(lambda s, p, wj=wj: s + wj * p, total, profile)
            for total, wj in zip(sums, w, strict=True)
        )

    sums = tuple(
        jax.tree.map(lambda a: jax.numpy.zeros(a.shape, a.dtype), abstract)
        for _ in range(weights.shape[1])
    )
    sums = jax.device_put(sums, (run.state_sharding.params,) * weights.shape[1])
    row = 0
    for step, meta in metas:
        profiles, _ = checkpointing.restore_tree(manager, step, (abstract,) * len(meta["gammas"]))
        for profile in profiles:
            sums = accumulate(sums, profile, jax.numpy.asarray(weights[row], jax.numpy.float32))
            row += 1
    return list(sums)


def posthoc_ema(config, workdir) -> list[dict]:
    """Rebuilds eval.ema_sigma_rel, or each of eval.ema_sigma_rels (scored), from the
    snapshots; returns one record per width: its file, step, weights (and scores)."""
    e = config.eval
    sweep = tuple(e.ema_sigma_rels)
    widths = sweep or ((e.ema_sigma_rel,) if e.ema_sigma_rel > 0 else ())
    if not widths:
        raise errors.ConfigError(
            "config.eval.ema_sigma_rel: set the width to rebuild (e.g. 0.07), or a sweep "
            "in config.eval.ema_sigma_rels"
        )
    workdir = paths.path(workdir)
    up_to = e.checkpoint_step if e.checkpoint_step >= 0 else None
    manager, metas = read_snapshots(workdir, up_to)
    step, t_end = metas[-1][0], metas[-1][1]["t"]
    t, gamma = snapshot_profiles(metas)
    weights = dm.posthoc_weights(t, gamma, t_end, dm.sigma_rel_to_gamma(np.float64(widths)))
    log.info(
        "posthoc_ema: %d snapshots (steps %d..%d, widths %s) -> width(s) %s at step %d",
        len(metas),
        metas[0][0],
        step,
        metas[-1][1]["sigma_rels"],
        list(widths),
        step,
    )
    run = setup_run(config, run_keys(config)[0])
    records = []
    for j, (width, params) in enumerate(
        zip(widths, combine(manager, metas, weights, run), strict=True)
    ):
        path = posthoc_path(workdir, width, step)
        record = {"sigma_rel": width, "step": step, "file": str(path)}
        if parallel.is_main_process():
            export.save_params(path, params, config, step)
            paths.write_text(
                path.with_suffix(".weights.json"),
                json.dumps(
                    {
                        **record,
                        "snapshot_t": t.tolist(),
                        "snapshot_gamma": gamma.tolist(),
                        "weights": weights[:, j].tolist(),
                    },
                    indent=1,
                )
                + "\n",
            )
            log.info("posthoc_ema: wrote %s", path)
        tracked = metas[-1][1]["sigma_rels"]
        if not min(tracked) <= width <= max(tracked):
            log.warning(
                "posthoc_ema: width %g is outside the tracked widths %s: it is extrapolated, "
                "from snapshot weights between %.2f and %.2f (widths inside that range are "
                "rebuilt reliably)",
                width,
                list(tracked),
                weights[:, j].min(),
                weights[:, j].max(),
            )
        if sweep:
            scored = config.copy_and_resolve_references()
            with scored.unlocked():
                scored.eval.ema_sigma_rel = width
            key = settings_key(scored)
            done = existing_result(workdir, result_name(scored, step), key)
            if done is not None:  # the same width, step and settings: scored already
                log.info(
                    "posthoc_ema: width %g at step %d is already scored in %s", width, step, done
                )
                record.update(json.loads(done.read_text()))
            else:
                record.update(evaluate_and_write(scored, workdir, step, params, run))
        records.append(record)
    manager.close()
    if sweep and parallel.is_main_process():
        write_curve(workdir / "posthoc_ema" / f"curve_step_{step}", records, config.eval.metrics)
    return records


def write_curve(stem: paths.Path, records, metrics) -> None:
    """The EMA-length curve: <stem>.json (one row per width) and <stem>.png (each metric
    against sigma_rel)."""
    rows = [{k: v for k, v in r.items() if k not in ("file",)} for r in records]
    paths.write_text(stem.with_suffix(".json"), json.dumps(rows, indent=2) + "\n")
    series = {m: [(r["sigma_rel"], r[m]) for r in records if r.get(m) is not None] for m in metrics}
    metrics_io.plot_curves(
        stem.with_suffix(".png"),
        series,
        xlabel="EMA length sigma_rel",
        title=f"post-hoc EMA at step {stem.name.rsplit('_', 1)[-1]}",
    )
    log.info("posthoc_ema: wrote %s and .png", stem.with_suffix(".json"))
