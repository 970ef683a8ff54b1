"""Loaders: augmented images are windows of the zero-padded source, counts, sharding, resume.

Every check runs for each loader: gpu (the tensor path, here on CPU), torch, dali fed with
arrays, and dali decoding a PNG folder (lossless, so pixels can be compared exactly).
"""

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rlaux_fast.data import Split, make_loader
from rlaux_fast.data.loaders import DaliLoader, TensorLoader, TorchLoader
from rlaux_fast.errors import UserError

HAS_DALI = importlib.util.find_spec("nvidia.dali") is not None
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_dali = pytest.mark.skipif(not HAS_DALI, reason="NVIDIA DALI is not installed (pip install 'rlaux_fast[dali]')")
VARIANTS = [
    "gpu",
    "torch",
    pytest.param("dali", marks=needs_dali),
    pytest.param("dali-files", marks=needs_dali),
]


def random_split(n, seed=0, size=32, fine=True):
    """Pixels in 1..255, so the zero padding can never be mistaken for image content."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(1, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    primary = torch.randint(0, 5, (n,), generator=g)
    return Split(images, primary, primary * 2 + torch.randint(0, 2, (n,), generator=g) if fine else None)


def with_png_files(split, folder):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, img in enumerate(split.images):
        path = folder / f"{i:05d}.png"
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)
        files.append(str(path))
    return Split(split.images, split.primary, split.fine, files)


@pytest.fixture
def build(tmp_path):
    """build(variant, split, **kw) -> loader; 'dali-files' gives DALI the split as PNG files."""

    def make(variant, split, device="cpu", **kw):
        if variant == "dali-files":
            split = with_png_files(split, tmp_path / f"png{len(split)}")
            variant = "dali"
        kw = {"batch_size": 16, "train": True, "mean": MEAN, "std": STD, "flip": True} | kw
        return make_loader(split, kind=variant, device=device, **kw)

    return make


def raw_pixels(images):
    """Undo the normalisation: back to integer pixel values."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD).view(1, 3, 1, 1) * 255
    raw = images.float().cpu() * std + mean
    assert (raw - raw.round()).abs().max() < 1e-3
    return raw.round().to(torch.int64)


def window_of(raw, source):
    """(dy, dx, mirrored) of each image in raw [B,3,H,W] as a window of source zero-padded by 4;
    (-1, -1, -1) where it is no such window."""
    h, w = raw.shape[-2:]
    padded = F.pad(source, (4, 4, 4, 4)).to(torch.int64)
    found = torch.full((raw.shape[0], 3), -1)
    # Find the candidate on a 4x4 probe that lies inside the source for every offset ...
    probe = raw[:, :, 12:16, 12:16]
    for dy in range(9):
        for dx in range(9):
            window = padded[:, :, dy : dy + h, dx : dx + w]
            for mirrored, cand in ((0, window[:, :, 12:16, 12:16]), (1, window[:, :, 12:16, w - 16 : w - 12].flip(-1))):
                hit = (cand == probe).flatten(1).all(1)
                found[hit] = torch.tensor([dy, dx, mirrored])
    # ... then check the whole image against it.
    for i, (dy, dx, mirrored) in enumerate(found.tolist()):
        if dy >= 0:
            window = padded[i, :, dy : dy + h, dx : dx + w]
            if not torch.equal(window.flip(-1) if mirrored else window, raw[i]):
                found[i] = -1
    return found


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("device", DEVICES)
def test_every_image_is_a_padded_window_and_every_offset_occurs(build, variant, device):
    split = random_split(512)
    loader = build(variant, split, device=device, batch_size=128)
    seen = []
    for epoch in range(4):  # 2,048 draws: all 81 offsets and both flips, with overwhelming odds
        loader.set_epoch(epoch)
        for batch in loader:
            assert batch.images.dtype == torch.float32 and batch.images.device.type == device
            assert torch.equal(batch.primary.cpu(), split.primary[batch.index.cpu()])
            assert torch.equal(batch.fine.cpu(), split.fine[batch.index.cpu()])
            found = window_of(raw_pixels(batch.images), split.images[batch.index.cpu()])
            assert (found >= 0).all(), "an augmented image is not a window of the padded source"
            seen.append(found)
    seen = torch.cat(seen)
    assert len({(int(a), int(b)) for a, b, _ in seen}) == 81
    assert set(seen[:, 2].tolist()) == {0, 1}


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_flip_never_mirrors(build, variant):
    split = random_split(64)
    batch = next(iter(build(variant, split, batch_size=64, flip=False)))
    found = window_of(raw_pixels(batch.images), split.images[batch.index])
    assert (found >= 0).all() and (found[:, 2] == 0).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_eval_batches_are_plain_in_order_and_complete(build, variant):
    split = random_split(42)
    loader = build(variant, split, train=False, drop_last=True)  # drop_last never applies to eval
    batches = list(loader)
    assert len(loader) == 3 and [len(b.index) for b in batches] == [16, 16, 10]
    index = torch.cat([b.index for b in batches])
    assert index.tolist() == list(range(42))
    images = torch.cat([b.images for b in batches])
    assert torch.equal(raw_pixels(images), split.images.to(torch.int64))


@pytest.mark.parametrize("variant", VARIANTS)
def test_batch_counts_under_both_last_batch_policies(build, variant):
    split = random_split(42)
    drop = build(variant, split, drop_last=True)
    keep = build(variant, split, drop_last=False)
    assert len(drop) == 2 and [len(b.index) for b in drop] == [16, 16]
    assert len(keep) == 3 and [len(b.index) for b in keep] == [16, 16, 10]
    everything = torch.cat([b.index for b in keep])
    assert sorted(everything.tolist()) == list(range(42))  # a permutation of the epoch
    assert everything.tolist() != list(range(42))  # shuffled


@pytest.mark.parametrize("variant", VARIANTS)
def test_sharding_gives_disjoint_equal_shards_of_one_permutation(build, variant):
    split = random_split(43)
    shards = []
    for rank in range(2):
        loader = build(variant, split, drop_last=False, rank=rank, world_size=2, seed=5)
        loader.set_epoch(3)
        shards.append(torch.cat([b.index for b in loader]).tolist())
    assert len(shards[0]) == len(shards[1]) == 21  # 43 trimmed to 42, then 21 each
    assert not set(shards[0]) & set(shards[1])
    one = build(variant, split, drop_last=False, seed=5)
    one.set_epoch(3)
    # Both ranks cut the same seeded permutation: interleaving them gives its first 42 entries.
    interleaved = [i for pair in zip(*shards) for i in pair]
    assert interleaved == torch.cat([b.index for b in one]).tolist()[:42]
    evals = [torch.cat([b.index for b in build(variant, split, train=False, rank=r, world_size=2)]) for r in range(2)]
    assert sorted(torch.cat(evals).tolist()) == list(range(43))  # eval sees every example once


@pytest.mark.parametrize("variant", VARIANTS)
def test_iter_from_is_the_tail_of_a_full_iteration(build, variant):
    split = random_split(80)
    loader = build(variant, split, drop_last=False)
    loader.set_epoch(2)
    full = list(loader)
    for k in (1, 3, len(full)):
        tail = list(loader.iter_from(k))
        assert len(tail) == len(full) - k
        for a, b in zip(tail, full[k:]):
            assert torch.equal(a.index, b.index) and torch.equal(a.images, b.images)


@pytest.mark.parametrize("variant", VARIANTS)
def test_epochs_are_seeded(build, variant):
    split = random_split(48)
    a, b = build(variant, split, seed=1), build(variant, split, seed=1)
    a.set_epoch(4)
    b.set_epoch(4)
    for x, y in zip(a, b):
        assert torch.equal(x.index, y.index) and torch.equal(x.images, y.images)
    first = torch.cat([x.index for x in a])
    a.set_epoch(5)
    assert not torch.equal(first, torch.cat([x.index for x in a]))


@pytest.mark.parametrize("variant", ["torch", pytest.param("dali", marks=needs_dali), pytest.param("dali-files", marks=needs_dali)])
@pytest.mark.parametrize("train", [True, False])
def test_all_loaders_give_the_same_batches(build, variant, train):
    split = random_split(50)
    reference = list(build("gpu", split, train=train, drop_last=False))
    other = list(build(variant, split, train=train, drop_last=False))
    assert len(other) == len(reference)
    for a, b in zip(reference, other):
        assert torch.equal(a.index, b.index)
        torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-5)


def test_no_fine_labels_give_none(build):
    batch = next(iter(build("gpu", random_split(20, fine=False))))
    assert batch.fine is None


def test_auto_picks_the_tensor_path_on_cpu():
    loader = make_loader(random_split(20), kind="auto", batch_size=4, train=True, device="cpu", mean=MEAN, std=STD, flip=True)
    assert isinstance(loader, TensorLoader)
    loader = make_loader(random_split(20), kind="torch", batch_size=4, train=True, device="cpu", mean=MEAN, std=STD, flip=True)
    assert isinstance(loader, TorchLoader)


def test_bad_arguments_are_user_errors():
    split = random_split(20)
    kw = {"batch_size": 4, "train": True, "mean": MEAN, "std": STD, "flip": True}
    with pytest.raises(UserError, match="unknown loader"):
        make_loader(split, kind="fast", **kw)
    with pytest.raises(UserError, match="rank 2 outside world size 2"):
        make_loader(split, rank=2, world_size=2, **kw)
    with pytest.raises(UserError, match="lower --batch-size"):
        make_loader(split, **(kw | {"batch_size": 64}))


def test_dali_missing_names_the_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import now fails
    with pytest.raises(UserError, match=r"pip install 'rlaux_fast\[dali\]'"):
        make_loader(random_split(20), kind="dali", batch_size=4, train=True, mean=MEAN, std=STD, flip=True)


@needs_dali
@pytest.mark.parametrize("variant", ["dali", "dali-files"])
def test_dali_on_cpu_never_touches_cuda(build, variant, monkeypatch):
    if torch.cuda.is_initialized():
        pytest.skip("CUDA was initialised earlier in this process")

    def no_cuda(*a, **k):
        raise AssertionError("a CPU DALI loader touched CUDA")

    for name in ("_lazy_init", "current_device", "current_stream", "synchronize", "init", "set_device"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    loader = build(variant, random_split(40))
    assert isinstance(loader, DaliLoader) and loader.device_id is None
    batches = list(loader)
    assert len(batches) == 2 and batches[0].images.device.type == "cpu"
    assert not torch.cuda.is_initialized()
