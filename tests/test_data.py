"""Hierarchy and datasets: block layout, CIFAR-100 pickles (and hostile ones), mnist5k, folders."""

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from rlaux_fast.data import Hierarchy, load_dataset
from rlaux_fast.data import datasets as datasets_mod
from rlaux_fast.errors import DataError

CIFAR10_TAR = Path("/work/shared/data/cifar10-jpeg.tar.gz")


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- hierarchy


def test_uniform_hierarchy_blocks_and_mask():
    h = Hierarchy.uniform(3, 2)
    assert h.psi == (2, 2, 2) and h.num_primary == 3 and h.num_aux == 6
    assert h.block_start.tolist() == [0, 2, 4] and h.block_size.tolist() == [2, 2, 2]
    assert h.block_start.dtype == torch.int64
    mask = h.block_mask(torch.tensor([0, 2, 1]))
    assert mask.dtype == torch.bool and mask.tolist() == [
        [True, True, False, False, False, False],
        [False, False, False, False, True, True],
        [False, False, True, True, False, False],
    ]


def test_nonuniform_hierarchy_blocks_and_mask():
    h = Hierarchy([2, 3, 4])
    assert h.num_aux == 9
    assert h.block_start.tolist() == [0, 2, 5] and h.block_size.tolist() == [2, 3, 4]
    mask = h.block_mask(torch.tensor([1, 2, 0]))
    assert mask.int().tolist() == [
        [0, 0, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 1, 1],
        [1, 1, 0, 0, 0, 0, 0, 0, 0],
    ]
    start, size = h.blocks("cpu")
    assert torch.equal(start, h.block_start) and torch.equal(size, h.block_size)
    assert h == Hierarchy((2, 3, 4))


def test_from_fine_to_primary_ranks_fine_ids_inside_blocks():
    f2p = [1, 0, 1, 2, 0, 2, 2, 1, 2]
    h, fine_to_aux = Hierarchy.from_fine_to_primary(f2p)
    assert h.psi == (2, 3, 4)
    # primary 0: fines 1, 4 -> aux 0, 1; primary 1: fines 0, 2, 7 -> 2, 3, 4; primary 2: 3, 5, 6, 8 -> 5..8
    assert fine_to_aux.tolist() == [2, 0, 3, 5, 1, 6, 7, 4, 8]
    mask = h.block_mask(torch.tensor(f2p))
    assert mask[torch.arange(9), fine_to_aux].all()


@pytest.mark.parametrize("psi", [[], [2, 0], [3, -1], [1.5], ["a"]])
def test_bad_psi_is_a_data_error(psi):
    with pytest.raises(DataError) as e:
        Hierarchy(psi)
    one_line_error(e)


def test_primary_without_fine_class_is_a_data_error():
    with pytest.raises(DataError, match="primary class 1 has no fine class"):
        Hierarchy.from_fine_to_primary([0, 2, 2])


# ---------------------------------------------------------------- CIFAR-100 pickles


def cifar100_mapping(seed=0):
    """A shuffled fine -> coarse map with 5 fine classes per super-class (like the real one)."""
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(seed))
    return (perm // 5).numpy()


def write_cifar100(root, fine_to_coarse, per_fine=(2, 1), protocol=2):
    base = root / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, k in zip(("train", "test"), per_fine):
        fine = np.repeat(np.arange(100), k)
        rng.shuffle(fine)
        d = {
            b"filenames": [b"x.png"] * len(fine),
            b"batch_label": b"training batch 1 of 1",
            b"fine_labels": fine.tolist(),
            b"coarse_labels": [int(fine_to_coarse[f]) for f in fine],
            b"data": rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8),
        }
        with open(base / name, "wb") as f:
            pickle.dump(d, f, protocol=protocol)
    return base


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar100_20_loads_the_real_pickle_format(tmp_path, protocol):
    f2c = cifar100_mapping()
    base = write_cifar100(tmp_path, f2c, protocol=protocol)
    ds = load_dataset("cifar100-20", tmp_path)
    assert ds.hierarchy.psi == (5,) * 20 and ds.flip
    assert len(ds.train) == 200 and len(ds.test) == 100
    with open(base / "train", "rb") as f:
        raw = pickle.load(f)
    assert torch.equal(ds.train.images, torch.from_numpy(raw[b"data"]).view(-1, 3, 32, 32))
    assert ds.train.fine.tolist() == raw[b"fine_labels"]
    assert ds.train.primary.tolist() == raw[b"coarse_labels"]
    # Each fine class's aux index lies inside its super-class block, one fine class per slot.
    mask = ds.hierarchy.block_mask(torch.as_tensor(f2c))
    assert mask[torch.arange(100), ds.fine_to_aux].all()
    assert sorted(ds.fine_to_aux.tolist()) == list(range(100))
    assert ds.mean == pytest.approx((0.5071, 0.4865, 0.4409))


def test_cifar100_limit_keeps_the_hierarchy(tmp_path):
    write_cifar100(tmp_path, cifar100_mapping())
    ds = load_dataset("cifar100-20", tmp_path, limit=30)
    assert len(ds.train) == 30 and len(ds.test) == 30 and ds.hierarchy.num_aux == 100


def test_cifar100_superclass_with_four_fine_classes_is_refused(tmp_path):
    f2c = cifar100_mapping()
    moved = int(np.nonzero(f2c == 3)[0][0])
    f2c[moved] = 7  # super-class 3 now holds 4 fine classes, super-class 7 holds 6
    write_cifar100(tmp_path, f2c)
    with pytest.raises(DataError) as e:
        load_dataset("cifar100-20", tmp_path)
    assert "super-class 3 holds 4 fine classes" in one_line_error(e)


def test_cifar100_fine_class_under_two_superclasses_is_refused(tmp_path):
    base = write_cifar100(tmp_path, cifar100_mapping())
    with open(base / "train", "rb") as f:
        d = pickle.load(f)
    i = d[b"fine_labels"].index(0)
    d[b"coarse_labels"][i] = (d[b"coarse_labels"][i] + 1) % 20
    with open(base / "train", "wb") as f:
        pickle.dump(d, f)
    with pytest.raises(DataError, match="fine class 0 appears under super-classes"):
        load_dataset("cifar100-20", tmp_path)


def test_truncated_cifar100_pickle_is_a_data_error(tmp_path):
    base = write_cifar100(tmp_path, cifar100_mapping())
    blob = (base / "train").read_bytes()
    (base / "train").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError) as e:
        load_dataset("cifar100-20", tmp_path)
    assert "truncated or corrupt" in one_line_error(e)


def test_wrong_shape_cifar100_pickle_is_a_data_error(tmp_path):
    base = write_cifar100(tmp_path, cifar100_mapping())
    with open(base / "train", "rb") as f:
        d = pickle.load(f)
    d[b"data"] = d[b"data"][:, :1000]
    with open(base / "train", "wb") as f:
        pickle.dump(d, f)
    with pytest.raises(DataError, match=r"expected uint8 \[N, 3072\]"):
        load_dataset("cifar100-20", tmp_path)


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_a_command_is_refused(tmp_path):
    base = write_cifar100(tmp_path, cifar100_mapping())
    marker = tmp_path / "pwned"
    with open(base / "train", "rb") as f:
        d = pickle.load(f)
    d[b"batch_label"] = _RunsACommand(marker)
    with open(base / "train", "wb") as f:
        pickle.dump(d, f, protocol=2)
    with pytest.raises(DataError) as e:
        load_dataset("cifar100-20", tmp_path)
    msg = one_line_error(e)
    assert msg.startswith("refusing to unpickle") and "system" in msg and "not a CIFAR data file" in msg
    assert not marker.exists()


def test_missing_cifar100_names_the_fix(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("cifar100-20", tmp_path)
    msg = one_line_error(e)
    assert "not found" in msg and "--download" in msg and "--data-dir" in msg


def test_cifar10_loads_its_batches(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"labels": rng.integers(0, 10, 7).tolist(), b"data": rng.integers(0, 256, (7, 3072), dtype=np.uint8)}
        with open(base / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
    ds = load_dataset("cifar10", tmp_path, psi=3)
    assert len(ds.train) == 35 and len(ds.test) == 7 and ds.train.fine is None and ds.fine_to_aux is None
    assert ds.hierarchy.psi == (3,) * 10 and ds.flip
    assert load_dataset("cifar10", tmp_path, image_size=24).train.images.shape == (35, 3, 24, 24)


def test_missing_cifar10_and_svhn_without_download(tmp_path):
    for name in ("cifar10", "svhn"):
        with pytest.raises(DataError) as e:
            load_dataset(name, tmp_path)
        assert "--download" in one_line_error(e)


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet")


# ---------------------------------------------------------------- mnist5k


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist5k")


def test_mnist5k_split_shapes_and_labels(mnist):
    assert len(mnist.train) == 4000 and len(mnist.test) == 1000
    for split, per_digit in ((mnist.train, 400), (mnist.test, 100)):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 32, 32)
        assert torch.bincount(split.fine, minlength=10).tolist() == [per_digit] * 10  # stratified
        assert torch.equal(split.primary, split.fine // 2)
        assert torch.equal(split.images[:, 0], split.images[:, 1]) and torch.equal(split.images[:, 0], split.images[:, 2])
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert split.images[:, :, border].eq(0).all()  # 2 px of zero padding
    assert mnist.hierarchy.psi == (2,) * 5 and mnist.fine_to_aux.tolist() == list(range(10))
    assert not mnist.flip
    train_keys = {bytes(x.numpy()) for x in mnist.train.images}
    assert not any(bytes(x.numpy()) in train_keys for x in mnist.test.images)


def test_mnist5k_split_is_fixed_and_limit_subsamples(mnist):
    again = load_dataset("mnist5k", seed=3)
    assert torch.equal(again.test.images, mnist.test.images) and torch.equal(again.train.fine, mnist.train.fine)
    small = load_dataset("mnist5k", limit=100)
    assert len(small.train) == 100 and len(small.test) == 100
    assert small.train.fine.unique().numel() > 5  # a random subset, not the first digits


# ---------------------------------------------------------------- image folders


@pytest.fixture(scope="module")
def cifar10_folder(tmp_path_factory):
    """A few real CIFAR-10 JPEGs per class, in the nested train/<primary>/<fine>/ layout."""
    if not CIFAR10_TAR.is_file():
        pytest.skip(f"{CIFAR10_TAR} is absent: the real CIFAR-10 JPEG sample is not available here")
    out = tmp_path_factory.mktemp("cifar10jpeg")
    keep = {"0000.jpg", "0001.jpg", "0002.jpg"}
    with tarfile.open(CIFAR10_TAR, "r:gz") as tar:
        members = [m for m in tar if m.isfile() and os.path.basename(m.name) in keep]
        tar.extractall(out, members=members, filter="data")
    return out / "cifar10"


def test_folder_dataset_nested_hierarchy(cifar10_folder):
    ds = load_dataset("folder", cifar10_folder)
    assert ds.hierarchy.psi == (6, 4)  # animal: bird cat deer dog frog horse; vehicle: 4 kinds
    assert len(ds.train) == 30 and len(ds.test) == 30 and ds.flip
    assert ds.train.images.shape == (30, 3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert ds.fine_to_aux.tolist() == list(range(10))
    fine_names = ["bird", "cat", "deer", "dog", "frog", "horse", "airplane", "automobile", "ship", "truck"]
    for split in (ds.train, ds.test):
        assert len(split.files) == 30
        for f, fine, primary in zip(split.files, split.fine.tolist(), split.primary.tolist()):
            assert Path(f).parent.name == fine_names[fine]
            assert Path(f).parent.parent.name == ("animal", "vehicle")[primary]
    from PIL import Image

    pixels = torch.from_numpy(np.array(Image.open(ds.train.files[7]).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(ds.train.images[7], pixels)
    assert all(0 < m < 1 for m in ds.mean) and all(0 < s < 1 for s in ds.std)


def test_folder_dataset_limit_decodes_only_the_subset(cifar10_folder):
    full = load_dataset("folder", cifar10_folder)
    ds = load_dataset("folder", cifar10_folder, limit=12, seed=3)
    assert ds.hierarchy.psi == (6, 4) and len(ds.train) == 12 and len(ds.test) == 12
    assert ds.train.images.shape == (12, 3, 32, 32)
    again = load_dataset("folder", cifar10_folder, limit=12, seed=3)
    assert again.train.files == ds.train.files  # a fixed subset
    for f, image in zip(ds.train.files, ds.train.images):
        assert torch.equal(image, full.train.images[full.train.files.index(f)])


def test_folder_dataset_flat(cifar10_folder):
    ds = load_dataset("folder", cifar10_folder, flat=True, psi=3)
    assert ds.hierarchy.psi == (3,) * 10 and ds.fine_to_aux is None and ds.train.fine is None
    standard = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for f, primary in zip(ds.train.files, ds.train.primary.tolist()):
        assert Path(f).parent.name == standard[primary]  # the usual CIFAR-10 label order


def test_folder_cache_reused_and_invalidated(cifar10_folder, tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "c10"
    shutil.copytree(cifar10_folder, root)
    first = load_dataset("folder", root)
    assert (root / ".rlaux_cache_train_32.pt").is_file() and (root / ".rlaux_cache_test_32.pt").is_file()

    def no_decoding(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(datasets_mod, "_decode", no_decoding)
    second = load_dataset("folder", root)
    assert torch.equal(first.train.images, second.train.images)
    monkeypatch.undo()
    os.remove(second.train.files[0])  # another file list: the cache must not be used
    third = load_dataset("folder", root)
    assert len(third.train) == 29 and torch.equal(third.train.images, first.train.images[1:])


def test_folder_unwritable_cache_is_skipped(cifar10_folder, monkeypatch):
    def refuse(*a, **k):
        raise PermissionError("read-only")

    monkeypatch.setattr(datasets_mod.tempfile, "mkstemp", refuse)
    ds = load_dataset("folder", cifar10_folder, image_size=16)
    assert ds.train.images.shape == (30, 3, 16, 16)


def write_png_tree(root, sizes=((40, 24),)):
    from PIL import Image

    for split in ("train", "test"):
        for primary, fines in (("a", ("x", "y")), ("b", ("z",))):
            for fine in fines:
                d = root / split / primary / fine
                d.mkdir(parents=True)
                for i, (h, w) in enumerate(sizes):
                    Image.fromarray(np.random.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_folder_resizes_any_size(tmp_path):
    write_png_tree(tmp_path)
    ds = load_dataset("folder", tmp_path)
    assert ds.hierarchy.psi == (2, 1) and ds.train.images.shape == (3, 3, 32, 32)


def test_folder_errors_are_one_line(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("folder", tmp_path / "nowhere")
    assert "not found" in one_line_error(e)
    write_png_tree(tmp_path)
    (tmp_path / "train" / "a" / "empty").mkdir()
    (tmp_path / "test" / "a" / "empty").mkdir()
    with pytest.raises(DataError) as e:
        load_dataset("folder", tmp_path)
    assert "holds no .jpg/.jpeg/.png files" in one_line_error(e)
    os.rmdir(tmp_path / "test" / "a" / "empty")
    with pytest.raises(DataError, match="other class folders"):
        load_dataset("folder", tmp_path)
    (tmp_path / "train" / "b" / "z" / "0.png").write_bytes(b"not a png")
    os.rmdir(tmp_path / "train" / "a" / "empty")
    with pytest.raises(DataError, match="cannot decode image"):
        load_dataset("folder", tmp_path)
