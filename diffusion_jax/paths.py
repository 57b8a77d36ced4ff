"""One path layer for local folders and object stores (`gs://bucket/...`, `s3://...`).

Every file a run reads or writes under --workdir, and the data and weight files a config
names, go through `path(...)`: an `etils.epath.Path`, which speaks pathlib's interface over
the local disk and, through fsspec (gcsfs for `gs://`), over buckets. Orbax takes the same
paths, and writes its array shards through tensorstore, which speaks GCS itself.

Object stores have no rename and no append, and an object is replaced whole when it is
written. So the writers here never rename on a bucket: `write_bytes` replaces the object in
one request (a reader sees the old or the new object, never half of one), and on a local
disk writes a temporary file and renames it, which is just as atomic there.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pathlib
import re
import shutil
import tempfile
import uuid

# fsspec's gcsfs, not TensorFlow's gfile, serves gs:// for epath: one client for every
# read and write of the run (gfile does not see a storage emulator, and would only serve
# the paths that TensorFlow was built to reach).
os.environ.setdefault("EPATH_USE_TF", "false")

import fsspec  # noqa: E402
from etils import epath  # noqa: E402

from diffusion_jax.errors import ConfigError  # noqa: E402

# Listings are read fresh: another process may have written (or moved aside) a checkpoint
# since, and gcsfs would otherwise answer from its cache for the life of the process.
for _protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)

Path = epath.Path
PathLike = str | os.PathLike

SCHEMES = ("gs", "s3", "az", "hf")  # the stores epath speaks
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
CACHE_ENV = "DIFFUSION_JAX_CACHE"


def is_remote(p: PathLike) -> bool:
    """Whether `p` names an object in a store (gs://, s3://, ...) rather than a local file."""
    return _SCHEME.match(os.fspath(p)) is not None


def path(p: PathLike) -> epath.Path:
    """`p` as a path that reads and writes the same locally and in a bucket. A local path is
    made absolute, as the workdir is shared by processes whose current directories differ.
    A scheme other than SCHEMES (gcs://, GS://, http://) is a ConfigError naming it."""
    text = os.fspath(p)
    scheme = _SCHEME.match(text)
    if scheme is None:
        return epath.Path(os.path.abspath(text))
    if scheme[1] not in SCHEMES:
        raise ConfigError(
            f"{text}: {scheme[1]}:// is not a store this reads; use "
            f"{', '.join(s + '://' for s in SCHEMES)} or a local path"
        )
    return epath.Path(text)


def write_bytes(target: PathLike, data: bytes) -> None:
    """Replaces the file at `target` with `data` at once: a kill leaves the old or the new
    contents, never a torn file. Parent folders are made as needed."""
    target = path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(target):
        target.write_bytes(data)  # one upload: GCS replaces an object atomically
        return
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:  # a full disk, Ctrl-C: no temporary file is left behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(target: PathLike, text: str) -> None:
    write_bytes(target, text.encode())


def save_npz(target: PathLike, **arrays) -> None:
    """np.savez to a local file or an object."""
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(target, buffer.getvalue())


def load_npz(source: PathLike) -> dict:
    """All arrays of an .npz file or object, read in one request."""
    import numpy as np

    with np.load(io.BytesIO(path(source).read_bytes())) as f:
        return {k: f[k] for k in f.files}


def save_image(target: PathLike, image, format: str = "PNG") -> None:
    """A PIL image as a PNG file or object."""
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    write_bytes(target, buffer.getvalue())


def rmtree(p: PathLike) -> None:
    """Removes a folder (or a prefix of objects) and everything under it, if it exists."""
    p = path(p)
    if p.exists():
        p.rmtree()


def local(p: PathLike) -> pathlib.Path:
    """A local path with the contents of `p`: `p` itself on a local disk; for an object or a
    prefix in a store, a copy in the cache folder ($DIFFUSION_JAX_CACHE or
    ~/.cache/diffusion_jax/remote), fetched once and fetched again when an object changes
    (its size or time). For readers that need a real file: safetensors, tokenizers, PIL,
    torch pickles. Processes sharing the cache (an NFS home) each write their own temporary
    file and rename it, so none reads a torn copy."""
    if not is_remote(p):
        return pathlib.Path(os.fspath(p))
    source = path(p)
    root = pathlib.Path(os.environ.get(CACHE_ENV, "~/.cache/diffusion_jax")).expanduser()
    # Keyed by the folder, so that files fetched from one folder lie side by side here too.
    digest = hashlib.sha256(os.fspath(source.parent).encode()).hexdigest()[:16]
    dest = root / "remote" / digest / source.name
    if source.is_dir():
        for child in files_under(source):
            _fetch(child, dest / os.path.relpath(os.fspath(child), os.fspath(source)))
    else:
        _fetch(source, dest)
    return dest


def files_under(folder: PathLike) -> list[epath.Path]:
    """Every file below `folder`, at any depth, sorted (a bucket's glob has no `**`)."""
    found = []
    for child in sorted(path(folder).iterdir()):
        found += files_under(child) if child.is_dir() else [child]
    return found


def _version(source: epath.Path) -> str:
    """What changes whenever the object is written again: GCS's generation (S3's ETag),
    else its size and time."""
    fs, key = fsspec.core.url_to_fs(os.fspath(source))
    info = fs.info(key)
    for field in ("generation", "ETag", "etag", "md5Hash"):
        if info.get(field):
            return f"{field} {info[field]}"
    when = info.get("mtime") or info.get("updated") or info.get("LastModified")
    return f"{info.get('size')} {when}"


def _fetch(source: epath.Path, dest: pathlib.Path) -> None:
    stamp = _version(source)
    stamp_file = dest.with_name(f".{dest.name}.source")
    if dest.is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with source.open("rb") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 24)
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    stamp_tmp = stamp_file.with_name(f"{stamp_file.name}-{os.getpid()}")
    stamp_tmp.write_text(stamp)
    os.replace(stamp_tmp, stamp_file)


@contextlib.contextmanager
def writable_folder(target: PathLike):
    """A local folder to write a tree of files into (for writers that need real files, like
    safetensors'), which is `target` itself on a local disk and, for a bucket, a temporary
    folder uploaded to `target` when the block ends without an error."""
    if not is_remote(target):
        pathlib.Path(os.fspath(target)).mkdir(parents=True, exist_ok=True)
        yield pathlib.Path(os.fspath(target))
        return
    with tempfile.TemporaryDirectory(prefix="diffusion_jax_upload_") as tmp:
        yield pathlib.Path(tmp)
        rmtree(target)
        for file in sorted(pathlib.Path(tmp).rglob("*")):
            if file.is_file():
                write_bytes(path(target) / file.relative_to(tmp).as_posix(), file.read_bytes())
