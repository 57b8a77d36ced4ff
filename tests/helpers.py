"""Small configs shared by the tests."""

from diffusion_jax.config import base_config


def tiny_config(**model_overrides):
    """An 8x8 single-channel U-Net with a few channels: fast on a CPU."""
    config = base_config()
    config.data.image_size = 8
    config.data.channels = 1
    m = config.model
    m.ch, m.ch_mult, m.num_res_blocks, m.attn_resolutions, m.norm_groups = 8, (1, 2), 1, (4,), 4
    for key, value in model_overrides.items():
        m[key] = value
    return config


def override(config, **fields):
    """Sets "section.field" keys (given as keyword names with dots) on config; returns it."""
    for key, value in fields.items():
        section, field = key.split(".")
        config[section][field] = value
    return config
