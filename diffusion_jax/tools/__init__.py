"""Command-line programs; the library modules they call keep no `main`.

    python -m diffusion_jax.tools.convert SOURCE OUT.msgpack [VAE_FOLDER]
        A diffusers UNet2DModel folder, a DiT (DiTPipeline folder, or the original
        repository's .pt) -> parameters + config for `--mode=sample|eval`.
    python -m diffusion_jax.tools.reference_stats --config=configs/cifar10.py \\
        (--split=train | --folder=my_images/) --out=stats.npz \\
        --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth
        FID reference statistics (mu, sigma, features) of a tfds split or an image folder.
    python -m diffusion_jax.tools.digits_classifier
        Retrains the digits classifier behind `digits_fd` and rewrites its bundled weights
        (diffusion_jax/evaluation/digits_classifier.msgpack).
    python -m diffusion_jax.tools.inception_weights pt_inception-2015-12-05-6726825d.pth OUT.npz
        pytorch-fid's Inception weights (.pth) as a plain .npz, read without torch.
"""
