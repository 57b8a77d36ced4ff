"""Stable Diffusion 2.x text-to-image sampling from a local diffusers folder (768-v: 2.0 or
2.1 at 768x768 with v-prediction; the 512 "base" models work the same way).

    diffusion-jax --config=configs/sd2_sample.py --workdir=runs/sd2 --mode=sample \\
        --config.pretrained=/path/to/stable-diffusion-2-1 \\
        --config.sampling.prompt="a photograph of an astronaut riding a horse"

As configs/sd15_sample.py, with 2.x's differences read from the folder: the U-Net's linear
projections, per-block attention_head_dim and upcast_attention (unet/config.json); the
OpenCLIP ViT-H text encoder as diffusers ships it (gelu, 23 layers, the last hidden state
of the penultimate block; text_encoder/config.json) and its tokenizer, which pads with "!";
v-prediction, set_alpha_to_one=false and steps_offset=1 (scheduler/scheduler_config.json).
Unset sampling conventions follow that scheduler config as diffusers does;
--config.sampling.<field>=... overrides any of them. Writes samples/prompt_<N>.png, .npz
and .json.

Args: `dpm` samples with DPM-Solver++(2M) in 25 steps instead of DDIM in 50; `euler` with
Euler in 30.
"""

from diffusion_jax.config import base_config
from diffusion_jax.recipes import parse_arg, text_to_image_sampling


def get_config(arg: str = ""):
    options = parse_arg(arg, allowed=("dpm", "euler"))
    c = base_config()
    c.pretrained = "stable-diffusion-2-1"
    # What the pipeline folder describes for 2.x (768-v); read from it at sampling time.
    c.data.dataset, c.data.image_size, c.data.channels, c.data.num_classes = "synthetic", 768, 3, 0
    c.autoencoder.ch_mult = (1, 2, 4, 4)
    m = c.model
    m.ch, m.ch_mult, m.attn_resolutions = 320, (1, 2, 4, 4), (96, 48, 24)
    m.context_dim, m.context_source, m.num_heads, m.head_channels = 1024, "text", 1, 64
    m.linear_projection = True
    te = c.text_encoder
    te.width, te.num_layers, te.num_heads, te.mlp_dim, te.activation = 1024, 23, 16, 4096, "gelu"
    f = c.diffusion
    f.schedule, f.beta_start, f.beta_end, f.prediction = "scaled_linear", 0.00085, 0.012, "v"

    text_to_image_sampling(c, options)
    return c
