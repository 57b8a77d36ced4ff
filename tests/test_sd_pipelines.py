"""A pipeline folder's scheduler config governs sampling: with no override, the same folder,
prompt, negative prompt, guidance, step count and initial latents give diffusers'
StableDiffusionPipeline picture for DDIM, DPM-Solver++ (2M) and Euler, on seeded pipelines
shaped like Stable Diffusion v1.5 and 2.x (768-v) (tests/fixtures/make_sd_pipelines.py).

The scheduler rules themselves (spacings, offsets, final levels, orders, Karras sigmas,
clipping) are checked case by case against diffusers' schedulers stepping a closed-form
toy model, which compiles in a moment; the pipelines then check that folder, prompt and
networks come together as diffusers' do."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion_jax import config as config_lib
from diffusion_jax import diffusion as dm
from diffusion_jax import preflight
from diffusion_jax.config import base_config
from diffusion_jax.jobs import sample as sample_lib
from diffusion_jax.models import convert, create_unet
from diffusion_jax.models.prompts import PromptEncoder
from diffusion_jax.run import schedule_from_config

FIXTURES = Path(__file__).parent / "fixtures"
SAMPLERS = {"ddim": "ddim", "dpm": "dpm_solver++", "euler": "euler"}


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURES / "sd_pipelines.npz"))


def toy_model(x, t, labels):
    """The fixture's stand-in denoiser: 0.6 tanh(x) cos(t / 300) + 0.1 x."""
    t = t.astype(x.dtype)[:, None]
    return 0.6 * jnp.tanh(x) * jnp.cos(t / 300.0) + 0.1 * x


def run_config(scheduler: dict, sampler: str, steps) -> tuple:
    """(config, sampling) of a latent run whose folder holds `scheduler`, resolved as
    --mode=sample resolves a pipeline's; steps: a count or explicit timesteps."""
    config = base_config()
    config.pretrained = "folder"  # a latent run: clip_denoised defaults to the folder's
    f = config.diffusion
    f.schedule, f.beta_start, f.beta_end = "scaled_linear", scheduler["beta_start"], 0.012
    f.prediction = {"epsilon": "eps", "v_prediction": "v"}[
        scheduler.get("prediction_type", "epsilon")
    ]
    s = config.sampling
    s.sampler = sampler
    if isinstance(steps, list):
        s.timesteps = tuple(steps)
    else:
        s.num_steps = int(steps)
    implied = convert.sampling_from_scheduler(scheduler, sampler)
    return config, config_lib.resolved_sampling(config, implied)


TOY_CASES = [
    "ddim_sd15",
    "ddim_sd2",
    "ddim_trailing",
    "ddim_linspace",
    "ddim_alpha_one",
    "ddim_clip",
    "dpm_sd15",
    "dpm_sd2",
    "dpm_leading",
    "dpm_trailing",
    "dpm_3m",
    "dpm_3m_no_lower",
    "dpm_sigma_min",
    "dpm_sigma_min_no_lower",
    "dpm_karras",
    "dpm_order1",
    "dpm_explicit",
    "euler_sd15",
    "euler_sd2",
    "euler_leading",
    "euler_trailing",
    "euler_karras",
    "euler_karras_leading",
    "euler_sigma_min",
    "euler_explicit",
]


@pytest.mark.parametrize("case", TOY_CASES)
def test_scheduler_rules_equal_diffusers_schedulers(reference, case):
    scheduler = json.loads(str(reference[f"toy_{case}_config"]))
    steps = reference[f"toy_{case}_steps"].tolist()
    config, sampling = run_config(scheduler, SAMPLERS[case.split("_")[0]], steps)
    settings = config_lib.sample_settings(config, sampling)
    grid = dm.sampling_grid(
        schedule_from_config(config),
        settings.sampler,
        len(reference[f"toy_{case}_timesteps"]),
        spacing=settings.spacing or dm.default_spacing(settings.sampler, "diffusers"),
        steps_offset=settings.steps_offset,
        timesteps=settings.timesteps,
        karras_sigmas=settings.karras_sigmas,
        conventions=dm.conventions_for("diffusers", settings.sampler),
    )
    np.testing.assert_allclose(grid[0], reference[f"toy_{case}_timesteps"], rtol=1e-4, atol=1e-3)
    out = dm.sample(
        toy_model,
        schedule_from_config(config),
        jax.random.key(0),
        x_T=jnp.asarray(reference["toy_noise"]),
        settings=settings,
    )
    theirs = reference[f"toy_{case}_sample"]
    np.testing.assert_allclose(out, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


def test_the_rules_come_from_the_folder_and_overrides_win(reference):
    """v1.5's folder, read for each sampler as diffusers' class for it reads the file."""
    scheduler = json.loads(str(reference["toy_ddim_sd15_config"]))
    _, ddim = run_config(scheduler, "ddim", 6)
    assert (ddim.spacing, ddim.steps_offset, ddim.final_sigmas_type) == ("leading", 1, "sigma_min")
    assert (ddim.clip_denoised, ddim.conventions) == (False, "diffusers")
    _, dpm = run_config(scheduler, "dpm_solver++", 6)
    assert (dpm.spacing, dpm.final_sigmas_type, dpm.solver_order) == ("linspace", "zero", 2)
    assert dpm.lower_order_final is True and dpm.use_karras_sigmas is False
    config, _ = run_config(scheduler, "ddim", 6)
    config.sampling.final_sigmas_type, config.sampling.spacing = "zero", "trailing"
    config.sampling.steps_offset = 0
    s = config_lib.resolved_sampling(config, convert.sampling_from_scheduler(scheduler, "ddim"))
    assert (s.final_sigmas_type, s.spacing, s.steps_offset) == ("zero", "trailing", 0)
    # No folder: the project's own defaults.
    plain = config_lib.resolved_sampling(base_config())
    assert (plain.conventions, plain.final_sigmas_type, plain.clip_denoised) == (
        "project",
        "zero",
        True,
    )
    with pytest.raises(ValueError, match="thresholding=True is not supported"):
        convert.sampling_from_scheduler({**scheduler, "thresholding": True}, "ddim")


# --- the pipelines ---------------------------------------------------------------------------


def pipeline_run(name, reference, sampler="ddim", **sampling):
    """The config a user gives: the folder, the prompts, guidance, steps, a sampler."""
    config = base_config()
    config.pretrained = str(FIXTURES / f"tiny_{name}")
    s = config.sampling
    s.prompt, s.negative_prompt = str(reference["prompt"]), str(reference["negative_prompt"])
    s.guidance_scale, s.num_steps = float(reference["guidance_scale"]), int(reference["num_steps"])
    s.sampler = sampler
    for key, value in sampling.items():
        s[key] = value
    return config


def picture(config, reference):
    """(the pipeline's config, its image (1, H, W, 3) in [0, 1] from the fixture's initial
    latents)."""
    config = preflight.resolve(config, None, "sample")
    generate = sample_lib.build_sampler(config)
    x_T = jnp.asarray(reference["latents"])
    x_T = jnp.concatenate([x_T] + [jnp.zeros_like(x_T)] * (generate.mesh.size - 1))
    images = generate(jax.random.key(0), generate.mesh.size, x_T)
    return config, (np.asarray(images[:1]) + 1.0) / 2.0


@pytest.mark.parametrize("name", ["sd15", "sd2"])
def test_text_to_image_equals_the_diffusers_pipeline(reference, name):
    """Prompt -> tokenizer (vocab.json + merges.txt for v1.5, tokenizer.json for 2.x) ->
    CLIP (quick_gelu; gelu) -> guided DDIM over the folder's rules (eps; v) -> VAE."""
    config, ours = picture(pipeline_run(name, reference), reference)
    m, te, s = config.model, config.text_encoder, config.sampling
    if name == "sd2":  # 2.x: linear projections, heads of 8 channels from [1, 2], v, gelu
        assert (m.linear_projection, m.head_channels, config.diffusion.prediction) == (True, 8, "v")
        assert (te.activation, te.num_layers) == ("gelu", 3)
    else:
        assert (m.linear_projection, m.num_heads, config.diffusion.prediction) == (False, 8, "eps")
    assert (s.spacing, s.steps_offset, s.final_sigmas_type) == ("leading", 1, "sigma_min")
    theirs = reference[f"{name}_ddim_image"]
    inside = (theirs > 0.01) & (theirs < 0.99)  # pixels the [0, 1] clamp leaves alone
    assert inside.mean() > 0.3
    np.testing.assert_allclose(ours, theirs, atol=2e-3)


@pytest.fixture(scope="module")
def sd15():
    """The v1.5 fixture's U-Net as a guided denoiser of the prompt against the negative
    prompt, shared by the samplers below (one compile each)."""
    params, config = convert.from_pipeline(FIXTURES / "tiny_sd15")
    reference = dict(np.load(FIXTURES / "sd_pipelines.npz"))
    contexts = PromptEncoder.from_folder(FIXTURES / "tiny_sd15")(
        [str(reference["prompt"]), str(reference["negative_prompt"])]
    )
    model = create_unet(config)

    def model_fn(x, t, context):
        context = jnp.asarray(contexts[1:2]) if context is None else context
        return model.apply({"params": params["unet"]}, x, t, None, train=False, context=context)

    return model_fn, jnp.asarray(contexts[:1]), config


@pytest.mark.parametrize(
    "case,sampler,overrides",
    [
        # --config.sampling.final_sigmas_type=zero: diffusers' set_alpha_to_one=True.
        ("ddim_alpha_one", "ddim", {"final_sigmas_type": "zero"}),
        ("dpm", "dpm_solver++", {}),
        ("dpm_explicit", "dpm_solver++", {"timesteps": "explicit"}),
        ("euler", "euler", {}),
        ("euler_karras", "euler", {"use_karras_sigmas": True}),
    ],
)
def test_pipeline_samplers_equal_diffusers(sd15, reference, case, sampler, overrides):
    model_fn, context, pipeline = sd15
    overrides = dict(overrides)
    if overrides.pop("timesteps", None):
        overrides["timesteps"] = tuple(reference["explicit_timesteps"].tolist())
    user = pipeline_run("sd15", reference, sampler, **overrides)
    # As --mode=sample merges them: the folder's model, the user's sampling section.
    merged = ml_collections.ConfigDict(pipeline.to_dict())
    merged.sampling = ml_collections.ConfigDict(user.sampling.to_dict())
    merged.sampling = convert.pipeline_sampling(merged, merged.pretrained)
    out = dm.sample(
        model_fn,
        schedule_from_config(merged),
        jax.random.key(0),
        x_T=jnp.asarray(reference["latents"]),
        labels=context,
        settings=config_lib.sample_settings(merged),
        guidance_scale=float(reference["guidance_scale"]),
    )
    theirs = reference[f"sd15_{case}_latents"]
    # Latents of random weights reach ~50; 2e-4 of that, as tight as the images' 2e-3 of 1.
    np.testing.assert_allclose(out, theirs, atol=2e-4 * np.abs(theirs).max())
