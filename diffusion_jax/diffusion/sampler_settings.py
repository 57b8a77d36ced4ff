"""Every option of a sampler in one frozen value, `SamplerSettings`, with the one copy of the
rules that say which options work together (`check`), the network evaluations they cost
(`nfe`) and what result files record of them (`record`).

`dm.sample(..., settings=SamplerSettings(sampler="ddim", num_steps=50))` and the keyword form
`dm.sample(..., sampler="ddim", num_steps=50)` are the same call; a config's
`config.sample_settings(config)` builds one from config.sampling and config.diffusion, and the
config's validation runs the same `check`, naming the config field instead of the option.

`SAMPLERS` lists the samplers: their step functions (`ancestral.py`, `multistep.py`,
`karras.py`), how they start, their default budget and network evaluations per step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from diffusion_jax.diffusion import ancestral, karras, multistep, process
from diffusion_jax.diffusion.timesteps import CONVENTION_NAMES, KARRAS_SAMPLERS, SPACINGS


class _Spec(NamedTuple):
    """How the sampling loop runs a sampler."""

    step: Callable  # (ctx, carry, i) -> (carry, x0 (B, ...), or (E, B, ...) for E evaluations)
    init: Callable  # (ctx, x_T) -> carry; carry[0] is the sample, after the last step x_0
    default_steps: int | None  # None: T
    evals_per_step: int = 1


def _zeros_after(count):
    """init of a sampler whose carry is x_T and `count` zero histories."""
    return lambda ctx, x_T: (x_T,) + (jnp.zeros_like(x_T),) * count


SAMPLERS = {
    "ddpm": _Spec(ancestral.ddpm_step, _zeros_after(1), None),
    "ddim": _Spec(ancestral.ddim_step, _zeros_after(1), 50),
    "dpm_solver++": _Spec(multistep.dpm_solver_pp_2m_step, _zeros_after(1), 20),
    "dpm_solver++_sde": _Spec(multistep.dpm_solver_pp_2m_sde_step, _zeros_after(1), 20),
    "dpm_solver++_3m": _Spec(multistep.dpm_solver_pp_3m_step, _zeros_after(2), 20),
    "unipc": _Spec(multistep.unipc_step, _zeros_after(3), 20),
    "euler": _Spec(karras.euler_step, karras.init, 50),
    # 35 evaluations: EDM's 18 Heun steps on CIFAR-10.
    "heun": _Spec(karras.heun_step, karras.init, 35, evals_per_step=2),
}
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
# Samplers whose last step can end at a level below 1 (final_sigmas_type="sigma_min").
FINITE_FINAL = ("ddim", "dpm_solver++", "dpm_solver++_sde", "dpm_solver++_3m", "euler")
SOLVER_ORDERS = {"dpm_solver++": (1, 2, 3), "dpm_solver++_sde": (1, 2), "dpm_solver++_3m": (3,)}


class SettingError(ValueError):
    """An option that cannot work: str() is the one line '<option>: <text>'."""

    def __init__(self, option: str, text: str):
        super().__init__(f"{option}: {text}")
        self.option, self.text = option, text


def num_grid_steps(sampler: str, num_steps: int) -> int:
    """Steps that spend at most num_steps evaluations: ceil(N / E) for E evaluations a step
    but one on the last (Heun: floor((N + 1) / 2) steps cost 2K - 1, as in EDM)."""
    return -(-num_steps // SAMPLERS[sampler].evals_per_step)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerSettings:
    """The options of `dm.sample` that choose and tune the sampler (not the model, the key,
    the noise, the labels or what to return).

    sampler: "ddpm" (ancestral, Algorithm 2 of Ho et al., respaced betas when K < T), "ddim"
      (with `eta`), "dpm_solver++" (2M), "dpm_solver++_sde" (2M SDE), "dpm_solver++_3m" (3M),
      "unipc" (UniPC-2 with its corrector), all data prediction; or "euler" / "heun" (EDM,
      Karras sigmas with rho = 7, `karras.py`).
    num_steps: network evaluations N <= T (`nfe`): N steps, or floor((N + 1) / 2) Heun steps;
      None: T for ddpm, 50 for ddim and euler, 35 for heun, 20 for the others (at most T).
    spacing: "uniform", "quadratic", "trailing", "leading" or "linspace"
      (`timesteps.respaced_timesteps`); None: `default_spacing`, "uniform" for ddpm and ddim,
      "trailing" for the multistep solvers (diffusers' conventions: "leading" for ddim,
      "linspace" for the others). euler and heun take one only without Karras sigmas.
    eta: DDIM's noise (0: deterministic).
    timesteps: explicit descending timesteps (K,) that override num_steps and spacing (for
      euler and heun: the grid of sigmas, K steps, then the final point); kept as a tuple.
    prediction, variance, clip_denoised: as in `process.p_mean_variance`.
    guidance_scale: classifier-free guidance's w (`sampling_loop.guided_model_output`) or None
      for none; it applies only when `dm.sample` is given labels. A setting rather than an
      argument beside the labels because it is fixed for a run (config.sampling holds it),
      decides how the sampler combines the network's outputs (two evaluations per step, one
      program) and so belongs to what makes two runs' samplers the same.
    unipc_variant: "bh2" (B(h) = e^h - 1, diffusers' default) or "bh1" (B(h) = h).
    s_churn, s_tmin, s_tmax, s_noise: EDM's stochastic churn (Algorithm 2) for euler and heun;
      the defaults (EDM's code) add no noise.
    steps_offset: added to "leading" timesteps (Stable Diffusion's scheduler: 1).
    final_sigmas_type: where the last step ends, abar_K: "zero" (abar_K = 1, sigma = 0: the
      data; the last step returns the x0 prediction) or "sigma_min" (abar_K = abar_0, the
      level of t = 0, which ddim, the dpm_solver++ family and euler reach with an ordinary
      last step: x_K = sqrt(abar_0) x0 + sqrt(1 - abar_0) eps for ddim, whose
      set_alpha_to_one=True/False in diffusers are these two).
    karras_sigmas: step on Eq. 5 of Karras et al. (rho = 7) instead of a spacing; None: True
      for euler and heun under the project's conventions without explicit timesteps, else
      False (`uses_karras_sigmas`). For euler, heun and the dpm_solver++ family.
    sigma_max: the top of the Karras grid, when below the range's own (None: min(sigma_{T-1},
      80) under the project's conventions, as `timesteps.Conventions` says). Few steps spend
      less of their budget on noise levels that hardly change a small image when it is
      lower (digits at 16x16: 10; `benchmarks/README.md`). Only with Karras sigmas.
    solver_order: dpm_solver++'s order: 1 (the DDIM update in lambda), 2 (2M, default) or 3
      (3M); 1 or 2 for dpm_solver++_sde; 3 for dpm_solver++_3m; None: the sampler's.
    lower_order_final: with fewer than 15 steps, the dpm_solver++ family takes its last step
      at order 1 and the one before at order 2 at most (`multistep.step_order`); without it
      only the final data point (h = inf) lowers the last step's order.
    conventions: "project" or "diffusers": the per-scheduler habits of
      `timesteps.Conventions`.
    """

    sampler: str = "ddpm"
    num_steps: int | None = None
    spacing: str | None = None
    eta: float = 0.0
    timesteps: tuple | None = None
    prediction: str = "eps"
    variance: str = "fixed_large"
    clip_denoised: bool = True
    guidance_scale: float | None = None
    unipc_variant: str = "bh2"
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0
    steps_offset: int = 0
    final_sigmas_type: str = "zero"
    karras_sigmas: bool | None = None
    sigma_max: float | None = None
    solver_order: int | None = None
    lower_order_final: bool = False
    conventions: str = "project"

    def __post_init__(self):
        # Explicit timesteps as a tuple of Python numbers (hashable; empty is none).
        if self.timesteps is not None:
            steps = np.asarray(self.timesteps)
            object.__setattr__(self, "timesteps", tuple(steps.tolist()) if steps.size else None)

    @property
    def uses_karras_sigmas(self) -> bool:
        """karras_sigmas, or its default: explicit timesteps replace the Karras grid."""
        if self.karras_sigmas is not None:
            return bool(self.karras_sigmas)
        return (
            self.sampler in KARRAS_SAMPLERS
            and self.conventions == "project"
            and self.timesteps is None
        )

    @property
    def order(self) -> int:
        """The order of a dpm_solver++ sampler (2, 3 for 3M; 1 for the others, unused there)."""
        if self.solver_order is not None:
            return self.solver_order
        allowed = SOLVER_ORDERS.get(self.sampler)
        return 2 if self.sampler == "dpm_solver++" else allowed[-1] if allowed else 1

    def check(self, num_timesteps: int) -> None:
        """Raises `SettingError` (a ValueError whose message is the one line '<option>:
        <text>') on the first option that cannot work, on a schedule of num_timesteps steps.
        The only copy of the rules: `dm.sample` and the config's validation both run it."""
        _choice("sampler", self.sampler, tuple(SAMPLERS))
        _choice("prediction", self.prediction, process.PREDICTIONS)
        _choice("variance", self.variance, process.VARIANCES)
        _choice("conventions", self.conventions, CONVENTION_NAMES)
        if self.spacing:  # "" or None: the sampler's
            _choice("spacing", self.spacing, SPACINGS)
        _choice("unipc_variant", self.unipc_variant, multistep.UNIPC_VARIANTS)
        _choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
        n = self.num_steps
        _require(
            n is None or 1 <= n <= num_timesteps,
            "num_steps",
            f"must be in [1, {num_timesteps}] (the schedule's num_timesteps), not {n}",
        )
        steps = self.timesteps or ()
        _require(
            all(0 <= t < num_timesteps for t in steps)
            and all(a > b for a, b in zip(steps[:-1], steps[1:], strict=True)),
            "timesteps",
            f"must be distinct, descending and in [0, {num_timesteps}) (the schedule's timesteps)",
        )
        for option in ("eta", "s_churn", "s_noise", "steps_offset"):
            value = getattr(self, option)
            known = _concrete(value)
            _require(known is None or known >= 0, option, f"must be >= 0, not {value!r}")
        self._check_karras_sigmas()
        allowed = SOLVER_ORDERS.get(self.sampler)
        _require(
            self.solver_order is None or self.solver_order in (allowed or ()),
            "solver_order",
            f"{self.solver_order} does not apply to sampler {self.sampler!r}"
            + (f"; choose one of {allowed}" if allowed else ""),
        )
        _require(
            self.final_sigmas_type == "zero" or self.sampler in FINITE_FINAL,
            "final_sigmas_type",
            f"{self.final_sigmas_type!r}: sampler {self.sampler!r} ends at the data; a final "
            f"level below 1 is for {FINITE_FINAL}",
        )

    def _check_karras_sigmas(self):
        known = _concrete(self.sigma_max)
        _require(known is None or known > 0, "sigma_max", f"must be > 0, not {self.sigma_max!r}")
        _require(
            self.sigma_max is None or self.uses_karras_sigmas,
            "sigma_max",
            f"is the top of a Karras grid, and sampler {self.sampler!r} steps here on "
            "timesteps; leave it unset, or turn Karras sigmas on (euler, heun, dpm_solver++)",
        )
        if not self.uses_karras_sigmas:
            return
        _require(
            self.sampler in KARRAS_SAMPLERS or self.sampler.startswith("dpm_solver++"),
            "karras_sigmas",
            f"sampler {self.sampler!r} steps on timesteps; Karras sigmas are for euler, heun "
            "and the dpm_solver++ family",
        )
        _require(
            self.timesteps is None,
            "timesteps",
            "explicit timesteps take no Karras sigmas; leave them empty or turn Karras sigmas off",
        )
        # diffusers' EulerDiscreteScheduler takes the range of its Karras sigmas from the
        # spaced timesteps; here a spacing and Karras sigmas are one choice too many.
        _require(
            not self.spacing or self.conventions != "project",
            "spacing",
            f"{self.spacing!r} does not apply to Karras sigmas (sampler {self.sampler!r}); "
            "leave it empty, give explicit timesteps, or turn Karras sigmas off",
        )

    @property
    def nfe(self) -> int:
        """Network evaluations `dm.sample` makes with these settings.

        num_steps for every sampler but Heun, which spends 2 floor((N + 1) / 2) - 1 <= N (an
        even budget leaves one unused). Guidance doubles each evaluation (not counted here).
        With explicit `timesteps` of length K: K evaluations, 2K - 1 for Heun.
        """
        if self.timesteps is not None:
            spec = SAMPLERS.get(self.sampler)
            per_step = spec.evals_per_step if spec else 1
            return per_step * len(self.timesteps) - (per_step - 1)
        _choice("sampler", self.sampler, tuple(SAMPLERS))
        num_steps = self.num_steps
        if num_steps is None:
            num_steps = SAMPLERS[self.sampler].default_steps
            _require(
                num_steps is not None,
                "num_steps",
                f"the default of {self.sampler} is the schedule's num_timesteps; give it",
            )
        _require(num_steps >= 1, "num_steps", f"must be >= 1, not {num_steps}")
        per_step = SAMPLERS[self.sampler].evals_per_step
        return per_step * num_grid_steps(self.sampler, num_steps) - (per_step - 1)

    def record(self) -> dict:
        """What result files (eval/step_<N>.json, samples' .json) record of the sampler: its
        name, its budget num_steps and the network evaluations it spent."""
        record = {"sampler": self.sampler, "num_steps": self.num_steps, "nfe": self.nfe}
        if self.sigma_max is not None:
            record["sigma_max"] = self.sigma_max
        return record


OPTIONS = tuple(field.name for field in dataclasses.fields(SamplerSettings))


def settings_from(settings: SamplerSettings | None = None, **options) -> SamplerSettings:
    """`settings` (default: all defaults) with the given options replaced; an option that is
    not a field of `SamplerSettings` is a one-line TypeError naming it."""
    unknown = [name for name in options if name not in OPTIONS]
    if unknown:
        raise TypeError(
            f"{unknown[0]}: not a sampler option (a field of SamplerSettings: {OPTIONS})"
        )
    settings = SamplerSettings() if settings is None else settings
    return dataclasses.replace(settings, **options) if options else settings


def nfe(sampler: str, num_steps: int, timesteps=None) -> int:
    """`SamplerSettings(sampler=, num_steps=, timesteps=).nfe`."""
    return SamplerSettings(sampler=sampler, num_steps=num_steps, timesteps=timesteps).nfe


def _require(ok: bool, option: str, text: str) -> None:
    if not ok:
        raise SettingError(option, text)


def _choice(option: str, value, choices: tuple) -> None:
    _require(value in choices, option, f"unknown {value!r}; choose one of {choices}")


def _concrete(value):
    """A number's value, or None for a traced one (checked where it is known)."""
    try:
        return float(value)
    except TypeError:  # jax.errors.ConcretizationTypeError is one
        return None
