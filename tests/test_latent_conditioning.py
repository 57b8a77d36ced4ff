"""Conditioning and sharding of the latent-diffusion pieces: the train step with a text
context and the autoencoder objective on 8 fake devices against one, and captions turned
into CLIP contexts at encode time, trained on and sampled from a prompt."""

import jax
import numpy as np
import pytest
from test_training import batch_for, small_config, train

from diffusion_jax import preflight
from diffusion_jax.jobs import sample
from diffusion_jax.jobs import train as train_job


@pytest.mark.parametrize("source", ["text", "autoencoder"])
def test_sharded_step_equals_single_device(source):
    if source == "text":
        config = small_config(
            **{
                "model.ch": 8,
                "model.context_dim": 6,
                "model.context_source": "text",
                "model.context_length": 3,
            }
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
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
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
    from diffusion_jax.models.prompts import PromptEncoder

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
    c = preflight.resolve(c, tmp_path / "run", "train")
    state = train_job.train_and_evaluate(c, tmp_path / "run")
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
    path = sample.sample(c, tmp_path / "run")
    assert np.load(path.with_suffix(".npz"))["arr_0"].shape == (8, 16, 16, 3)
