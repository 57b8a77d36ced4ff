"""python -m diffusion_jax.tools.convert SOURCE OUT.msgpack [VAE_FOLDER]

Writes the parameters and the config of SOURCE to OUT.msgpack, for `--mode=sample|eval`
(eval.params_file). SOURCE is a diffusers UNet2DModel folder (config.json +
diffusion_pytorch_model.safetensors), a DiT in diffusers' layout (a DiTPipeline folder such
as facebook/DiT-XL-2-256, whose vae/ the config then names, or its transformer/ alone), or
an original DiT repository `.pt` (DiT-XL-2-256x256.pt, or a train.py checkpoint's EMA);
VAE_FOLDER, a diffusers AutoencoderKL folder, makes the `.pt`'s config a latent run over it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax

from diffusion_jax import export
from diffusion_jax.models.convert import dit, from_diffusers


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3):
        print("usage: python -m diffusion_jax.tools.convert SOURCE OUT.msgpack [VAE_FOLDER]")
        return 2
    source, vae = Path(argv[0]), argv[2] if len(argv) == 3 else None
    if source.suffix in (".pt", ".pth"):
        params, config = dit.from_original(source, vae=vae)
    elif dit.is_dit_folder(source):
        params, config = dit.from_diffusers(source)
    else:
        params, config = from_diffusers(source)
    export.save_params(argv[1], params, config)
    print(f"wrote {argv[1]} ({sum(x.size for x in jax.tree.leaves(params)):,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
