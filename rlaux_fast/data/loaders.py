"""Batches for training and evaluation: shuffle, shard, augment, normalise.

Three loaders, one contract. Every loader draws the same epoch plan: the order of the examples
(a permutation seeded by (seed, epoch), the same on every rank, trimmed so every rank gets the
same count, rank r taking positions r, r + world_size, ...) and every example's augmentation
(crop offsets and flip seeded by (seed, epoch), drawn per position of the permutation and sharded
like it: N ranks with batch B/N together see exactly the batches of one rank with batch B). The plan is a pure function of those
numbers, so `iter_from(k)` gives exactly the batches k, k+1, ... of a fresh iteration, and the
three loaders give the same batches (DALI up to float rounding, and its own JPEG decoder).

    gpu    the split lives on `device` as uint8; crop, flip and normalisation are batched
           tensor ops there (one gather per batch). Also the fastest path on CPU, so `auto` picks
           it everywhere except for CUDA splits too large to keep on the GPU.
    torch  a torch DataLoader over the same batched augmentation on CPU; uint8 batches move to
           the device (pinned, non-blocking) and are normalised there. The baseline.
    dali   an NVIDIA DALI pipeline: arrays enter through external_source, image folders through
           readers.file + decoders.image; crop (fn.slice, out-of-bounds padded with zeros), flip
           and normalisation (crop_mirror_normalize) run on the GPU on CUDA, on CPU otherwise.

Training augmentation: a random image_size crop of the image zero-padded by 4 pixels (offset
0..8 on each axis, uniform), a horizontal flip with p = 0.5 when `flip`, then
(x / 255 - mean) / std. Test loaders keep the order, do not augment, keep the last partial batch,
and shard without trimming (rank r takes r, r + world_size, ...; counts may differ by one), so
the ranks together see every test example exactly once.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from rlaux_fast.data.datasets import Split
from rlaux_fast.errors import DataError, UserError

LOADERS = ("auto", "gpu", "torch", "dali")
PAD = 4  # pixels of zero padding around the image before the random crop
GPU_RESIDENT_LIMIT = 4 * 2**30  # bytes: larger splits stream through the torch loader


class Batch(NamedTuple):
    images: torch.Tensor  # float32 [B, 3, H, W], normalised, on the device
    primary: torch.Tensor  # int64 [B]
    fine: torch.Tensor | None  # int64 [B]
    index: torch.Tensor  # int64 [B]: positions in the split


class Plan(NamedTuple):
    """One rank's epoch: example order and each example's augmentation (CPU tensors [m])."""

    index: torch.Tensor  # int64
    dy: torch.Tensor  # int64, row offset into the padded image, 0..2*PAD
    dx: torch.Tensor  # int64, column offset, 0..2*PAD
    mirror: torch.Tensor  # bool


def _seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (a stable hash: same on every machine)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


def make_loader(
    split: Split,
    *,
    kind: str = "auto",
    batch_size: int,
    train: bool,
    device: torch.device | str = "cpu",
    mean: tuple[float, ...],
    std: tuple[float, ...],
    flip: bool,
    drop_last: bool = True,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_threads: int = 2,
) -> _Loader:
    device = torch.device(device)
    if kind == "auto":
        padded_bytes = len(split) * 3 * (split.images.shape[-2] + 2 * PAD) * (split.images.shape[-1] + 2 * PAD)
        kind = "torch" if device.type == "cuda" and padded_bytes > GPU_RESIDENT_LIMIT else "gpu"
    classes = {"gpu": TensorLoader, "torch": TorchLoader, "dali": DaliLoader}
    if kind not in classes:
        raise UserError(f"unknown loader {kind!r}: pick one of {', '.join(LOADERS)}")
    return classes[kind](split, batch_size=batch_size, train=train, device=device, mean=mean, std=std,
                         flip=flip, drop_last=drop_last, seed=seed, rank=rank, world_size=world_size,
                         num_threads=num_threads)


class _Loader:
    """Epoch plan, length and resume; subclasses turn a plan into batches."""

    def __init__(self, split: Split, *, batch_size: int, train: bool, device: torch.device,
                 mean, std, flip: bool, drop_last: bool, seed: int, rank: int, world_size: int,
                 num_threads: int):
        if batch_size < 1:
            raise UserError(f"batch size {batch_size}: pass --batch-size >= 1")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} outside world size {world_size}: launch with torchrun")
        if len(split) == 0:
            raise DataError("the split holds no examples: check the dataset folder or --limit")
        self.split, self.batch_size, self.train, self.device = split, batch_size, train, device
        self.flip, self.seed, self.rank, self.world_size = flip, seed, rank, world_size
        self.num_threads = num_threads
        self.epoch = 0
        n = len(split)
        # Train shards are trimmed to equal sizes (DDP needs equal step counts); test shards are not.
        self.count = n // world_size if train else len(range(rank, n, world_size))
        self.keep_last = not (train and drop_last)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        if train and len(self) == 0:
            raise UserError(f"batch size {batch_size} exceeds the {self.count} training examples of this rank and the last partial batch is dropped: lower --batch-size")

    def __len__(self) -> int:
        return math.ceil(self.count / self.batch_size) if self.keep_last else self.count // self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self) -> Plan:
        n, m = len(self.split), self.count
        if not self.train:
            index = torch.arange(self.rank, n, self.world_size)  # contiguous (DALI needs dense arrays)
            zeros = torch.full((m,), PAD)
            return Plan(index, zeros, zeros, torch.zeros(m, dtype=torch.bool))
        perm = torch.randperm(n, generator=_generator(self.seed, self.epoch))
        mine = slice(self.rank, m * self.world_size, self.world_size)  # this rank's positions in perm
        index = perm[mine].contiguous()
        # Augmentation is drawn per position of the whole permutation and sharded like it, so
        # world_size ranks with batch B/world_size see exactly the batches of one rank with batch B.
        g = _generator(self.seed, self.epoch, 0, 1)
        offsets = torch.randint(0, 2 * PAD + 1, (2, n), generator=g)[:, mine]
        mirror = torch.randint(0, 2, (n,), generator=g)[mine].bool() & self.flip  # drawn even without flips
        return Plan(index, offsets[0].contiguous(), offsets[1].contiguous(), mirror.contiguous())

    def _slice(self, k: int) -> slice:
        return slice(k * self.batch_size, min((k + 1) * self.batch_size, self.count))

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[Batch]:
        raise NotImplementedError


def crop_flip(padded: torch.Tensor, index: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
              mirror: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [B, C, height, width]: windows of padded[index] at (dy, dx), mirrored where asked.

    One gather through flat positions: pos = ((i * C + c) * Hp + dy + y) * Wp + dx + x', with
    x' = width - 1 - x for mirrored rows, so no per-example Python and no extra copies.
    """
    _, c, hp, wp = padded.shape
    dev = padded.device
    y = torch.arange(height, device=dev)
    x = torch.arange(width, device=dev)
    cols = dx[:, None] + torch.where(mirror[:, None], width - 1 - x, x)  # [B, W]
    rows = dy[:, None] + y  # [B, H]
    base = (index[:, None] * c + torch.arange(c, device=dev)) * hp  # [B, C]
    pos = ((base[:, :, None] + rows[:, None, :]) * wp)[..., None] + cols[:, None, None, :]
    # index_select on the flat view: about 10x faster on CPU than advanced indexing.
    return padded.view(-1).index_select(0, pos.view(-1)).view(pos.shape)


class TensorLoader(_Loader):
    """The whole split on `device`; batched crop/flip/normalise there."""

    def __init__(self, split: Split, **kw):
        super().__init__(split, **kw)
        dev = self.device
        self.height, self.width = split.images.shape[-2:]
        # Train: keep only the padded copy (pad once on CPU, crop by gather); test: the plain images.
        self.images = (F.pad(split.images, (PAD,) * 4) if self.train else split.images).to(dev)
        self.primary = split.primary.to(dev)
        self.fine = split.fine.to(dev) if split.fine is not None else None
        self.scale = (1 / (255 * self.std)).to(dev)
        self.shift = (-self.mean / self.std).to(dev)

    def iter_from(self, start_batch: int) -> Iterator[Batch]:
        plan = Plan(*(t.to(self.device, non_blocking=True) for t in self.plan()))
        for k in range(start_batch, len(self)):
            s = self._slice(k)
            idx = plan.index[s]
            if self.train:
                raw = crop_flip(self.images, idx, plan.dy[s], plan.dx[s], plan.mirror[s], self.height, self.width)
            else:
                raw = self.images.index_select(0, idx)
            images = raw.float().mul_(self.scale).add_(self.shift)
            fine = self.fine[idx] if self.fine is not None else None
            yield Batch(images, self.primary[idx], fine, idx)


class _PlannedBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item k is the whole uint8 batch k of one epoch plan (on CPU)."""

    def __init__(self, loader: TorchLoader, plan: Plan):
        self.loader, self.plan = loader, plan

    def __len__(self) -> int:
        return len(self.loader)

    def __getitem__(self, k: int):
        ld, p, s = self.loader, self.plan, self.loader._slice(k)
        idx = p.index[s]
        if ld.train:
            raw = crop_flip(ld.padded, idx, p.dy[s], p.dx[s], p.mirror[s], ld.height, ld.width)
        else:
            raw = ld.split.images.index_select(0, idx)
        fine = ld.split.fine[idx] if ld.split.fine is not None else None
        return raw, ld.split.primary[idx], fine, idx


class TorchLoader(_Loader):
    """torch DataLoader baseline: CPU batches, moved to the device as uint8, normalised there."""

    def __init__(self, split: Split, **kw):
        super().__init__(split, **kw)
        self.height, self.width = split.images.shape[-2:]
        self.padded = F.pad(split.images, (PAD,) * 4) if self.train else None
        self.scale = (1 / (255 * self.std)).to(self.device)
        self.shift = (-self.mean / self.std).to(self.device)

    def iter_from(self, start_batch: int) -> Iterator[Batch]:
        # Workers would only pickle tensors around: the batched gather is already vectorised.
        loader = torch.utils.data.DataLoader(
            _PlannedBatches(self, self.plan()), batch_size=None, sampler=range(start_batch, len(self)),
            num_workers=0, pin_memory=self.device.type == "cuda")

        def to(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.device, non_blocking=True)

        for raw, primary, fine, idx in loader:
            images = to(raw).float().mul_(self.scale).add_(self.shift)
            yield Batch(images, to(primary), to(fine) if fine is not None else None, to(idx))


class DaliLoader(_Loader):
    """NVIDIA DALI pipeline fed with the shared epoch plan (so resume is exact).

    A fresh pipeline per iteration (building one takes milliseconds) means no prefetched batch
    of an abandoned iteration can leak into the next.
    """

    def __init__(self, split: Split, **kw):
        super().__init__(split, **kw)
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            raise UserError("--loader dali needs NVIDIA DALI: pip install 'rlaux_fast[dali]'") from None
        self.gpu = self.device.type == "cuda"
        self.device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if self.gpu else None
        self.height, self.width = split.images.shape[-2:]
        # Image folders are decoded by DALI from the files; arrays enter as HWC uint8.
        self.hwc = None if split.files is not None else split.images.permute(0, 2, 3, 1).contiguous().numpy()
        self.primary = split.primary.to(self.device)
        self.fine = split.fine.to(self.device) if split.fine is not None else None

    def _pipeline(self, plan: Plan, start_batch: int):
        from nvidia.dali import fn, pipeline_def, types

        last = len(self) - 1
        bs, files = self.batch_size, self.split.files

        def source(info):
            # Batch start_batch + iteration; the pipeline prefetches past the end, so clamp.
            k = min(start_batch + info.iteration, last)
            s = self._slice(k)
            idx = plan.index[s].numpy()
            start = torch.stack([plan.dy[s], plan.dx[s]], 1).numpy().astype(np.int32) - PAD
            mirror = plan.mirror[s].numpy().astype(np.int32)
            if files is not None:  # the file reader always yields full batches: pad, trim later
                extra = bs - len(idx)
                start = np.concatenate([start, np.zeros((extra, 2), np.int32)])
                mirror = np.concatenate([mirror, np.zeros(extra, np.int32)])
                return start, mirror
            return self.hwc[idx], start, mirror, idx

        @pipeline_def(batch_size=bs, num_threads=self.num_threads, device_id=self.device_id,
                      prefetch_queue_depth=2)
        def pipe():
            if files is None:
                images, start, mirror, index = fn.external_source(
                    source=source, batch_info=True, num_outputs=4, layout=["HWC", "", "", ""],
                    dtype=[types.UINT8, types.INT32, types.INT32, types.INT64])
                if self.gpu:
                    images = images.gpu()
            else:
                order = plan.index[start_batch * bs :].tolist()
                encoded, index = fn.readers.file(files=[files[i] for i in order], labels=order,
                                                 random_shuffle=False, name="reader")
                start, mirror = fn.external_source(source=source, batch_info=True, num_outputs=2,
                                                   dtype=[types.INT32, types.INT32])
                images = fn.decoders.image(encoded, device="mixed" if self.gpu else "cpu", output_type=types.RGB)
                images = fn.resize(images, size=[self.height, self.width], antialias=True)
            # Negative starts read zeros: the crop of the 4-pixel zero-padded image.
            images = fn.slice(images, start=start, shape=[self.height, self.width], axis_names="HW",
                              out_of_bounds_policy="pad", fill_values=0)
            images = fn.crop_mirror_normalize(
                images, mirror=mirror, mean=[255 * m for m in self.mean.flatten().tolist()],
                std=[255 * s for s in self.std.flatten().tolist()], output_layout="CHW", dtype=types.FLOAT)
            return images, index

        p = pipe()
        p.build()
        return p

    def _to_torch(self, out, n: int) -> torch.Tensor:
        if self.gpu:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            dense = out.as_tensor()
            t = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(dense, t, cuda_stream=torch.cuda.current_stream(self.device))
            return t[:n]
        return torch.from_numpy(np.array(out.as_tensor())[:n])

    def iter_from(self, start_batch: int) -> Iterator[Batch]:
        plan = self.plan()
        if start_batch >= len(self):
            return
        pipe = self._pipeline(plan, start_batch)
        for k in range(start_batch, len(self)):
            s = self._slice(k)
            n = s.stop - s.start
            out_images, out_index = pipe.run()
            images = self._to_torch(out_images, n)
            idx = torch.from_numpy(np.array(out_index.as_tensor()).reshape(-1)[:n].astype(np.int64)).to(self.device)
            fine = self.fine[idx] if self.fine is not None else None
            yield Batch(images, self.primary[idx], fine, idx)
        del pipe
