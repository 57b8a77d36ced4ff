"""pytorch-fid's Inception weights (.pth) as a plain .npz, read without torch.

python -m diffusion_jax.tools.inception_weights pt_inception-2015-12-05-6726825d.pth OUT.npz
"""

from __future__ import annotations

import sys

import numpy as np

from diffusion_jax.evaluation import inception


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or not argv[1].endswith(".npz"):
        print(
            "usage: python -m diffusion_jax.tools.inception_weights "
            "pt_inception-2015-12-05-6726825d.pth OUT.npz"
        )
        return 2
    state = inception.load_state_dict(argv[0])
    inception.params_from_state_dict(state)  # validates every tensor before writing
    np.savez(argv[1], **{k: v for k, v in state.items() if not k.endswith("num_batches_tracked")})
    print(f"wrote {argv[1]} ({len(state)} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
