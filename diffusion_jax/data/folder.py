"""A folder of images as a data set: PNG/JPEG files, either directly in the folder (no labels)
or in one sub-folder per class (labels in sorted sub-folder order, as ImageFolder does).
A caption for text conditioning is a `.txt` file beside its image (`cat.png`, `cat.txt`).

Held in memory after a square center crop and an antialiased resize, so it suits folders of
up to a few hundred thousand small images; every 20th file (in sorted order) is the "test"
split, the rest "train".
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
TEST_EVERY = 20


def list_images(folder) -> tuple[list[Path], np.ndarray]:
    """(files, labels): labels from class sub-folders, or zeros when the files are flat."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"config.data.data_dir: image folder {folder} does not exist")
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if classes:
        pairs = [
            (f, i)
            for i, c in enumerate(classes)
            for f in sorted(c.rglob("*"))
            if f.suffix.lower() in EXTENSIONS
        ]
    else:
        pairs = [(f, 0) for f in sorted(folder.iterdir()) if f.suffix.lower() in EXTENSIONS]
    if not pairs:
        raise FileNotFoundError(
            f"config.data.data_dir: no images ({', '.join(EXTENSIONS)}) in {folder}"
        )
    files, labels = zip(*pairs, strict=True)
    return list(files), np.asarray(labels, np.int32)


def load_image(path, image_size: int, channels: int) -> np.ndarray:
    """uint8 (S, S, channels): center square crop, then an antialiased (Lanczos) resize."""
    image = Image.open(path).convert("L" if channels == 1 else "RGB")
    w, h = image.size
    side = min(w, h)
    image = image.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2))
    array = np.asarray(image.resize((image_size, image_size), Image.LANCZOS))
    return array[..., None] if channels == 1 else array


def split_indices(num_files: int, split: str) -> np.ndarray:
    """Indices of the files of `split`: every TEST_EVERY-th file is "test", the rest "train"."""
    if split not in ("train", "test"):
        raise ValueError(
            f"config.data.train_split/eval_split: an image folder has 'train' and "
            f"'test', not {split!r}"
        )
    index = np.arange(num_files)
    return index[index % TEST_EVERY == 0] if split == "test" else index[index % TEST_EVERY != 0]


def load_captions(folder: str, split: str) -> list[str]:
    """The caption of each image of `split`, in load_folder's order, from `<image>.txt`."""
    files, _ = list_images(folder)
    captions = []
    for i in split_indices(len(files), split):
        text_file = files[i].with_suffix(".txt")
        if not text_file.exists():
            raise FileNotFoundError(
                f"config.data.data_dir: {files[i].name} has no caption file {text_file.name}"
            )
        captions.append(text_file.read_text(encoding="utf-8").strip())
    return captions


@functools.lru_cache(maxsize=4)
def load_folder(folder: str, split: str, image_size: int, channels: int):
    """(images (N, S, S, C) float32 in [-1, 1], labels (N,) int32) of a split of the folder."""
    files, labels = list_images(folder)
    keep = split_indices(len(files), split)
    images = np.stack([load_image(files[i], image_size, channels) for i in keep])
    return images.astype(np.float32) / 127.5 - 1.0, labels[keep]
