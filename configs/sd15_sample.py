"""Stable Diffusion v1.x text-to-image sampling from a local diffusers folder.

    diffusion-jax --config=configs/sd15_sample.py --workdir=runs/sd15 --mode=sample \\
        --config.pretrained=/path/to/stable-diffusion-v1-5 \\
        --config.sampling.prompt="a photograph of an astronaut riding a horse"

The folder is the pipeline as `save_pretrained` writes it (or as the Hub holds it):
model_index.json, unet/ (UNet2DConditionModel), vae/ (AutoencoderKL), text_encoder/
(CLIPTextModel, model.safetensors), tokenizer/ (tokenizer.json, or vocab.json + merges.txt)
and scheduler/. Their config.json files replace this file's model, diffusion, autoencoder
and text_encoder sections; the sampling section and training.seed are this file's. The
scheduler conventions this file leaves unset (spacing, steps_offset, final_sigmas_type,
use_karras_sigmas, solver_order, lower_order_final, clip_denoised) follow the folder's
scheduler/scheduler_config.json as diffusers' scheduler class for the chosen sampler reads
it, so a prompt, seed latents and step count give diffusers' picture;
--config.sampling.<field>=... overrides any of them. Writes samples/prompt_<N>.png, .npz
(uint8 images) and .json (prompt and settings).

Args: `dpm` samples with DPM-Solver++(2M) in 25 steps instead of DDIM in 50; `euler` with
Euler in 30.
"""

from diffusion_jax.config import base_config
from diffusion_jax.recipes import parse_arg, text_to_image_sampling


def get_config(arg: str = ""):
    options = parse_arg(arg, allowed=("dpm", "euler"))
    c = base_config()
    c.pretrained = "stable-diffusion-v1-5"
    # What the pipeline folder describes for v1.x; read from it at sampling time.
    c.data.dataset, c.data.image_size, c.data.channels, c.data.num_classes = "synthetic", 512, 3, 0
    c.autoencoder.ch_mult = (1, 2, 4, 4)
    c.model.ch, c.model.ch_mult, c.model.attn_resolutions = 320, (1, 2, 4, 4), (64, 32, 16)
    c.model.context_dim, c.model.context_source, c.model.num_heads = 768, "text", 8
    c.diffusion.schedule, c.diffusion.beta_start, c.diffusion.beta_end = (
        "scaled_linear",
        0.00085,
        0.012,
    )

    text_to_image_sampling(c, options)
    return c
