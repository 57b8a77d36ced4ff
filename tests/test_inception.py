"""The FID InceptionV3: pytorch-fid's layout, its .pth read without torch, and its features
against pytorch-fid's on the same seeded weights."""

import io
import pickle
import sys
import types
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import jax
import numpy as np
import pytest

from diffusion_jax.evaluation import inception
from diffusion_jax.models.convert import torch_pickle
from diffusion_jax.tools import inception_weights

FIXTURES = Path(__file__).parent / "fixtures"


def seeded_tensor(name, shape):
    """The draw of tests/fixtures/make_pytorch_fid_features.py, made again without torch."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    if name.endswith("running_var") or name.endswith("bn.weight"):
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if name.endswith("bias") or name.endswith("running_mean"):
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def seeded_state_dict():
    return {k: seeded_tensor(k, s) for k, s in inception.state_dict_shapes().items()}


def write_torch_zip(path, state):
    """A state dict in torch's zip layout (archive/data.pkl + archive/data/<key>), pickled the
    way torch.save does, with stand-in modules so that torch itself is not needed."""

    def _rebuild_tensor_v2(*args):  # only its module and name are pickled
        raise AssertionError

    class FloatStorage:
        pass

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
    fake_torch, fake_utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    fake_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    fake_torch.FloatStorage, fake_torch._utils = FloatStorage, fake_utils
    storages = {}

    class StorageRef:
        def __init__(self, key):
            self.key = key

    class TensorRef:
        def __init__(self, key):
            self.key = key

        def __reduce__(self):
            a = storages[self.key]
            strides = tuple(s // a.itemsize for s in a.strides)
            return _rebuild_tensor_v2, (
                StorageRef(self.key),
                0,
                a.shape,
                strides,
                False,
                OrderedDict(),
            )

    class StoragePickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, StorageRef):
                return ("storage", FloatStorage, obj.key, "cpu", storages[obj.key].size)
            return None

    refs = OrderedDict()
    for name, value in state.items():
        key = str(len(storages))
        storages[key] = np.ascontiguousarray(value, np.float32)
        refs[name] = TensorRef(key)
    buffer = io.BytesIO()
    saved = {m: sys.modules.get(m) for m in ("torch", "torch._utils")}
    sys.modules.update({"torch": fake_torch, "torch._utils": fake_utils})
    try:
        StoragePickler(buffer, protocol=2).dump(refs)
    finally:
        for m, mod in saved.items():
            if mod is None:
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = mod
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buffer.getvalue())
        for key, array in storages.items():
            z.writestr(f"archive/data/{key}", array.tobytes())


def test_layout_is_pytorch_fids():
    shapes = inception.state_dict_shapes()
    assert len(shapes) == 472  # 94 conv+bn layers x 5 tensors, plus fc weight and bias
    assert sum(int(np.prod(s)) for s in shapes.values()) == 23_885_392
    assert shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert shapes["fc.weight"] == (1008, 2048)


@pytest.fixture(scope="module")
def seeded_params(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "seeded.pth"
    state = seeded_state_dict()
    write_torch_zip(path, state)
    params = inception.load_params(path)
    return params, state, path


def test_pth_round_trip_exact(seeded_params):
    params, state, path = seeded_params
    read = torch_pickle.load_state_dict(path)
    assert set(read) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(read[k], v)
    kernel = params["Mixed_5b"]["branch5x5_2"]["conv"]["kernel"]
    assert kernel.shape == (5, 5, 48, 64)
    np.testing.assert_array_equal(
        kernel, np.transpose(state["Mixed_5b.branch5x5_2.conv.weight"], (2, 3, 1, 0))
    )


def test_features_match_pytorch_fid(seeded_params):
    """Fixture: tests/fixtures/make_pytorch_fid_features.py (versions beside it)."""
    params, _, _ = seeded_params
    data = np.load(FIXTURES / "pytorch_fid_features.npz")
    feats, logits = inception.fid_features_and_logits(params, data["images"])
    assert feats.shape == (4, 2048) and logits.shape == (4, 1008)
    assert np.all(np.isfinite(feats))
    assert np.abs(feats[0] - feats[1]).max() > 1e-3  # different per image
    scale = np.abs(data["features"]).max()
    np.testing.assert_allclose(feats, data["features"], rtol=1e-3, atol=1e-3 * scale)
    np.testing.assert_allclose(
        logits, data["logits"], rtol=1e-3, atol=1e-3 * np.abs(data["logits"]).max()
    )


def test_sharded_features_equal_unsharded(seeded_params):
    from diffusion_jax import config as config_lib
    from diffusion_jax import parallel

    params, _, _ = seeded_params
    images = np.load(FIXTURES / "pytorch_fid_features.npz")["images"]
    config = config_lib.base_config()
    mesh = parallel.make_mesh(config, jax.devices()[:2])
    a = inception.fid_features(params, images[:3], mesh=mesh)
    b = inception.fid_features(params, images[:3])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    grey = inception.fid_features(params, images[:2, :, :, :1])
    rgb = inception.fid_features(params, np.repeat(images[:2, :, :, :1], 3, axis=-1))
    np.testing.assert_allclose(grey, rgb, rtol=1e-6)


def test_npz_conversion(seeded_params, tmp_path):
    _, state, path = seeded_params
    assert inception_weights.main([str(path), str(tmp_path / "w.npz")]) == 0
    read = inception.load_state_dict(tmp_path / "w.npz")
    np.testing.assert_array_equal(read["fc.bias"], state["fc.bias"])


@pytest.mark.parametrize(
    "name", ["torch_small_state_dict.pth", "torch_small_state_dict_legacy.pth"]
)
def test_reads_a_file_torch_wrote(name):
    """Zip format (torch >= 1.6) and the legacy format of files published before 2020."""
    state = torch_pickle.load_state_dict(FIXTURES / name)
    np.testing.assert_array_equal(
        state["conv.weight"], np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    )
    np.testing.assert_array_equal(
        state["fc.weight"], np.arange(6, dtype=np.float32).reshape(3, 2).T
    )
    np.testing.assert_array_equal(state["bn.running_mean"], [0.5, -1.5])
    assert state["steps"] == 7 and state["steps"].dtype == np.int64


def test_refuses_any_other_global(tmp_path):
    class Evil:
        def __reduce__(self):
            import os

            return os.system, ("echo owned",)

    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        torch_pickle.load_state_dict(path)


def test_missing_weights_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        inception.load_params(tmp_path / "nope.pth")
