"""Reads PyTorch `.pth` / `.pt` files into NumPy, without torch: the zip format of torch >= 1.6
and the older sequential ("legacy") format that files published before 2020 use.

`load_state_dict` reads a flat state dict ({name: tensor}); `load` any nesting of dicts,
lists and tuples around tensors and plain values, such as a training checkpoint
({"model": ..., "ema": ..., "opt": ..., "args": argparse.Namespace}).

The pickle inside names classes to rebuild; a restricted unpickler accepts only the handful
that describe tensors, ordered dicts and argparse namespaces (rebuilt as a `Namespace` of
plain attributes) and refuses anything else, so a crafted file cannot run code. Storages
are read from the zip members the pickle points to, or, in the legacy format, from the raw
blocks that follow the pickles.
"""

from __future__ import annotations

import pickle
import struct
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


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _LazyStorage:
    """A legacy-format storage whose bytes come after the pickles."""

    def __init__(self, dtype, numel):
        self.dtype, self.numel, self.array = np.dtype(dtype), numel, None


class _LazyTensor:
    def __init__(self, storage, args):
        self.storage, self.args = storage, args

    def materialize(self):
        return _rebuild_tensor_v2(self.storage.array, *self.args)


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
):
    if isinstance(storage, _LazyStorage):
        return _LazyTensor(storage, (storage_offset, size, stride))
    itemsize = storage.dtype.itemsize
    if not size:
        return np.array(storage[storage_offset])
    return np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    ).copy()


class Namespace:
    """What an argparse.Namespace in a checkpoint is rebuilt as: its attributes, nothing else."""

    def __repr__(self):
        return f"Namespace({vars(self)})"


class _StorageType:
    def __init__(self, name: str):
        self.dtype = STORAGE_DTYPES[name]


class _RestrictedUnpickler(pickle.Unpickler):
    """Zip format when `archive` is given; legacy format (lazy storages) otherwise."""

    def __init__(self, file, archive: zipfile.ZipFile | None = None, prefix: str = ""):
        super().__init__(file)
        self._archive, self._prefix = archive, prefix
        self.storages: dict[str, _LazyStorage] = {}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("argparse", "Namespace"):
            return Namespace
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
        if self._archive is None:
            if pid[5:] and pid[5] is not None:
                raise pickle.UnpicklingError("storage views are not supported")
            return self.storages.setdefault(key, _LazyStorage(dtype, numel))
        data = self._archive.read(f"{self._prefix}data/{key}")
        return np.frombuffer(data, dtype=dtype, count=numel)


def load_state_dict(path) -> dict[str, np.ndarray]:
    """{name: array} of a torch-saved state dict, zip or legacy format."""
    state = load(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return {k: np.asarray(v) for k, v in state.items()}


def load(path):
    """The object a torch file holds, its tensors as NumPy arrays, zip or legacy format."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return _load_legacy(path)
    with zipfile.ZipFile(path) as archive:
        pkl = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
        if pkl is None:
            raise ValueError(f"{path}: no data.pkl inside; not a torch checkpoint")
        prefix = pkl[: -len("data.pkl")]
        with archive.open(pkl) as f:
            return _RestrictedUnpickler(f, archive, prefix).load()


def _materialize(obj):
    """Legacy-format tensors, wherever they sit in the object, read from their storages."""
    if isinstance(obj, _LazyTensor):
        return obj.materialize()
    if isinstance(obj, dict):
        return type(obj)((k, _materialize(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_materialize(v) for v in obj)
    if isinstance(obj, Namespace):
        vars(obj).update({k: _materialize(v) for k, v in vars(obj).items()})
    return obj


def _load_legacy(path: Path):
    """The sequential format: magic, protocol, sys_info and object pickles, the storage keys,
    then each storage as an int64 element count and its raw little-endian bytes."""
    with open(path, "rb") as f:
        magic = _RestrictedUnpickler(f).load()
        if magic != LEGACY_MAGIC:
            raise ValueError(f"{path}: neither a zip nor a legacy torch checkpoint")
        _RestrictedUnpickler(f).load()  # protocol version
        _RestrictedUnpickler(f).load()  # sys_info
        unpickler = _RestrictedUnpickler(f)
        state = unpickler.load()
        keys = _RestrictedUnpickler(f).load()
        for key in keys:
            storage = unpickler.storages[key]
            (numel,) = struct.unpack("<q", f.read(8))
            data = f.read(numel * storage.dtype.itemsize)
            storage.array = np.frombuffer(data, dtype=storage.dtype, count=numel)
    return _materialize(state)
