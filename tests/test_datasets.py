"""Dataset loaders on small files written here in the real formats (IDX, CIFAR python
batches), through the same code path as the real files; plus the shared preparation."""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose
from stabbench import datasets
from stabbench.datasets import fashion_mnist, stratified_subset
from stabbench.errors import UserError

CPU = torch.device("cpu")


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", n) for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def write_mnist(folder: Path, n_train=40, n_test=20, compress=False, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28))
        labels = np.arange(n) % 10
        suffix = ".gz" if compress else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
        arrays[prefix] = (images, labels)
    return arrays


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_files_load_in_torchvision_layout(tmp_path, compress):
    arrays = write_mnist(tmp_path / "MNIST" / "raw", compress=compress)
    data = datasets.load(compose("dataset=mnist", f"dataset.root={tmp_path}", "dataset.standardize=false").dataset, CPU)
    assert data.x_train.shape == (40, 784) and data.x_test.shape == (20, 784)
    assert torch.allclose(data.x_train[3], torch.tensor(arrays["train"][0][3].reshape(-1) / 255.0, dtype=torch.float32))
    assert data.y_test.tolist() == arrays["t10k"][1].tolist() and data.task == "classification"


def test_standardisation_uses_training_statistics(tmp_path):
    write_mnist(tmp_path, n_train=200)
    data = datasets.load(compose("dataset=mnist", f"dataset.root={tmp_path}").dataset, CPU)
    assert data.x_train.mean(0).abs().max() < 1e-4
    assert torch.allclose(data.x_train.std(0), torch.ones(784), atol=1e-3)
    assert data.x_test.mean(0).abs().max() > 1e-3  # test split standardised with train stats, not its own


def test_fashion_mnist_found_in_the_debian_folder_without_options(tmp_path, monkeypatch):
    write_mnist(tmp_path / "debian", compress=True)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_ROOT", tmp_path / "debian")
    data = datasets.load(compose("dataset=fashion_mnist").dataset, CPU)
    assert data.x_train.shape == (40, 784)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"\x00\x00\x08\x07" + b[4:], "bad magic number"),
    (lambda b: b"\x12\x34" + b[2:], "bad magic number"),
    (lambda b: b[:-5], "wrong length"),
    (lambda b: b[:6], "truncated"),
])
def test_corrupt_idx_file_is_a_one_line_user_error(tmp_path, damage, message):
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UserError, match=message) as error:
        datasets.load(compose("dataset=mnist", f"dataset.root={tmp_path}").dataset, CPU)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_files_offline_name_the_path_and_the_remedy(tmp_path):
    with pytest.raises(UserError) as error:
        datasets.load(compose("dataset=mnist", f"dataset.root={tmp_path / 'none'}").dataset, CPU)
    text = str(error.value)
    assert str(tmp_path / "none") in text and "dataset.download=true" in text and "\n" not in text


def write_cifar(folder: Path, n=30, protocol=None) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(np.arange(n) % 10)}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 4, 5])  # 2: how the real batches were written; 5: Python 3.14's default
def test_cifar10_python_batches_load(tmp_path, protocol):
    write_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    data = datasets.load(compose("dataset=cifar10", f"dataset.root={tmp_path}", "dataset.validation=0").dataset, CPU)
    assert data.x_train.shape == (150, 3072) and data.x_test.shape == (30, 3072) and data.n_outputs == 10


def test_cifar10_corrupt_batch_is_a_user_error(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="data_batch_3"):
        datasets.load(compose("dataset=cifar10", f"dataset.root={tmp_path}").dataset, CPU)


def test_fraction_keeps_each_class_in_proportion():
    labels = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    keep = stratified_subset(labels, len(labels), 0.1, seed=0)
    counts = torch.bincount(labels[keep]).tolist()
    assert counts == [60, 30, 10]
    assert keep.unique().numel() == len(keep)
    assert torch.equal(keep, stratified_subset(labels, len(labels), 0.1, seed=0))  # deterministic


def test_synthetic_is_deterministic_and_learnable_structure():
    a = datasets.load(compose().dataset, CPU)
    b = datasets.load(compose().dataset, CPU)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    counts = torch.bincount(a.y_train, minlength=10)
    assert (counts > 0).sum() >= 8  # labels spread over the classes, not one constant class
    c = datasets.load(compose("dataset.seed=1").dataset, CPU)
    assert not torch.equal(a.y_train, c.y_train)


DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_reaches_84_percent(cli, tmp_path):
    """The issue's end-to-end check on real data (about 20 s on 2 cores)."""
    import json

    code, _, err = cli("run", "dataset=fashion_mnist", "depth=3", "width=256", "epochs=2", "optimizer=adam",
                       "lr=1e-3", "hydra.run.dir=out")
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["test_acc"] >= 0.84, summary["test_acc"]


class Payload:
    """Unpickling this runs a shell command: what a crafted data folder would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_cifar10_batch_does_not_run_its_payload(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    marker = tmp_path / "payload-ran"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump({"data": Payload(marker), "labels": [0]}, f)
    with pytest.raises(UserError) as error:
        datasets.load(compose("dataset=cifar10", f"dataset.root={tmp_path}").dataset, CPU)
    assert not marker.exists()
    assert "data_batch_2" in str(error.value) and "refused to load" in str(error.value)
    assert "system" in str(error.value) and "\n" not in str(error.value)


def test_a_gzip_that_inflates_past_its_header_is_refused_without_reading_it_all(tmp_path):
    import gzip

    header = bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big")  # declares 10 bytes of labels
    bomb = tmp_path / "train-labels-idx1-ubyte.gz"
    with gzip.open(bomb, "wb") as f:
        f.write(header)
        for _ in range(64):
            f.write(bytes(2 ** 20))  # 64 MiB of zeros after the 10 declared bytes
    from stabbench.datasets.idx import read_idx

    with pytest.raises(UserError, match="wrong length more than 18 bytes"):
        read_idx(bomb)


@pytest.mark.parametrize("dims", [(7154, 42799, 92737, 649657), (2 ** 31, 2 ** 31, 2)])
def test_an_idx_header_whose_size_overflows_int64_is_refused_before_reading(tmp_path, dims):
    """The product of these dims wraps around int64 (to -2, or below -1): the bound passed and
    the whole stream was inflated, or f.read(<-1) was a ValueError traceback."""
    import gzip

    from stabbench.datasets.idx import read_idx

    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(bomb, "wb") as f:
        f.write(bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims))
        f.write(bytes(2 ** 20))
    with pytest.raises(UserError, match="more than the .* allowed"):
        read_idx(bomb)
