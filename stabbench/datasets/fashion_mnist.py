"""fashion_mnist: 60k/10k 28x28 clothing images, IDX files. Debian's package
`dataset-fashion-mnist` installs them in DEBIAN_ROOT; they are found there without options."""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional



from stabbench.datasets import Data, Dimensions
from stabbench.datasets.idx import MNIST_DIMENSIONS, Config as IdxConfig, load_torchvision_idx

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class Config(IdxConfig):
    name: str = "fashion_mnist"
    root: Optional[str] = None  # None: the Debian package's folder if installed, else ./data


def dimensions(cfg) -> Dimensions:
    return MNIST_DIMENSIONS


def load(cfg) -> Data:
    root = cfg.root or (str(DEBIAN_ROOT) if DEBIAN_ROOT.is_dir() else "data")
    return load_torchvision_idx(cfg, "fashion_mnist", "FashionMNIST", root)
