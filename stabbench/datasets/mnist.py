"""mnist: 60k/10k 28x28 digits, IDX files (torchvision's layout or the files themselves)."""
from dataclasses import dataclass
from typing import Optional



from stabbench.datasets import Data, Dimensions
from stabbench.datasets.idx import MNIST_DIMENSIONS, Config as IdxConfig, load_torchvision_idx


@dataclass
class Config(IdxConfig):
    name: str = "mnist"
    root: Optional[str] = "data"


def dimensions(cfg) -> Dimensions:
    return MNIST_DIMENSIONS


def load(cfg) -> Data:
    return load_torchvision_idx(cfg, "mnist", "MNIST")
