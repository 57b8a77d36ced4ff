"""The convolutions of the CIFAR-10 U-Net one by one, forward and forward + backward, in JAX
or (in the peer's environment) in PyTorch: where a step's time goes, shape by shape.

    PYTHONPATH=. python benchmarks/convolutions.py
    PYTHONPATH=. /tmp/peer/bin/python benchmarks/convolutions.py --framework=torch

One JSON line per shape: milliseconds (median of 5 after one warm-up call).
"""

from __future__ import annotations

import argparse
import json

from benchmarks.timing import time_calls

# (resolution, in channels, out channels, kernel, stride): the CIFAR-10 recipe's layers.
SHAPES = [
    (32, 3, 128, 3, 1),
    (32, 128, 128, 3, 1),
    (32, 128, 128, 3, 2),
    (16, 128, 256, 3, 1),
    (16, 256, 256, 3, 1),
    (8, 256, 256, 3, 1),
    (4, 256, 256, 3, 1),
    (32, 384, 128, 3, 1),
    (32, 256, 128, 3, 1),
    (16, 512, 256, 3, 1),
    (32, 384, 128, 1, 1),
    (16, 512, 256, 1, 1),
]


def median_ms(fn, repeats: int = 5) -> float:
    return 1e3 * time_calls(fn, repeats, warmup=1)[0]


def jax_functions(batch, size, c_in, c_out, kernel, stride):
    import jax
    import jax.numpy as jnp

    from diffusion_jax.models import layers

    x = jax.random.normal(jax.random.key(0), (batch, size, size, c_in))
    module = layers.conv(c_out, "conv", kernel=kernel, strides=stride, dtype=jnp.float32)
    params = module.init(jax.random.key(1), x)
    forward = jax.jit(module.apply)
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(module.apply(p, x) ** 2), argnums=(0, 1)))
    return (
        lambda: forward(params, x).block_until_ready(),
        lambda: jax.block_until_ready(grad(params, x)),
        {"jax": jax.__version__},
    )


def torch_functions(batch, size, c_in, c_out, kernel, stride):
    import torch

    x = torch.randn(batch, c_in, size, size, requires_grad=True)
    conv = torch.nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2)

    def forward():
        with torch.no_grad():
            conv(x)

    def forward_backward():
        (conv(x) ** 2).sum().backward()

    return (
        forward,
        forward_backward,
        {"torch": torch.__version__, "threads": torch.get_num_threads()},
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--framework", choices=["jax", "torch"], default="jax")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    make = jax_functions if args.framework == "jax" else torch_functions
    for size, c_in, c_out, kernel, stride in SHAPES:
        forward, forward_backward, versions = make(args.batch, size, c_in, c_out, kernel, stride)
        row = {
            "benchmark": "convolution",
            "framework": args.framework,
            "batch": args.batch,
            "shape": f"{size}x{size} {c_in}->{c_out} k{kernel} s{stride}",
            "forward_ms": round(median_ms(forward), 2),
            "forward_backward_ms": round(median_ms(forward_backward), 2),
            **versions,
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
