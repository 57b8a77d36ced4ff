"""Import and export of weights in the diffusers / transformers layouts, and of the original
DiT repository's `.pt` files.

A diffusers folder holds `config.json` and `diffusion_pytorch_model.safetensors` (and, for a
pipeline, `scheduler_config.json` beside it or in `../scheduler/`). The published DDPM
checkpoints (google/ddpm-cifar10-32, ddpm-celebahq-256, ddpm-church-256, ddpm-bedroom-256)
are UNet2DModels; Stable Diffusion's `unet/` is a UNet2DConditionModel, its `vae/` an
AutoencoderKL and its `text_encoder/` a transformers CLIPTextModel (`model.safetensors`).
A DiTPipeline folder (facebook/DiT-XL-2-256) holds `transformer/` (a
DiTTransformer2DModel), `vae/` and `scheduler/`. Tensors are read with safetensors' NumPy
API, `.pt` / `.pth` files with a restricted unpickler: no torch at run time.

    layout.py        tensor names and the Flax <-> torch layouts, shared by every family
    unet.py          UNet2DModel / UNet2DConditionModel <-> the U-Net
    autoencoder.py   AutoencoderKL <-> the KL autoencoder
    text_encoder.py  transformers' CLIPTextModel <-> CLIP's text encoder
    pipeline.py      a Stable Diffusion pipeline folder: all three at once (from_pipeline,
                     to_pipeline)
    loader.py        from_diffusers(folder): any of these folders, by its _class_name
    scheduler.py     scheduler_config.json <-> the sampling settings (as diffusers reads it)
    dit.py           DiTTransformer2DModel / DiTPipeline and the original DiT .pt <-> the DiT
    torch_pickle.py  PyTorch .pt / .pth files read into NumPy without torch

The command-line converter is `diffusion_jax.tools.convert`.
"""

from diffusion_jax.models.convert import torch_pickle
from diffusion_jax.models.convert.autoencoder import (
    autoencoder_fields_from_diffusers,
    autoencoder_from_diffusers,
    autoencoder_to_diffusers,
)
from diffusion_jax.models.convert.dit import from_diffusers as dit_from_diffusers
from diffusion_jax.models.convert.dit import from_original as dit_from_original
from diffusion_jax.models.convert.dit import to_diffusers as dit_to_diffusers
from diffusion_jax.models.convert.layout import (
    LEGACY_ATTENTION,
    WEIGHTS_FILE,
    diffusers_name,
    from_torch_layout,
    match_tensors,
    to_torch_layout,
    torch_tensors,
)
from diffusion_jax.models.convert.loader import from_diffusers, model_config_from_diffusers
from diffusion_jax.models.convert.pipeline import (
    describe_pipeline,
    finetune_config,
    from_pipeline,
    pipeline_sampling,
    text_to_image_config,
    to_pipeline,
)
from diffusion_jax.models.convert.scheduler import (
    read_scheduler_config,
    sampling_from_scheduler,
    scheduler_config,
)
from diffusion_jax.models.convert.text_encoder import (
    TEXT_ENCODER_FILE,
    TEXT_PREFIX,
    text_encoder_fields,
    text_encoder_from_transformers,
    text_encoder_to_transformers,
)
from diffusion_jax.models.convert.unet import (
    DOWN_BLOCKS,
    UNSUPPORTED_CONDITION_OPTIONS,
    UP_BLOCKS,
    diffusers_config,
    params_from_tensors,
    to_diffusers,
)

__all__ = [
    "DOWN_BLOCKS",
    "LEGACY_ATTENTION",
    "TEXT_ENCODER_FILE",
    "TEXT_PREFIX",
    "UNSUPPORTED_CONDITION_OPTIONS",
    "UP_BLOCKS",
    "WEIGHTS_FILE",
    "autoencoder_fields_from_diffusers",
    "autoencoder_from_diffusers",
    "autoencoder_to_diffusers",
    "diffusers_config",
    "describe_pipeline",
    "diffusers_name",
    "dit_from_diffusers",
    "dit_from_original",
    "dit_to_diffusers",
    "finetune_config",
    "from_diffusers",
    "from_pipeline",
    "pipeline_sampling",
    "text_to_image_config",
    "from_torch_layout",
    "match_tensors",
    "model_config_from_diffusers",
    "params_from_tensors",
    "read_scheduler_config",
    "sampling_from_scheduler",
    "scheduler_config",
    "text_encoder_fields",
    "text_encoder_from_transformers",
    "text_encoder_to_transformers",
    "to_diffusers",
    "to_pipeline",
    "to_torch_layout",
    "torch_pickle",
    "torch_tensors",
]
