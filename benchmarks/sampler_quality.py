"""Quality per network evaluation: digits_fd of every sampler against NFE, and against the
length of the post-hoc EMA, on one trained digits model.

    PYTHONPATH=. python benchmarks/sampler_quality.py --workdir=runs/digits_quality
    PYTHONPATH=. python benchmarks/sampler_quality.py --smoke --workdir=/tmp/sq   # seconds

Trains configs/digits.py into --workdir first when it has no checkpoint (tracking the
power-function EMAs with snapshots, so that the EMA length can be chosen afterwards), then
scores the samples of every sampler at every NFE of --nfe with the same seed and number of
samples (eval.num_samples), and the EMA lengths of --sigma_rels rebuilt post hoc. NFE 1000
is ancestral sampling (ddpm) only: the reference the others are measured against. Writes
<workdir>/sampler_quality/{results.json, table.md, fd_vs_nfe.png, fd_vs_ema.png} and prints
one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import time
from pathlib import Path

import jax

from benchmarks.common import emit
from diffusion_jax import diffusion as dm
from diffusion_jax import metrics_io
from diffusion_jax.evaluation.evaluate import evaluate_step
from diffusion_jax.jobs import train as train_job
from diffusion_jax.jobs.posthoc_ema import posthoc_ema
from diffusion_jax.run import run_keys, setup_run
from diffusion_jax.weights import job_params

NFES = (5, 8, 10, 15, 20, 50, 100)
REFERENCE = ("ddpm", 1000)  # ancestral sampling at the full T
SIGMA_RELS = (0.02, 0.04, 0.06, 0.08, 0.10, 0.13, 0.16, 0.2)


def digits_config(smoke: bool):
    """configs/digits.py (or its smoke variant), tracking two power-function EMAs."""
    path = Path(__file__).resolve().parents[1] / "configs" / "digits.py"
    spec = importlib.util.spec_from_file_location("digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke" if smoke else "")
    config.optim.ema_sigma_rels = (0.05, 0.10)
    config.training.ema_snapshot_every = 1 if smoke else 100
    config.training.eval_at_end = False
    return config


def score(config, run, params, step, sampler: str, nfe: int) -> dict:
    """digits_fd and confidence of `sampler` at `nfe` network evaluations."""
    c = config.copy_and_resolve_references()
    c.sampling.sampler, c.sampling.num_steps = sampler, nfe
    c.sampling.spacing = ""
    with_sampler = run._replace(config=c, compiled={})
    t0 = time.perf_counter()
    result = evaluate_step(c, step, params, with_sampler)
    return {
        "sampler": sampler,
        "nfe": dm.nfe(sampler, nfe),
        "digits_fd": result["digits_fd"],
        "digits_confident": result["digits_confident"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny model, two NFEs, seconds")
    parser.add_argument("--nfe", default=",".join(map(str, NFES)))
    parser.add_argument("--samplers", default=",".join(dm.SAMPLERS))
    parser.add_argument("--sigma_rels", default=",".join(map(str, SIGMA_RELS)))
    parser.add_argument("--num_samples", type=int, default=0, help="0: eval.num_samples")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    workdir = Path(args.workdir)
    config = digits_config(args.smoke)
    if args.num_samples:
        config.eval.num_samples = args.num_samples
    nfes = [int(n) for n in args.nfe.split(",")]
    samplers = args.samplers.split(",")
    sigma_rels = tuple(float(s) for s in args.sigma_rels.split(","))
    reference = REFERENCE
    if args.smoke:
        nfes, reference, sigma_rels = [3], ("ddpm", 6), sigma_rels[:2]

    if not (workdir / "checkpoints").is_dir():
        train_job.train_and_evaluate(config, workdir)
    run = setup_run(config, run_keys(config)[0])
    step, params = job_params(config, workdir, run)
    rows = [score(config, run, params, step, *reference)]
    emit(benchmark="sampler_quality", step=step, **rows[-1])
    for sampler in samplers:
        for nfe in nfes:
            rows.append(score(config, run, params, step, sampler, nfe))
            emit(benchmark="sampler_quality", step=step, **rows[-1])

    sweep = config.copy_and_resolve_references()
    sweep.eval.ema_sigma_rels = sigma_rels
    ema_rows = [
        {k: r[k] for k in ("sigma_rel", "digits_fd", "digits_confident", "sampler", "nfe")}
        for r in posthoc_ema(sweep, workdir)
    ]
    for r in ema_rows:
        emit(benchmark="ema_length", step=step, **r)

    out = workdir / "sampler_quality"
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "step": step,
        "num_samples": config.eval.num_samples,
        "reference": rows[0],
        "samplers": rows[1:],
        "ema_lengths": ema_rows,
        # The sampler rows score the exponential EMA; the EMA lengths use config.sampling.
        "ema_decay": config.optim.ema_decay,
        "ema_sampling": {"sampler": config.sampling.sampler, "nfe": config.sampling.num_steps},
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text(markdown_table(rows, nfes, samplers))
    series = {
        s: [(r["nfe"], r["digits_fd"]) for r in rows[1:] if r["sampler"] == s] for s in samplers
    }
    series[f"{reference[0]} {reference[1]} (reference)"] = [(rows[0]["nfe"], rows[0]["digits_fd"])]
    metrics_io.plot_curves(
        out / "fd_vs_nfe.png",
        series,
        xlabel="network evaluations (NFE)",
        log_x=True,
        title="digits_fd (lower is better)",
    )
    metrics_io.plot_curves(
        out / "fd_vs_ema.png",
        {"post-hoc power EMA": [(r["sigma_rel"], r["digits_fd"]) for r in ema_rows]},
        xlabel="EMA length sigma_rel",
        title="digits_fd (lower is better)",
    )
    print((out / "table.md").read_text())
    return out


def markdown_table(rows, nfes, samplers) -> str:
    """digits_fd by sampler (rows) and requested NFE (columns), and the reference."""
    by = {(r["sampler"], r["nfe"]): r["digits_fd"] for r in rows[1:]}
    requested = {(s, n): dm.nfe(s, n) for s in samplers for n in nfes}
    lines = ["| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |"]
    lines.append("| --- " * (len(nfes) + 1) + "|")
    for s in samplers:
        cells = [f"{by[(s, requested[(s, n)])]:.2f}" for n in nfes]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    ref = rows[0]
    lines.append(
        f"\nReference: {ref['sampler']} at NFE {ref['nfe']}: digits_fd {ref['digits_fd']:.2f}\n"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
