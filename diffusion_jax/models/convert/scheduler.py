"""A pipeline folder's `scheduler/scheduler_config.json` <-> the sampling settings.

diffusers reads a folder's scheduler config through the class a user picks
(`DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`): the keys the file holds
are used, the keys it lacks take that class's defaults (not the defaults of the class the
file names). `sampling_from_scheduler` does the same for each sampler, through the class
`timesteps.DIFFUSERS_SCHEDULERS` names for it, and returns config.sampling values;
`config.resolved_sampling` puts them where the user's config left a field unset.
`scheduler_config` writes the file back for an exported pipeline.
"""

from __future__ import annotations

from pathlib import Path

from diffusion_jax.diffusion.timesteps import DIFFUSERS_SCHEDULERS
from diffusion_jax.models.convert import layout

SCHEDULER_FILE = Path("scheduler") / "scheduler_config.json"

# The defaults of diffusers' classes (0.2x-0.4x) for the keys the samplers follow.
CLASS_DEFAULTS = {
    "DDPMScheduler": {"timestep_spacing": "leading", "clip_sample": True},
    "DDIMScheduler": {"timestep_spacing": "leading", "clip_sample": True, "set_alpha_to_one": True},
    "DPMSolverMultistepScheduler": {
        "timestep_spacing": "linspace",
        "solver_order": 2,
        "lower_order_final": True,
        "final_sigmas_type": "zero",
        "use_karras_sigmas": False,
    },
    "UniPCMultistepScheduler": {
        "timestep_spacing": "linspace",
        "lower_order_final": True,
        "use_karras_sigmas": False,
    },
    "EulerDiscreteScheduler": {
        "timestep_spacing": "linspace",
        "final_sigmas_type": "zero",
        "use_karras_sigmas": False,
    },
    "HeunDiscreteScheduler": {"timestep_spacing": "linspace", "use_karras_sigmas": False},
}
# Settings that change a scheduler's math in ways no sampler here follows: refused (with the
# value that would be followed) rather than silently sampled differently.
UNSUPPORTED = {
    "thresholding": False,
    "rescale_betas_zero_snr": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "euler_at_final": False,
    "timestep_type": "discrete",
    "interpolation_type": "linear",
    "solver_type": "midpoint",
    "sigma_min": None,
    "sigma_max": None,
    "trained_betas": None,
}


def read_scheduler_config(folder) -> dict | None:
    """The parsed scheduler/scheduler_config.json of a pipeline folder, or None."""
    return layout.read_json(Path(folder) / SCHEDULER_FILE)


def sampling_from_scheduler(cfg: dict | None, sampler: str) -> dict:
    """config.sampling values (`config.SCHEDULER_DEFAULTS` keys and clip_denoised) that a
    scheduler config gives `sampler`, as diffusers' class for it reads the file; {} for no
    file. Raises ValueError (one line) on settings no sampler here follows."""
    if cfg is None:
        return {}
    cls = DIFFUSERS_SCHEDULERS[sampler]
    defaults = CLASS_DEFAULTS[cls]

    def get(key, fallback=None):
        return cfg.get(key, defaults.get(key, fallback))

    for key, wanted in UNSUPPORTED.items():
        value = cfg.get(key, wanted)
        if value != wanted and not (wanted is None and value is None):
            raise ValueError(
                f"scheduler_config.json: {key}={value!r} is not supported (only {wanted!r})"
            )
    lambda_min = cfg.get("lambda_min_clipped", float("-inf"))
    if cls == "DPMSolverMultistepScheduler" and lambda_min != float("-inf"):
        raise ValueError(
            f"scheduler_config.json: lambda_min_clipped={lambda_min!r} is not supported"
        )
    out = {
        "spacing": get("timestep_spacing"),
        "steps_offset": int(cfg.get("steps_offset", 0)),
        "conventions": "diffusers",
        "use_karras_sigmas": bool(get("use_karras_sigmas", False)),
        "clip_denoised": bool(get("clip_sample", False)),
        "final_sigmas_type": "zero",
        "lower_order_final": bool(get("lower_order_final", False)),
    }
    if cls == "DDIMScheduler":
        out["final_sigmas_type"] = "zero" if get("set_alpha_to_one") else "sigma_min"
    elif "final_sigmas_type" in defaults:
        out["final_sigmas_type"] = get("final_sigmas_type")
    if cls == "DPMSolverMultistepScheduler" and sampler == "dpm_solver++":
        out["solver_order"] = int(get("solver_order"))
    if out["clip_denoised"] and float(cfg.get("clip_sample_range", 1.0)) != 1.0:
        raise ValueError(
            f"scheduler_config.json: clip_sample_range={cfg['clip_sample_range']!r} is not "
            "supported (only 1.0)"
        )
    return out


PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
BETA_SCHEDULES = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "cosine": "squaredcos_cap_v2",
}


def scheduler_config(config) -> dict:
    """The scheduler_config.json of an exported pipeline: a DDIMScheduler config with the
    run's schedule and prediction, and the sampling conventions of config.sampling where they
    are set (Stable Diffusion's otherwise: leading spacing, steps_offset 1, final level
    abar_0, no clipping)."""
    f, s = config.diffusion, config.sampling
    if f.schedule not in BETA_SCHEDULES:
        raise ValueError(
            f"config.diffusion.schedule: {f.schedule!r} has no diffusers beta_schedule"
        )
    out = {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": f.num_timesteps,
        "beta_schedule": BETA_SCHEDULES[f.schedule],
        "prediction_type": PREDICTION_TYPES[f.prediction],
        "timestep_spacing": s.spacing
        if s.spacing in ("leading", "linspace", "trailing")
        else "leading",
        "steps_offset": 1 if s.steps_offset is None else int(s.steps_offset),
        "set_alpha_to_one": s.final_sigmas_type == "zero",
        "clip_sample": bool(s.clip_denoised),
        "skip_prk_steps": True,
    }
    if f.schedule in ("linear", "scaled_linear"):
        # A negative beta means the schedule's published value (`schedules.make_schedule`).
        scale = 1000.0 / f.num_timesteps if f.schedule == "linear" else 1.0
        start, end = (1e-4, 0.02) if f.schedule == "linear" else (0.00085, 0.012)
        out["beta_start"] = float(f.beta_start) if f.beta_start >= 0 else scale * start
        out["beta_end"] = float(f.beta_end) if f.beta_end >= 0 else scale * end
    return out
