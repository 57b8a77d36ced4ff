"""Latent diffusion trained end to end on the digits: the autoencoder through the common
train loop, latents encoded once, a class-conditional cross-attention U-Net on them, samples
decoded and read by the shipped digits classifier; a resumed latent run."""

import json
import shutil

import jax
import numpy as np
import pytest
from test_cli import run_cli
from test_configs import load_config

from diffusion_jax import metrics_io
from diffusion_jax.data import latents
from diffusion_jax.evaluation import digits_classifier

# The two stages run as a user runs them (the command line, one CPU device), shrunk by
# measurement to about a minute each on 2 cores.
AUTOENCODER_STEPS = 200
DIFFUSION_STEPS = 400
RESUME_FROM = 320  # the checkpoint a killed run left (the last before the end)
SMALL_AUTOENCODER = ["--config.autoencoder.ch=16", "--config.autoencoder.norm_groups=8"]


@pytest.fixture(scope="module")
def trained_autoencoder(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("digits_ae")
    result = run_cli(
        "--config=configs/digits_latent.py:autoencoder",
        f"--workdir={workdir}",
        *SMALL_AUTOENCODER,
        f"--config.training.num_steps={AUTOENCODER_STEPS}",
        f"--config.training.ckpt_every={AUTOENCODER_STEPS}",
        f"--config.training.sample_every={AUTOENCODER_STEPS}",
        "--config.optim.lr=0.002",
        "--config.optim.warmup_steps=50",
        "--config.eval.num_samples=256",
        fast_compile=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_autoencoder_reconstructs_far_better_than_the_blur_baseline(trained_autoencoder):
    workdir = trained_autoencoder
    scores = json.loads((workdir / "eval" / f"step_{AUTOENCODER_STEPS}.json").read_text())
    # Blurring to the 4x4 latent grid loses the strokes; the 4x4x4 latents keep them.
    mse, blur = scores["reconstruction_mse"], scores["blur_mse"]
    print(f"autoencoder: held-out reconstruction MSE {mse:.4f}, blur baseline {blur:.4f}")
    assert scores["reconstruction_mse"] < 0.2 * scores["blur_mse"], scores
    assert (workdir / "samples" / f"reconstructions_step_{AUTOENCODER_STEPS}.png").exists()
    rows = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_kl", "loss_reconstruction", "loss_mse"} <= set(rows[-1])


def small_diffusion_args(autoencoder_dir):
    return [
        f"--config.autoencoder.weights={autoencoder_dir}",
        *SMALL_AUTOENCODER,
        "--config.model.ch=32",
        "--config.model.num_res_blocks=1",
        "--config.model.context_dim=32",
        "--config.model.num_heads=2",
        "--config.model.dropout=0.0",
        "--config.model.attn_resolutions=(4,)",
        "--config.sampling.num_steps=25",
    ]


def diffusion_command(autoencoder_dir, workdir):
    return [
        "--config=configs/digits_latent.py",
        f"--workdir={workdir}",
        *small_diffusion_args(autoencoder_dir),
        f"--config.training.num_steps={DIFFUSION_STEPS}",
        f"--config.training.ckpt_every={RESUME_FROM}",
        f"--config.training.sample_every={DIFFUSION_STEPS}",
        "--config.training.eval_at_end=False",
        "--config.optim.warmup_steps=50",
    ]


@pytest.fixture(scope="module")
def trained_latent_diffusion(trained_autoencoder, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("digits_ldm")
    result = run_cli(*diffusion_command(trained_autoencoder, workdir), fast_compile=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_latents_are_encoded_once_with_labels(trained_latent_diffusion):
    workdir, result = trained_latent_diffusion
    assert "encoding the training split once" in result.stderr
    config = load_config("digits_latent.py")
    config.data.latents = str(workdir / "latents")
    data = latents.load_latents(config, "train")
    assert data["image"].shape[1:] == (4, 4, 4)
    assert len(data["image"]) == len(data["label"]) > 1000
    # scaling_factor brings the latents near unit variance, as the diffusion prior assumes.
    assert 0.5 < data["image"].std() < 2.0


def test_latent_samples_decode_to_the_requested_digits(trained_latent_diffusion):
    workdir, _ = trained_latent_diffusion
    # The final grid: 10 guided samples of each digit.
    samples = np.load(workdir / "samples" / f"step_{DIFFUSION_STEPS}.npz")
    images, labels = samples["arr_0"], samples["labels"]
    assert images.shape == (100, 16, 16, 1) and np.bincount(labels).tolist() == [10] * 10
    params = digits_classifier.load_params()
    _, logits = digits_classifier.features_and_logits(params, metrics_io.from_uint8(images))
    accuracy = float((np.asarray(logits).argmax(-1) == labels).mean())
    print(f"latent diffusion: {accuracy:.0%} of samples classified as their label (chance 10%)")
    assert accuracy > 0.3
    assert (workdir / "samples" / f"step_{DIFFUSION_STEPS}.png").exists()


def saved_state(workdir, step):
    """The whole TrainState pytree of a checkpoint, as saved."""
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")


def test_resumed_latent_run_equals_uninterrupted(
    trained_autoencoder, trained_latent_diffusion, tmp_path
):
    """The run above, killed after its step-320 checkpoint and started again with the same
    command, ends with the same state as the run that was never stopped."""
    workdir, _ = trained_latent_diffusion
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed, ignore=shutil.ignore_patterns(str(DIFFUSION_STEPS)))
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir() if p.name.isdigit()) == [
        str(RESUME_FROM)
    ]
    result = run_cli(*diffusion_command(trained_autoencoder, resumed), fast_compile=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "encoding" not in result.stderr  # the latents of the first run are reused
    whole, again = saved_state(workdir, DIFFUSION_STEPS), saved_state(resumed, DIFFUSION_STEPS)
    jax.tree.map(np.testing.assert_array_equal, whole, again)


def test_a_dit_trains_on_the_same_latents(trained_autoencoder, trained_latent_diffusion, tmp_path):
    """model.arch=dit on the latents the U-Net run encoded: the same trainer, checkpoints and
    decoded sample grid (one 1x1 patch per latent pixel, labels through adaLN)."""
    ldm_dir, _ = trained_latent_diffusion
    steps = 20
    result = run_cli(
        "--config=configs/digits_latent.py",
        f"--workdir={tmp_path}",
        f"--config.autoencoder.weights={trained_autoencoder}",
        *SMALL_AUTOENCODER,
        f"--config.data.latents={ldm_dir / 'latents'}",
        "--config.model.arch=dit",
        "--config.model.context_dim=0",
        "--config.model.dit.patch_size=1",
        "--config.model.dit.hidden_size=32",
        "--config.model.dit.depth=2",
        "--config.model.dit.num_heads=2",
        f"--config.training.num_steps={steps}",
        f"--config.training.ckpt_every={steps}",
        f"--config.training.sample_every={steps}",
        "--config.training.eval_at_end=False",
        "--config.sampling.num_steps=5",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "encoding" not in result.stderr  # the U-Net run's latents serve
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["arch"] == "dit"
    assert (tmp_path / "checkpoints" / str(steps)).is_dir()
    samples = np.load(tmp_path / "samples" / f"step_{steps}.npz")
    assert samples["arr_0"].shape == (100, 16, 16, 1)  # decoded from 4x4x4 latents
    assert np.bincount(samples["labels"]).tolist() == [10] * 10
