"""python -m diffusion_jax.tools.convert DIFFUSERS_FOLDER OUT.msgpack

Writes the parameters and the config of the diffusers UNet2DModel in DIFFUSERS_FOLDER
(config.json + diffusion_pytorch_model.safetensors) to OUT.msgpack, for `--mode=sample|eval`.
"""

from __future__ import annotations

import sys

import jax

from diffusion_jax import export
from diffusion_jax.models.convert import from_diffusers


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m diffusion_jax.tools.convert DIFFUSERS_FOLDER OUT.msgpack")
        return 2
    params, config = from_diffusers(argv[0])
    export.save_params(argv[1], params, config)
    print(f"wrote {argv[1]} ({sum(x.size for x in jax.tree.leaves(params)):,} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
