"""Loader throughput (augmented training batches on the device) and JPEG decode throughput.

- Every loader (gpu, torch, dali) over the mnist5k training split: one epoch of augmented,
  normalised batches of 100 per round. On CPU, `gpu` is the same device-resident path on the CPU.
- JPEG decoding of the real CIFAR-10 images (shared/data/cifar10-jpeg.tar.gz, extracted once under
  the temp folder): the torch path (PIL, what `--dataset folder` decodes once and caches), DALI's
  CPU decoder, and on a GPU DALI's mixed (nvJPEG) decoder, each with the crop/flip/normalise of the
  training pipeline for DALI. Skipped with a reason when the archive or DALI is absent.

    pytest bench/bench_loaders.py --benchmark-only
"""
import importlib.util
import os

import pytest
import torch

from benchlib import CUDA, DEVICE, SIZES, record, sync

HAS_DALI = importlib.util.find_spec("nvidia.dali") is not None
needs_dali = pytest.mark.skipif(not HAS_DALI, reason="NVIDIA DALI is not installed (pip install 'rlaux_fast[dali]')")


def loader_for(split, kind, dataset, train=True, device=DEVICE):
    from rlaux_fast.data import make_loader

    return make_loader(split, kind=kind, batch_size=SIZES.batch, train=train, device=device, mean=dataset.mean,
                       std=dataset.std, flip=True, drop_last=True, seed=0)


def consume(loader, epoch=[0]):
    epoch[0] += 1
    loader.set_epoch(epoch[0])
    n = 0
    for batch in loader:
        n += batch.images.shape[0]
    sync()
    return n


@pytest.mark.parametrize("kind", ["gpu", "torch", pytest.param("dali", marks=needs_dali)])
def test_loader_epoch(benchmark, digits, kind):
    benchmark.group = f"loader: mnist5k train epoch, batch {SIZES.batch}, on {DEVICE.type}"
    loader = loader_for(digits.train, kind, digits)
    images = consume(loader)  # warm-up: DALI builds its pipeline, CUDA allocates
    benchmark.pedantic(consume, args=(loader,), rounds=SIZES.loader_rounds, iterations=1, warmup_rounds=0)
    record(benchmark, f"loader:{kind}", images)


@pytest.fixture(scope="module")
def jpeg_split(cifar_jpeg):
    """The first SIZES.jpeg_images training JPEG files (all classes, interleaved), not decoded."""
    from rlaux_fast.data.datasets import Split

    files = []
    for primary in sorted(os.listdir(cifar_jpeg / "train")):
        for fine in sorted(os.listdir(cifar_jpeg / "train" / primary)):
            folder = cifar_jpeg / "train" / primary / fine
            files += [str(folder / f) for f in sorted(os.listdir(folder))]
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[:SIZES.jpeg_images]
    files = [files[i] for i in order.tolist()]
    n = len(files)
    labels = torch.zeros(n, dtype=torch.long)
    return Split(torch.empty(n, 3, 32, 32, dtype=torch.uint8), labels, labels, files)


class _Stats:  # CIFAR-10 normalisation (any values do for a throughput figure)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def test_jpeg_decode_torch(benchmark, jpeg_split):
    """PIL decoding, as the folder dataset does it once (then it caches the arrays)."""
    from rlaux_fast.data.datasets import _decode

    benchmark.group = f"JPEG decode: {len(jpeg_split)} CIFAR-10 files"
    benchmark.pedantic(_decode, args=(jpeg_split.files, 32), rounds=SIZES.loader_rounds, iterations=1, warmup_rounds=1)
    record(benchmark, "jpeg:torch", len(jpeg_split))


@needs_dali
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="DALI's GPU decoder needs a CUDA GPU"))])
def test_jpeg_decode_dali(benchmark, jpeg_split, device):
    """DALI's file reader + decoder + the training crop/flip/normalise, one pass over the files."""
    benchmark.group = f"JPEG decode: {len(jpeg_split)} CIFAR-10 files"
    loader = loader_for(jpeg_split, "dali", _Stats, device=torch.device(device))
    images = consume(loader)
    benchmark.pedantic(consume, args=(loader,), rounds=SIZES.loader_rounds, iterations=1, warmup_rounds=0)
    record(benchmark, f"jpeg:dali-{device}", images)
