"""The IDX format of MNIST and Fashion-MNIST, read from plain or gzipped files.

torchvision's own reader asserts on bad files (a bare AssertionError) and reads no .gz,
which is how Debian and the original sites ship the files; this one names what is wrong.
Downloading stays torchvision's (`torchvision.datasets.MNIST(download=True)`).
"""
from __future__ import annotations

import gzip
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from stabbench.datasets import Data, DatasetConfig, Dimensions
from stabbench.errors import UserError

DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MAX_IDX_BYTES = 2 ** 31  # 40x the largest real file (MNIST's 47 MB train images)
MNIST_DIMENSIONS = Dimensions(28 * 28, 10, 60_000, 10_000)  # MNIST and Fashion-MNIST alike


@dataclass
class Config(DatasetConfig):
    root: Optional[str] = "data"


def read_idx(path: Path) -> np.ndarray:
    """Reads the header first and then exactly the bytes it declares, so that a crafted .gz
    (a small file that inflates without bound) is refused instead of filling the memory."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in DTYPES or not 1 <= magic[3] <= 4:
                raise UserError(f"{path}: not an IDX file (bad magic number {magic.hex() or 'empty'})")
            ndim = magic[3]
            dims = f.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise UserError(f"{path}: truncated IDX header")
            shape = tuple(int.from_bytes(dims[4 * i: 4 * i + 4], "big") for i in range(ndim))
            dtype = np.dtype(DTYPES[magic[2]])
            header = 4 + 4 * ndim
            expected = header + math.prod(shape) * dtype.itemsize  # Python ints: no wrap-around to a small number
            if expected - header > MAX_IDX_BYTES:
                raise UserError(f"{path}: header declares {expected - header} bytes of data, "
                                f"more than the {MAX_IDX_BYTES} allowed for one IDX file")
            body = f.read(expected - header + 1)
    except (OSError, EOFError, zlib.error) as error:
        raise UserError(f"{path}: unreadable ({type(error).__name__}: {error})") from None
    if header + len(body) != expected:
        actual = f"{header + len(body)}" if len(body) <= expected - header else f"more than {expected}"
        raise UserError(f"{path}: wrong length {actual} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def find(folders: list[Path], stem: str) -> Optional[Path]:
    for folder in folders:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def load_idx(name: str, folders: list[Path], download_hint: str) -> Data:
    arrays = {}
    for split, stems in SPLITS.items():
        for kind, stem in zip(("x", "y"), stems):
            path = find(folders, stem)
            if path is None:
                raise UserError(f"dataset {name}: no {stem}[.gz] in {folders[0]}; {download_hint}")
            arrays[kind + "_" + split] = read_idx(path)
    for split in SPLITS:
        if len(arrays["x_" + split]) != len(arrays["y_" + split]):
            raise UserError(f"dataset {name}: {split} images and labels differ in count")
    to_x = lambda a: torch.from_numpy(a.reshape(len(a), -1).astype(np.float32) / 255.0)
    to_y = lambda a: torch.from_numpy(a.astype(np.int64))
    return Data(to_x(arrays["x_train"]), to_y(arrays["y_train"]), to_x(arrays["x_test"]), to_y(arrays["y_test"]),
                "classification", 10)


def load_torchvision_idx(cfg, name: str, torchvision_class: str, root: Optional[str] = None) -> Data:
    """MNIST-layout datasets: files directly in `root` or in torchvision's `root/<Class>/raw`."""
    root = Path(root or cfg.root).expanduser()
    raw = root / torchvision_class / "raw"
    if cfg.download and find([root, raw], SPLITS["train"][0]) is None:
        import torchvision  # slow to import (~2 s); only a download needs it

        try:
            getattr(torchvision.datasets, torchvision_class)(str(root), train=True, download=True)
            getattr(torchvision.datasets, torchvision_class)(str(root), train=False, download=True)
        except Exception as error:  # no network, disk full, server gone: one line, not a trace
            raise UserError(f"dataset {name}: download into {raw} failed: {str(error).splitlines()[0]}") from None
    hint = ("run with dataset.download=true on a machine with internet, or set dataset.root to a folder "
            "holding the IDX files")
    return load_idx(name, [root, raw], hint)
