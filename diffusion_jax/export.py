"""Single-file parameters for sharing: `<name>.msgpack` (flax msgpack) beside `<name>.json`
(the run config). `--mode=sample|eval` accept such a file through `eval.params_file`."""

from __future__ import annotations

import hashlib
import json

import flax.serialization
import flax.traverse_util
import jax
import ml_collections
import numpy as np

from diffusion_jax import paths


def config_path(params_path) -> paths.Path:
    return paths.path(params_path).with_suffix(".json")


# The field of an export's .json that records the training step of its weights.
STEP_FIELD = "export_step"


def save_params(path, params, config: ml_collections.ConfigDict, step: int | None = None):
    """Writes params (a pytree of arrays, gathered to the host) and the config beside them,
    with the training step they are the weights of (STEP_FIELD), when given."""
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
    paths.write_bytes(path, flax.serialization.msgpack_serialize(host))
    record = json.loads(config.to_json_best_effort())
    if step is not None:
        record[STEP_FIELD] = int(step)
    paths.write_text(config_path(path), json.dumps(record, indent=2))


def exported_step(path) -> int | None:
    """The training step recorded beside an exported file (None for older exports)."""
    try:
        return json.loads(config_path(path).read_text()).get(STEP_FIELD)
    except (OSError, ValueError):
        return None


def params_fingerprint(params) -> str:
    """sha256 of a parameter tree's float32 values in path order: the same for the same
    weights however they were stored or sharded."""
    digest = hashlib.sha256()
    for path, leaf in sorted(
        flax.traverse_util.flatten_dict(jax.device_get(params), sep="/").items()
    ):
        digest.update(path.encode())
        digest.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return digest.hexdigest()


def load_params(path) -> tuple[dict, ml_collections.ConfigDict]:
    """(params, config) from a file written by `save_params`."""
    path = paths.path(path)
    if not path.exists():
        raise FileNotFoundError(f"parameters file {path} does not exist")
    cfg_file = config_path(path)
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} (the config of {path.name}) does not exist")
    params = flax.serialization.msgpack_restore(path.read_bytes())
    return params, ml_collections.ConfigDict(json.loads(cfg_file.read_text()))
