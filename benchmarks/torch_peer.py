"""The PyTorch peer on the same CPU: diffusers' UNet2DModel with the DDPM CIFAR-10 settings,
trained eagerly with Adam (the step of the original code: eps MSE at a uniform t), and a
20-step DDIM sample. Runs in its own environment with torch and diffusers (not dependencies
of this project); prints JSON lines like the JAX benchmarks.

    python -m venv /tmp/peer && /tmp/peer/bin/pip install torch diffusers
    PYTHONPATH=. /tmp/peer/bin/python benchmarks/torch_peer.py --batch=16 --steps=5
    PYTHONPATH=. /tmp/peer/bin/python benchmarks/torch_peer.py --only_train
    PYTHONPATH=. /tmp/peer/bin/python benchmarks/torch_peer.py --only_sample  # whole process
"""

import argparse
import json
import time

import diffusers
import torch
from diffusers import DDIMScheduler, UNet2DModel

from benchmarks.timing import time_calls


def main():
    start = time.perf_counter()
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sample_batch", type=int, default=32)
    parser.add_argument("--sample_steps", type=int, default=20)
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--only_train", action="store_true")
    only.add_argument("--only_sample", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_eps=1e-6,
        dropout=0.1,
        attention_head_dim=None,
    )
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    betas = torch.linspace(1e-4, 0.02, 1000)
    abar = torch.cumprod(1 - betas, 0)
    x0 = torch.rand(args.batch, 3, 32, 32) * 2 - 1
    common = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(),
    }

    if not args.only_sample:

        def step():
            t = torch.randint(0, 1000, (args.batch,))
            noise = torch.randn_like(x0)
            a = abar[t].view(-1, 1, 1, 1)
            loss = ((model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t).sample - noise) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

        model.train()
        median, _ = time_calls(step, args.steps)
        print(
            json.dumps(
                {
                    "benchmark": "torch_train_step",
                    "batch": args.batch,
                    "images_per_sec": round(args.batch / median, 3),
                    "steps_per_sec": round(1 / median, 4),
                    **common,
                }
            ),
            flush=True,
        )

    if not args.only_train:
        model.eval()
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        scheduler.set_timesteps(args.sample_steps)
        t0 = time.perf_counter()
        with torch.no_grad():
            x = torch.randn(args.sample_batch, 3, 32, 32)
            for t in scheduler.timesteps:
                x = scheduler.step(model(x, t).sample, t, x).prev_sample
        sample_s = time.perf_counter() - t0
        print(
            json.dumps(
                {
                    "benchmark": "torch_sample_ddim",
                    "batch": args.sample_batch,
                    "steps": args.sample_steps,
                    "seconds": round(sample_s, 3),
                    "whole_process_seconds": round(time.perf_counter() - start, 3),
                    **common,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
