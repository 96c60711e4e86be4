"""cifar10: 50k/10k 32x32x3 images in the CIFAR "python version" batches
(root/cifar-10-batches-py/data_batch_1..5, test_batch), flattened for the MLP.

torchvision downloads the archive; its CIFAR10 class also checks the files' md5 sums,
which would refuse every file but the originals, so the batches are parsed here. They are
pickles, and a pickle can name any callable to run; `SafeUnpickler` admits only what a real
batch holds (numpy's array reconstruction, dtypes), so a crafted data folder cannot run
code."""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch


from stabbench.datasets import Data, DatasetConfig, Dimensions
from stabbench.errors import UserError

FOLDER = "cifar-10-batches-py"
TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
TEST = ["test_batch"]


@dataclass
class Config(DatasetConfig):
    name: str = "cifar10"
    root: Optional[str] = "data"


MAX_BATCH_BYTES = 2 ** 28  # a real batch is 31 MB
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    # newer picklers: protocol 5 rebuilds an array from its bytes, Python 3's protocol 2 encodes them
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode"),
}


class SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR-10 batch holds only numpy arrays")
        return super().find_class(module, name)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        if path.stat().st_size > MAX_BATCH_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes, more than the {MAX_BATCH_BYTES} a batch can have")
        with open(path, "rb") as f:
            entry = SafeUnpickler(f, encoding="latin1").load()
        if not isinstance(entry, dict):
            raise TypeError(f"a {type(entry).__name__}, not a dict")
        images = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
    except Exception as error:
        raise UserError(f"{path}: not a CIFAR-10 python batch ({type(error).__name__}: {error})") from None
    if images.ndim != 2 or images.shape[1] != 3072 or len(images) != len(labels):
        raise UserError(f"{path}: wrong shape {images.shape} for {len(labels)} labels; expected [n, 3072]")
    return images, labels


def dimensions(cfg) -> Dimensions:
    return Dimensions(32 * 32 * 3, 10, 50_000, 10_000)


def load(cfg) -> Data:
    root = Path(cfg.root).expanduser()
    folder = root / FOLDER
    if cfg.download and not (folder / TRAIN[0]).is_file():
        import torchvision  # slow to import (~2 s); only a download needs it

        try:
            torchvision.datasets.CIFAR10(str(root), train=True, download=True)
        except Exception as error:
            raise UserError(f"dataset cifar10: download into {folder} failed: {str(error).splitlines()[0]}") from None
    missing = [name for name in TRAIN + TEST if not (folder / name).is_file()]
    if missing:
        raise UserError(f"dataset cifar10: no {missing[0]} in {folder}; run with dataset.download=true on a machine "
                        f"with internet, or set dataset.root to the folder holding {FOLDER}/")

    def stack(names):
        parts = [read_batch(folder / name) for name in names]
        x = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0
        return torch.from_numpy(x), torch.from_numpy(np.concatenate([p[1] for p in parts]))

    x_train, y_train = stack(TRAIN)
    x_test, y_test = stack(TEST)
    return Data(x_train, y_train, x_test, y_test, "classification", 10)
