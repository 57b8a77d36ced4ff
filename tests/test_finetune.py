"""Fine-tuning a pipeline (configs/sd15_finetune.py:smoke): a few steps from the seeded tiny
v1.5-shaped pipeline on an image folder with captions, through the sharded step, EMA and
checkpoints; then the export to a diffusers pipeline folder, whose U-Net the importer reads
back exactly and which computes what the trained parameters compute."""

import copy
import importlib.util
import json
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffusion_jax import export, objectives, preflight
from diffusion_jax.data import latents
from diffusion_jax.errors import ConfigError
from diffusion_jax.jobs import sample
from diffusion_jax.jobs import train as train_job
from diffusion_jax.jobs.encode import ensure_latents
from diffusion_jax.jobs.export_ema import export_ema
from diffusion_jax.models import convert, create_model, create_unet
from diffusion_jax.models.clip_tokenizer import CLIPTokenizer
from diffusion_jax.models.prompts import PromptEncoder
from diffusion_jax.run import run_keys, schedule_from_config, setup_run
from diffusion_jax.weights import job_params

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


def finetune(tmp, **overrides):
    """(config, workdir, final state) of the smoke fine-tune with `overrides` (training.*)."""
    config = load_recipe("smoke")
    config.data.data_dir = str(image_folder(tmp / "images"))
    config.training.update(overrides)
    workdir = tmp / "run"
    config = preflight.resolve(config, workdir, "train")
    preflight.check(config, workdir, "train")
    state = train_job.train_and_evaluate(config, workdir)
    return config, workdir, state


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """The recipe's fine-tune: the U-Net alone, the text encoder frozen."""
    return finetune(tmp_path_factory.mktemp("finetune"))


@pytest.fixture(scope="module")
def finetuned_with_text(tmp_path_factory):
    """The text encoder trained with the U-Net, half the captions dropped to the empty one."""
    return finetune(
        tmp_path_factory.mktemp("finetune_text"), train_text_encoder=True, cond_drop_prob=0.5
    )


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


def test_the_text_encoder_trains_and_exports(finetuned_with_text):
    config, workdir, state = finetuned_with_text
    assert sorted(state.params) == ["text_encoder", "unet"]
    # The shards carry the captions' token ids, which the step encodes.
    shard = np.load(sorted((workdir / "latents").glob("train-*.npz"))[0])
    tokenizer = CLIPTokenizer.from_folder(TINY_SD15 / "tokenizer")
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(1, 9)]  # img00 is held out
    np.testing.assert_array_equal(shard["tokens"], tokenizer(captions))
    # Prompts reach its network as token ids too, the negative prompt (the null side of
    # guidance in its pictures) included.
    prompted = copy.deepcopy(config)
    prompted.sampling.prompt = "a horse"
    np.testing.assert_array_equal(sample.prompt_contexts(prompted, 2), tokenizer(["a horse"] * 2))
    run = setup_run(config, jax.random.key(0))
    np.testing.assert_array_equal(run._null_context(), tokenizer([""]))
    # Both networks moved from the pipeline's weights.
    start_text, _ = convert.text_encoder_from_transformers(TINY_SD15 / "text_encoder")
    start_unet, _ = convert.from_diffusers(TINY_SD15 / "unet")
    for name, start in (("text_encoder", start_text), ("unet", start_unet)):
        moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params[name], start)
        assert 0 < max(jax.tree.leaves(moved)) < 0.1, name

    # Its checkpoint restores only into a network with the text encoder.
    frozen = copy.deepcopy(config)
    frozen.training.train_text_encoder = False
    with pytest.raises(ConfigError, match="^config.training.train_text_encoder: checkpoint 3"):
        job_params(frozen, workdir, setup_run(frozen, run_keys(frozen)[0]))

    config.eval.export_format = "diffusers"
    folder = export_ema(config, workdir)
    ema = jax.device_get(state.ema_params)
    text, fields = convert.text_encoder_from_transformers(folder / "text_encoder")
    unet, unet_config = convert.from_diffusers(folder / "unet")
    jax.tree.map(np.testing.assert_array_equal, ema["text_encoder"], text)
    jax.tree.map(np.testing.assert_array_equal, ema["unet"], unet)
    for part in ("text_encoder", "unet"):
        config_file = f"{part}/config.json"
        assert (folder / config_file).read_bytes() == (TINY_SD15 / config_file).read_bytes()
    # The exported folder, read the way sampling reads a pipeline (its tokenizer and text
    # encoder to contexts, then its U-Net), computes what the run's network computes from
    # token ids.
    contexts = PromptEncoder.from_folder(folder)(["a horse", ""])
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 4)), jnp.float32)
    t = jnp.array([10, 700])
    theirs = create_unet(unet_config).apply({"params": unet}, x, t, None, context=contexts)
    tokens = jnp.asarray(tokenizer(["a horse", ""]))
    ours = create_model(config).apply({"params": ema}, x, t, None, context=tokens)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_dropped_captions_become_the_empty_prompt(finetuned):
    """As Stable Diffusion was trained: a dropped caption is the empty prompt's context (the
    unconditional side its pipelines guide against), not zeros; as token ids when the text
    encoder trains."""
    config = copy.deepcopy(finetuned[0])
    config.training.cond_drop_prob = 0.5
    empty = PromptEncoder.from_folder(TINY_SD15)("")[0]
    batch = {
        "image": jnp.zeros((64, 16, 16, 4)),
        "label": jnp.zeros((64,), jnp.int32),
        "context": jnp.asarray(np.random.default_rng(3).normal(size=(64, 77, 16)), jnp.float32),
    }
    sched = schedule_from_config(config)
    inputs = objectives.for_config(config, sched).draw_inputs(jax.random.key(0), batch)
    dropped = np.all(np.asarray(inputs["context"]) == np.asarray(empty)[None], axis=(1, 2))
    kept = np.all(np.asarray(inputs["context"]) == np.asarray(batch["context"]), axis=(1, 2))
    assert np.all(dropped ^ kept) and 16 < dropped.sum() < 48
    tokens = jnp.asarray(CLIPTokenizer.from_folder(TINY_SD15 / "tokenizer")(["snow"] * 64))
    config.training.train_text_encoder = True
    empty_ids = CLIPTokenizer.from_folder(TINY_SD15 / "tokenizer")("")[0]
    assert not np.array_equal(empty_ids, tokens[0])
    out = objectives.for_config(config, sched).draw_inputs(
        jax.random.key(0), {**batch, "context": tokens}
    )["context"]
    dropped_ids = np.all(np.asarray(out) == empty_ids[None], axis=1)
    np.testing.assert_array_equal(dropped_ids, dropped)  # the same key drops the same rows


def test_stale_latents_are_encoded_again(finetuned, tmp_path, caplog, monkeypatch):
    """Shards whose contexts another text encoder made, or without the caption tokens a run
    that trains its text encoder reads, are encoded again before training; read directly,
    shards without tokens are one line."""
    config, workdir, _ = finetuned
    config = copy.deepcopy(config)
    config.training.train_text_encoder = True
    shutil.copytree(workdir / "latents", tmp_path / "latents")
    meta_file = tmp_path / "latents" / "train-meta.json"
    for change, reason in (
        ({"tokens": False}, "hold no caption tokens"),
        ({"text_encoder_sha256": "0", "text_encoder_stamp": None}, "another text encoder"),
    ):
        meta = json.loads(meta_file.read_text())
        meta_file.write_text(json.dumps({**meta, **change}))
        config.data.latents = ""
        ensured = preflight.resolve(config, tmp_path, "train")
        with caplog.at_level(logging.INFO, logger="diffusion_jax"):
            ensure_latents(ensured, tmp_path)
        assert reason in caplog.text
        assert (
            json.loads(meta_file.read_text())["text_encoder_sha256"] == meta["text_encoder_sha256"]
        )
        caplog.clear()
    # Fresh shards: the text encoder's size and time tell it; nothing is hashed or encoded.
    with monkeypatch.context() as patch:
        patch.setattr(export, "params_fingerprint", lambda _: pytest.fail("hashed again"))
        ensure_latents(ensured, tmp_path)
    assert "encoding" not in caplog.text
    context = latents.load_latents(ensured, "train")["context"]
    assert context.shape == (8, 77) and context.dtype == np.int32  # the caption tokens
    shard = sorted((tmp_path / "latents").glob("train-*.npz"))[0]
    arrays = dict(np.load(shard))
    del arrays["tokens"]
    np.savez(shard, **arrays)
    with pytest.raises(ConfigError, match="^config.training.train_text_encoder: .* no caption"):
        latents.load_latents(ensured, "train")
