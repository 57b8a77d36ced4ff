"""Reads PyTorch `.pth` state dicts (the zip format of torch >= 1.6) into NumPy, without torch.

The pickle inside names classes to rebuild; a restricted unpickler accepts only the handful
that describe tensors and ordered dicts and refuses anything else, so a crafted file cannot
run code. Storages are read from the zip members the pickle points to.
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    itemsize = storage.dtype.itemsize
    if not size:
        return np.array(storage[storage_offset])
    return np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    ).copy()


class _StorageType:
    def __init__(self, name: str):
        self.dtype = STORAGE_DTYPES[name]


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive, self._prefix = archive, prefix

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only tensors are allowed")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid[:5]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else None
        if dtype is None:
            raise pickle.UnpicklingError(f"unknown storage type {storage_type!r}")
        data = self._archive.read(f"{self._prefix}data/{key}")
        return np.frombuffer(data, dtype=dtype, count=numel)


def load_state_dict(path) -> dict[str, np.ndarray]:
    """{name: array} of a torch-saved state dict in the zip format."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path}: not a zip-format .pth (saved by torch >= 1.6); re-save it "
            "with torch.save(torch.load(f), g) or convert it to .npz"
        )
    with zipfile.ZipFile(path) as archive:
        pkl = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
        if pkl is None:
            raise ValueError(f"{path}: no data.pkl inside; not a torch checkpoint")
        prefix = pkl[: -len("data.pkl")]
        with archive.open(pkl) as f:
            state = _RestrictedUnpickler(f, archive, prefix).load()
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return {k: np.asarray(v) for k, v in state.items()}
