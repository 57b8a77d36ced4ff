"""Pre-flight of a resumed workdir: its checkpoints were trained with its config.json, so
a run, evaluation or sample whose model or diffusion settings differ would restore them into
the wrong network or score them with the wrong process."""

from __future__ import annotations

import json

from diffusion_jax.errors import ConfigError

# Fields that define what a checkpoint holds; a resumed run must agree on them.
STRUCTURAL_SECTIONS = ("model", "diffusion")


def check_resumable_config(config, workdir) -> None:
    """Refuses to resume a workdir whose config.json differs on model or diffusion fields,
    the EMA widths it tracks, or whether it trains the text encoder."""
    path = workdir / "config.json"
    if not path.exists() or config.training.allow_config_change:
        return
    old = json.loads(path.read_text())
    new = json.loads(config.to_json_best_effort())
    for section in STRUCTURAL_SECTIONS:
        for key, value in new[section].items():
            if section == "model" and key == "dit" and new["model"].get("arch", "unet") != "dit":
                continue  # a U-Net's run does not depend on the DiT's fields
            if old.get(section, {}).get(key, value) != value:
                raise ConfigError(
                    f"config.{section}.{key}: {value!r} differs from {old[section][key]!r} in "
                    f"{path}; use a new --workdir or pass "
                    "--config.training.allow_config_change=True"
                )
    trains_text = new["training"].get("train_text_encoder", False)
    if trains_text != old.get("training", {}).get("train_text_encoder", False):
        raise ConfigError(
            f"config.training.train_text_encoder: {trains_text} differs from {path}; its "
            "checkpoints hold the networks it trained: use a new --workdir"
        )
    # The power-function EMAs of a checkpoint are profiles of these widths: other widths
    # would go on averaging them with the wrong exponents.
    widths, old_widths = new["optim"]["ema_sigma_rels"], old["optim"].get("ema_sigma_rels", [])
    if list(widths) != list(old_widths):
        raise ConfigError(
            f"config.optim.ema_sigma_rels: {tuple(widths)} differs from {tuple(old_widths)} in "
            f"{path}; its checkpoints track those widths: leave optim.ema_sigma_rels unset (it "
            "is read from there; --mode=posthoc_ema rebuilds other widths) or use a new "
            "--workdir"
        )
