"""Networks, data modules and the LightningModule."""
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR100

from lightning_kfac_swa.data import CIFAR100DataModule, DigitsDataModule
from lightning_kfac_swa.models import VGG16, PreResNet, PreResNet110
from lightning_kfac_swa.module import ImageClassifier


@pytest.mark.parametrize("make, count", [
    (lambda: VGG16(100), 15_299_748),
    (lambda: VGG16(100, batch_norm=False), 15_291_300),
    (lambda: PreResNet110(100), 1_169_972),
])
def test_parameter_counts_and_output_shapes(make, count):
    net = make()
    assert sum(p.numel() for p in net.parameters()) == count
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_preresnet_block_rules():
    assert sum(isinstance(m, torch.nn.Conv2d) for m in PreResNet(110).modules()) == 1 + 3 * 36 + 3
    assert sum(isinstance(m, torch.nn.Conv2d) for m in PreResNet(20, 10).modules()) == 1 + 2 * 9 + 2
    assert PreResNet(20, 10)(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_vgg16_init_follows_the_swa_code():
    net = VGG16(100)
    conv = [m for m in net.features if isinstance(m, torch.nn.Conv2d)][-1]
    assert conv.weight.std().item() == pytest.approx((2 / (9 * 512)) ** 0.5, rel=0.05)
    assert conv.bias.abs().sum() == 0


@pytest.mark.parametrize("make, match", [
    (lambda: PreResNet(50), r"depth must satisfy \(depth - 2\) % 9 == 0 for depth >= 44 .* got 50"),
    (lambda: PreResNet(22), r"depth must satisfy \(depth - 2\) % 6 == 0 for depth < 44 .* got 22"),
    (lambda: PreResNet(4), "depth must be an integer >= 8, got 4"),
    (lambda: PreResNet(20, num_classes=1), "num_classes must be an integer >= 2, got 1"),
    (lambda: VGG16(num_classes=0), "num_classes must be an integer >= 2, got 0"),
    (lambda: VGG16(batch_norm="yes"), "batch_norm must be a bool, got 'yes'"),
    (lambda: CIFAR100DataModule(val_size=50_000), r"val_size must be an integer in \[0, 50000\), got 50000"),
    (lambda: CIFAR100DataModule(val_size=-1), r"val_size must be an integer in \[0, 50000\), got -1"),
    (lambda: CIFAR100DataModule(batch_size=0), "batch_size must be an integer >= 1, got 0"),
    (lambda: DigitsDataModule(val_size=0), r"val_size must be an integer in \[1, 1797\), got 0"),
    (lambda: ImageClassifier(torch.nn.Conv2d(3, 3, 1)), "network must end in an nn.Linear classifier"),
    (lambda: ImageClassifier(PreResNet(20, 10), num_classes=1), "num_classes must be an integer >= 2, got 1"),
])
def test_bad_input_is_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def write_cifar100(root, n_train=60, n_test=20, archive=True, seed=0):
    """A small CIFAR-100 in the real format: pickled dicts of uint8 rows, fine and coarse labels."""
    rng = np.random.default_rng(seed)
    files = {}
    for name, n in (("train", n_train), ("test", n_test)):
        files[name] = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                       "fine_labels": rng.integers(0, 100, n).tolist(),
                       "coarse_labels": rng.integers(0, 20, n).tolist(),
                       "filenames": [f"img{i}.png" for i in range(n)], "batch_label": name}
    files["meta"] = {"fine_label_names": [f"class{i}" for i in range(100)],
                     "coarse_label_names": [f"super{i}" for i in range(20)]}
    if archive:
        with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
            for name, obj in files.items():
                blob = pickle.dumps(obj)
                info = tarfile.TarInfo(f"cifar-100-python/{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    else:
        (root / "cifar-100-python").mkdir(parents=True)
        for name, obj in files.items():
            (root / "cifar-100-python" / name).write_bytes(pickle.dumps(obj))
    return files


@pytest.fixture
def small_cifar_checksums(monkeypatch):
    """The real loader checks the official files' md5; our small files have their own."""
    monkeypatch.setattr(CIFAR100, "train_list", [["train", None]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", None]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": None})
    monkeypatch.setattr(CIFAR100, "tgz_md5", None)


def test_cifar100_from_archive_through_torchvision(tmp_path, small_cifar_checksums):
    files = write_cifar100(tmp_path, archive=True)
    dm = CIFAR100DataModule(tmp_path, batch_size=8, val_size=10, num_workers=0, download=True)
    dm.prepare_data()  # finds the archive and extracts it; nothing is downloaded
    dm.setup("fit")
    assert len(dm.train_set) == 50 and len(dm.val_set) == 10
    other = CIFAR100DataModule(tmp_path, val_size=10, num_workers=0, download=False)
    other.setup("fit")
    assert dm.val_set.indices == other.val_set.indices  # stable split
    assert not set(dm.val_set.indices) & set(dm.train_set.indices)
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    i = dm.val_set.indices[0]
    assert y[0].item() == files["train"]["fine_labels"][i]
    raw = torch.tensor(files["train"]["data"][i], dtype=torch.float32).reshape(3, 32, 32) / 255
    mean = torch.tensor([0.5071, 0.4865, 0.4409])[:, None, None]
    std = torch.tensor([0.2673, 0.2564, 0.2762])[:, None, None]
    torch.testing.assert_close(x[0], (raw - mean) / std)  # validation: no augmentation
    xt, _ = next(iter(dm.train_dataloader()))
    assert xt.shape == (8, 3, 32, 32)
    dm.setup("test")
    assert len(dm.test_set) == 20


def test_cifar100_missing_or_corrupt_gives_clear_error(tmp_path, small_cifar_checksums):
    dm = CIFAR100DataModule(tmp_path / "nowhere", download=False, num_workers=0)
    with pytest.raises(RuntimeError, match=r"CIFAR-100 could not be loaded from .*nowhere.*cifar-100-python.tar.gz"):
        dm.setup("fit")
    write_cifar100(tmp_path, archive=False)
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"not a pickle")
    with pytest.raises(RuntimeError, match="CIFAR-100 could not be loaded from .*corrupt must be replaced"):
        CIFAR100DataModule(tmp_path, download=False, num_workers=0, val_size=5).setup("fit")


def test_digits_are_real_and_split_is_seeded():
    dm = DigitsDataModule(batch_size=32, val_size=297)
    dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 1797
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 32, 32) and set(y.tolist()) <= set(range(10))
    other = DigitsDataModule(val_size=297)
    other.setup("fit")
    assert torch.equal(dm.val_set.tensors[1], other.val_set.tensors[1])
