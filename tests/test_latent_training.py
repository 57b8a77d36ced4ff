"""Latent diffusion trained end to end on the digits: the autoencoder through the common
train loop, latents encoded once, a class-conditional cross-attention U-Net on them, samples
decoded and read by the shipped digits classifier; resume and sharding equivalence."""

import json

import jax
import numpy as np
import pytest
from helpers import override
from test_configs import load_config
from test_training import batch_for, small_config, train

from diffusion_jax import latents
from diffusion_jax.evaluation import digits_classifier, evaluate, sampling
from diffusion_jax.training import loop

# Sized by measurement on 2 CPU cores with 8 fake devices: about a minute for both runs.
AUTOENCODER_STEPS = 400
DIFFUSION_STEPS = 600


def autoencoder_config():
    c = load_config("digits_latent.py", "autoencoder")
    a = c.autoencoder
    a.ch, a.norm_groups = 16, 8
    t = c.training
    t.batch_size, t.num_steps, t.eval_at_end = 64, AUTOENCODER_STEPS, False
    t.log_every, t.ckpt_every, t.sample_every = 100, AUTOENCODER_STEPS, AUTOENCODER_STEPS
    c.optim.lr, c.optim.warmup_steps = 2e-3, 50
    c.eval.num_samples = 256
    return c


def diffusion_config(autoencoder_dir, **overrides):
    c = load_config("digits_latent.py")
    c.autoencoder.ch, c.autoencoder.norm_groups = 16, 8
    c.autoencoder.weights = str(autoencoder_dir)
    m = c.model
    m.ch, m.num_res_blocks, m.context_dim, m.num_heads, m.dropout = 32, 1, 32, 2, 0.0
    t = c.training
    t.batch_size, t.num_steps, t.eval_at_end = 64, DIFFUSION_STEPS, False
    t.log_every, t.ckpt_every, t.sample_every = 100, DIFFUSION_STEPS, DIFFUSION_STEPS
    c.optim.warmup_steps = 50
    c.sampling.num_steps = 25
    return override(c, **overrides)


@pytest.fixture(scope="module")
def trained_autoencoder(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("digits_ae")
    config = autoencoder_config()
    state = loop.train_and_evaluate(config, workdir)
    run = loop.setup_run(config, loop.run_keys(config)[0])
    scores = evaluate.reconstruction_scores(config, run, state.ema_params)
    return workdir, scores


def test_autoencoder_reconstructs_far_better_than_the_blur_baseline(trained_autoencoder):
    workdir, scores = trained_autoencoder
    # Blurring to the 4x4 latent grid loses the strokes; the 4x4x4 latents keep them.
    assert scores["reconstruction_mse"] < 0.3 * scores["blur_mse"], scores
    assert (workdir / "samples" / f"reconstructions_step_{AUTOENCODER_STEPS}.png").exists()
    rows = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_kl", "loss_reconstruction", "loss_mse"} <= set(rows[-1])


@pytest.fixture(scope="module")
def trained_latent_diffusion(trained_autoencoder, tmp_path_factory):
    ae_dir, _ = trained_autoencoder
    workdir = tmp_path_factory.mktemp("digits_ldm")
    config = diffusion_config(ae_dir)
    state = loop.train_and_evaluate(config, workdir)
    return config, workdir, state


def test_latents_are_encoded_once_with_labels(trained_latent_diffusion):
    config, workdir, _ = trained_latent_diffusion
    shards = sorted((workdir / "latents").glob("train-*.npz"))
    assert shards and (workdir / "latents" / "train-meta.json").exists()
    data = latents.load_latents(latents.with_latents_dir(config, workdir), "train")
    assert data["image"].shape[1:] == (4, 4, 4)
    assert len(data["image"]) == len(data["label"]) > 1000
    # scaling_factor brings the latents near unit variance, as the diffusion prior assumes.
    assert 0.5 < data["image"].std() < 2.0


def test_latent_samples_decode_to_the_requested_digits(trained_latent_diffusion):
    config, workdir, state = trained_latent_diffusion
    run = loop.setup_run(config, loop.run_keys(config)[0])
    num = 200
    labels = np.arange(num) % 10
    images = evaluate.generate(
        config, run, state.ema_params, num, jax.random.key(7), labels=labels.astype(np.int32)
    )
    assert images.shape == (num, 16, 16, 1) and images.dtype == np.uint8
    params = digits_classifier.load_params()
    _, logits = digits_classifier.features_and_logits(params, evaluate.uint8_to_model_range(images))
    accuracy = float((np.asarray(logits).argmax(-1) == labels).mean())
    print(f"latent diffusion: {accuracy:.0%} of samples classified as their label (chance 10%)")
    assert accuracy > 0.3
    assert (workdir / "samples" / f"step_{DIFFUSION_STEPS}.png").exists()


def test_resumed_latent_run_equals_uninterrupted(trained_autoencoder, tmp_path):
    ae_dir, _ = trained_autoencoder
    config = diffusion_config(
        ae_dir, **{"training.num_steps": 4, "training.ckpt_every": 2, "training.sample_every": 4}
    )
    whole = loop.train_and_evaluate(config, tmp_path / "whole")
    config.training.num_steps = 2
    loop.train_and_evaluate(config, tmp_path / "parts")
    config.training.num_steps = 4
    resumed = loop.train_and_evaluate(config, tmp_path / "parts")
    jax.tree.map(np.testing.assert_array_equal, whole.params, resumed.params)
    jax.tree.map(np.testing.assert_array_equal, whole.ema_params, resumed.ema_params)


def test_latent_samples_are_decoded_images(trained_autoencoder):
    ae_dir, _ = trained_autoencoder
    config = diffusion_config(ae_dir)
    run = loop.setup_run(config, loop.run_keys(config)[0])
    params = run.init_state(loop.run_keys(config)[0]).ema_params
    out = run.sample_fn()(params, jax.random.key(0), None, 8)
    assert out.shape == (8, 16, 16, 1)
    assert float(np.abs(sampling.gather(out)).max()) <= 1.0


@pytest.mark.parametrize("source", ["text", "autoencoder"])
def test_sharded_step_equals_single_device(source):
    if source == "text":
        config = small_config(
            **{"model.context_dim": 6, "model.context_source": "text", "model.context_length": 3}
        )
    else:
        config = small_config(**{"training.objective": "autoencoder"})
        a = config.autoencoder
        a.ch, a.ch_mult, a.num_res_blocks, a.latent_channels, a.norm_groups = 8, (1, 2), 1, 2, 4
    batches = []
    for seed in (0, 1):
        b = batch_for(config, seed)
        if source == "text":
            b["context"] = np.random.default_rng(seed).normal(size=(16, 3, 6)).astype(np.float32)
        batches.append(b)
    ref_state, ref_metrics, _ = train(config, jax.devices()[:1], batches)
    config.mesh.data, config.mesh.fsdp = 4, 2
    state, metrics, _ = train(config, jax.devices(), batches)
    for m, r in zip(metrics, ref_metrics, strict=True):
        np.testing.assert_allclose(m["loss"], r["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_captions_become_text_contexts_for_training_and_sampling(tmp_path):
    """An image folder with <image>.txt captions, Stable Diffusion's VAE and text encoder
    layout (the tiny fixture): encoded once to latents + CLIP contexts, trained on, and
    sampled from a prompt."""
    from PIL import Image

    from diffusion_jax.config import base_config
    from diffusion_jax.prompts import PromptEncoder

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    words = ["a red square", "a blue circle", "two green lines"]
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(words[i % 3])
    c = base_config()
    c.data.dataset, c.data.data_dir, c.data.image_size, c.data.channels = (
        "folder",
        str(images),
        16,
        3,
    )
    a = c.autoencoder
    a.weights = "tests/fixtures/tiny_sd/vae"
    a.ch, a.ch_mult, a.num_res_blocks, a.latent_channels, a.norm_groups = 8, (1, 2), 1, 4, 4
    a.scaling_factor = 0.5
    c.text_encoder.weights = "tests/fixtures/tiny_sd"
    m = c.model
    m.ch, m.ch_mult, m.attn_resolutions, m.norm_groups, m.num_heads = 8, (1, 2), (8,), 4, 2
    m.context_dim, m.context_source, m.context_length = 16, "text", 77
    t = c.training
    t.batch_size, t.num_steps, t.log_every, t.ckpt_every, t.sample_every = 8, 2, 1, 2, 2
    s = c.sampling
    s.num_steps, s.num_samples, s.batch_size, s.clip_denoised = 3, 8, 8, False
    state = loop.train_and_evaluate(c, tmp_path / "run")
    assert int(state.step) == 2

    shards = sorted((tmp_path / "run" / "latents").glob("train-*.npz"))
    data = np.load(shards[0])
    assert data["latent"].shape[1:] == (8, 8, 4) and data["context"].shape[1:] == (77, 16)
    encoder = PromptEncoder.from_folder("tests/fixtures/tiny_sd")
    # The folder's train split: files in name order, less every 20th (the test split).
    names = sorted(f.name for f in images.glob("*.png"))
    train = [n for j, n in enumerate(names) if j % 20 != 0]
    expected = [words[int(n.split(".")[0]) % 3] for n in train[:4]]
    np.testing.assert_allclose(data["context"][:4], encoder(expected), atol=1e-5)

    s.prompt = "a red square"
    path = evaluate.sample(c, tmp_path / "run")
    assert np.load(path.with_suffix(".npz"))["arr_0"].shape == (8, 16, 16, 3)
