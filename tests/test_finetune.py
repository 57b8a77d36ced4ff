"""Fine-tuning a pipeline (configs/sd15_finetune.py:smoke): a few steps from the seeded tiny
v1.5-shaped pipeline on an image folder with captions, through the sharded step, EMA and
checkpoints; then the export to a diffusers pipeline folder, whose U-Net the importer reads
back exactly and which computes what the trained parameters compute."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffusion_jax import preflight
from diffusion_jax.export_ema import export_ema
from diffusion_jax.models import convert, create_unet
from diffusion_jax.training import loop

ROOT = Path(__file__).parents[1]
TINY_SD15 = ROOT / "tests" / "fixtures" / "tiny_sd15"
CAPTIONS = ["a red square", "a blue circle on white", "green stripes", "a horse", "snow"]


def load_recipe(arg):
    spec = importlib.util.spec_from_file_location(
        "sd15_finetune", ROOT / "configs" / "sd15_finetune.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def image_folder(root: Path, count: int = 9) -> Path:
    """Images of 40x48 (cropped and resized to the pipeline's 32) with <image>.txt captions;
    every 20th file is the test split, so the first is held out."""
    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(count):
        pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)] + "\n")
    return root


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """(config, workdir, final state) of the smoke fine-tune."""
    tmp = tmp_path_factory.mktemp("finetune")
    config = load_recipe("smoke")
    config.data.data_dir = str(image_folder(tmp / "images"))
    workdir = tmp / "run"
    config = preflight.run_config(config)
    preflight.check(config, workdir, "train")
    state = loop.train_and_evaluate(config, workdir)
    return config, workdir, state


def test_the_run_is_the_pipelines(finetuned):
    config, workdir, state = finetuned
    m, found = config.model, convert.describe_pipeline(TINY_SD15)
    assert (m.ch, m.ch_mult, m.num_heads, m.context_dim) == (8, (1, 2), 8, 16)
    assert (config.data.image_size, config.autoencoder.scaling_factor) == (32, 0.18215)
    assert config.diffusion.schedule == found.diffusion.schedule == "scaled_linear"
    assert int(state.step) == 3 and (workdir / "checkpoints" / "3").is_dir()
    meta = json.loads((workdir / "latents" / "train-meta.json").read_text())
    assert meta["shape"] == [16, 4]  # 32x32 images -> 16x16x4 latents
    contexts = np.load(sorted((workdir / "latents").glob("train-*.npz"))[0])["context"]
    assert contexts.shape == (8, 77, 16)
    # Training started from the pipeline's U-Net and moved it; the EMA (decay 0.5) followed.
    start, _ = convert.from_diffusers(TINY_SD15 / "unet")
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params, start)
    assert 0 < max(jax.tree.leaves(moved)) < 0.1
    ema = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.ema_params, start)
    assert 0 < max(jax.tree.leaves(ema)) < max(jax.tree.leaves(moved))


def test_diffusers_export_round_trips_exactly(finetuned, tmp_path):
    config, workdir, state = finetuned
    config.eval.export_format = "diffusers"
    folder = export_ema(config, workdir)
    assert folder.name == "diffusers_step_3"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    ema = jax.device_get(state.ema_params)  # what the checkpoint of step 3 holds
    exported, exported_config = convert.from_diffusers(folder / "unet")
    jax.tree.map(np.testing.assert_array_equal, ema, exported)
    # The exported folder's network, built from its own config.json, computes what the
    # trained parameters compute in the run's network.
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 4)), jnp.float32)
    t = jnp.array([5, 900])
    context = jnp.asarray(rng.normal(size=(2, 77, 16)), jnp.float32)
    ours = create_unet(config).apply({"params": ema}, x, t, None, context=context)
    theirs = create_unet(exported_config).apply({"params": exported}, x, t, None, context=context)
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    # export -> import -> export -> import is the identity, file for file.
    again = convert.to_pipeline(exported, tmp_path / "again", folder)
    reread, _ = convert.from_diffusers(again / "unet")
    jax.tree.map(np.testing.assert_array_equal, exported, reread)
    for part in ("vae", "text_encoder", "scheduler", "tokenizer"):
        for file in sorted((TINY_SD15 / part).iterdir()):
            assert (again / part / file.name).read_bytes() == file.read_bytes()
