"""Data: CIFAR-100 as in the paper, and scikit-learn's digits for offline runs."""
from __future__ import annotations

import os
from typing import Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CIFAR100_TRAIN_SIZE = 50_000


def _check_int(name: str, value, low: int, high: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value >= high):
        rule = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an integer {rule}, got {value!r}")


def seeded_split(n: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices) of a seeded random split; the same on every rank."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[val_size:]), sorted(perm[:val_size])


class CIFAR100DataModule(pl.LightningDataModule):
    """CIFAR-100 as in the paper: 45,000 train / 5,000 validation images of the official
    training set (a seeded split, identical on every rank), the official 10,000 test images.

    Training augmentation: RandomCrop(32, padding=4) and horizontal flips; all splits are
    normalised with the CIFAR-100 channel statistics.

    Args:
        data_dir: folder holding ``cifar-100-python.tar.gz`` or the extracted ``cifar-100-python/``.
        batch_size: per-process batch size (the paper: 128).
        val_size: images held out of the training set, in [0, 50000) (the paper: 5000).
        num_workers: DataLoader worker processes.
        seed: seed of the train/validation split.
        download: fetch the archive when it is missing (needs internet access).
    """

    num_classes = 100

    def __init__(self, data_dir: str = "data", batch_size: int = 128, val_size: int = 5000,
                 num_workers: int = 4, seed: int = 0, download: bool = True) -> None:
        super().__init__()
        if not isinstance(data_dir, (str, os.PathLike)):
            raise ValueError(f"data_dir must be a path, got {data_dir!r}")
        _check_int("batch_size", batch_size, 1)
        _check_int("val_size", val_size, 0, CIFAR100_TRAIN_SIZE)
        _check_int("num_workers", num_workers, 0)
        _check_int("seed", seed, 0)
        self.data_dir = os.fspath(data_dir)
        self.batch_size = batch_size
        self.val_size = val_size
        self.num_workers = num_workers
        self.seed = seed
        self.download = download
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None

    def _load(self, train: bool, transform, download: bool = False):
        from torchvision.datasets import CIFAR100

        try:
            return CIFAR100(self.data_dir, train=train, transform=transform, download=download)
        except Exception as err:  # torchvision raises RuntimeError / URLError / pickle errors
            where = os.path.abspath(self.data_dir)
            raise RuntimeError(
                f"CIFAR-100 could not be loaded from {where!r} ({type(err).__name__}: {err}). Put "
                f"'cifar-100-python.tar.gz' (https://www.cs.toronto.edu/~kriz/cifar.html) or its extracted "
                f"'cifar-100-python/' folder into {where!r}; files that are present but corrupt must be "
                "replaced."
            ) from err

    def prepare_data(self) -> None:
        self._load(True, None, download=self.download)
        self._load(False, None, download=self.download)

    def setup(self, stage: str) -> None:
        from torchvision import transforms as T

        normalize = T.Normalize(CIFAR100_MEAN, CIFAR100_STD)
        plain = T.Compose([T.ToTensor(), normalize])
        augment = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
        if stage in ("fit", "validate"):
            full_train, full_eval = self._load(True, augment), self._load(True, plain)
            if len(full_train) <= self.val_size:
                raise ValueError(f"val_size must be smaller than the training set ({len(full_train)} images "
                                 f"in {self.data_dir!r}), got {self.val_size!r}")
            train_idx, val_idx = seeded_split(len(full_train), self.val_size, self.seed)
            self.train_set = Subset(full_train, train_idx)
            self.val_set = Subset(full_eval, val_idx)
        if stage in ("test", "predict"):
            self.test_set = self._load(False, plain)

    def _loader(self, ds, shuffle: bool) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self):
        return self._loader(self.val_set, False) if self.val_size else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False)


class DigitsDataModule(pl.LightningDataModule):
    """The 1,797 real 8×8 handwritten digits shipped with scikit-learn, as 32×32 RGB images.

    Needs no download. Images are scaled to [0, 1], upsampled bilinearly to 32×32, repeated
    over 3 channels and standardised; training uses random 2-pixel shifts. A seeded split
    holds out ``val_size`` images, which also serve as the test set.

    Args:
        batch_size: per-process batch size.
        val_size: held-out images, in [1, 1797).
        num_workers: DataLoader worker processes.
        seed: seed of the split.
        limit: use only the first ``limit`` images (None: all); for quick tests.
    """

    num_classes = 10

    def __init__(self, batch_size: int = 64, val_size: int = 297, num_workers: int = 0, seed: int = 0,
                 limit: Optional[int] = None) -> None:
        super().__init__()
        _check_int("batch_size", batch_size, 1)
        _check_int("val_size", val_size, 1, 1797)
        _check_int("num_workers", num_workers, 0)
        _check_int("seed", seed, 0)
        if limit is not None:
            _check_int("limit", limit, val_size + 1, 1798)
        self.batch_size, self.val_size, self.num_workers, self.seed, self.limit = (
            batch_size, val_size, num_workers, seed, limit)
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None

    def setup(self, stage: str) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32)[: self.limit, None] / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)[: self.limit]
        x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
        x = (x - x.mean()) / x.std()
        train_idx, val_idx = seeded_split(len(y), self.val_size, self.seed)
        self.train_set = _Shifted(x[train_idx], y[train_idx], fill=float(x.min()))
        self.val_set = TensorDataset(x[val_idx], y[val_idx])

    def _loader(self, ds, shuffle: bool) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)


class _Shifted(Dataset):
    """Random translation by up to 2 pixels (padded with the background value ``fill``)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, fill: float) -> None:
        self.x, self.y, self.fill = x, y, fill

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        img = F.pad(self.x[i], (2, 2, 2, 2), value=self.fill)
        dy, dx = torch.randint(0, 5, (2,)).tolist()
        return img[:, dy:dy + 32, dx:dx + 32], self.y[i]
