"""Data parallelism over processes started by torchrun: the process group and the few collectives the loop needs.

Under `torchrun --nproc_per_node=N -m rlaux_fast.train ...` each process reads RANK, WORLD_SIZE and
LOCAL_RANK from its environment, joins one process group (NCCL on CUDA, with device cuda:LOCAL_RANK;
gloo on CPU) and trains on its shard of every batch. Started without torchrun, the world is one
process, no group is made, and every helper below returns its input untouched, so a single process
computes exactly what it computed before this module existed.

What must agree across ranks, and how it is kept so:
- the primary network: DistributedDataParallel averages its gradients; BatchNorm statistics are per
  rank during an epoch and averaged at its end (`average_buffers`);
- the agent: `average_gradients` after each PPO backward, so every rank takes the same Adam step;
- a step's reward: one all-reduce of the loss and the auxiliary-target mean (`all_reduce_many`).
What must differ: the agent's sampling noise and the random reward batches (`rank_seed`), because
every rank acts on its own examples.
"""
from __future__ import annotations

import datetime
import inspect
import json
import os
import time
import traceback

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError

# How long a collective may wait for a peer before the job fails instead of hanging. Generous: rank 0
# writes the checkpoint while the others wait at the next collective.
TIMEOUT = datetime.timedelta(minutes=15)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one process that prints, logs and writes the run folder."""
    return rank() == 0


def launched_rank() -> int:
    """RANK as torchrun set it (0 without torchrun), readable before `init`."""
    return int(os.environ.get("RANK", "0"))


def init(device: torch.device) -> torch.device:
    """Join the torchrun process group when WORLD_SIZE > 1; returns this rank's device.

    `device` is the resolved --device: on CUDA each rank takes cuda:LOCAL_RANK and NCCL, on CPU gloo.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 or (dist.is_available() and dist.is_initialized()):
        return device
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed: run a single process")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA GPUs are visible: "
                            "lower --nproc_per_node to the number of GPUs per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return device


def cleanup() -> None:
    """Leave the process group after a successful run (never after an error: a peer may be gone)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def rank_seed(seed: int) -> int:
    """A seed of its own for this rank's random streams; rank 0 keeps `seed` (so one process is unchanged)."""
    return seed + 1_000_003 * rank()


def local_batch_size(global_batch: int, what: str = "--batch-size") -> int:
    """Each rank's share of a global batch; the global batch must split evenly."""
    size = world_size()
    if global_batch % size:
        raise UserError(f"{what} {global_batch} does not split over {size} processes: pass a multiple of {size}")
    return global_batch // size


# ---- collectives (no-ops on one process) -------------------------------------------------------------

_OPS = {"sum": "SUM", "mean": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce over ranks in place (op: sum, mean, max or min); returns the tensor."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _OPS[op]))
        if op == "mean":
            tensor /= world_size()
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    return all_reduce(tensor, "sum")


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    return all_reduce(tensor, "mean")


def all_reduce_many(*tensors: torch.Tensor, mean: bool = False) -> tuple[torch.Tensor, ...]:
    """Sum (or mean) several tensors over ranks in ONE all-reduce; returns new tensors of the same
    shapes and dtypes (the inputs themselves on one process). Packed as float64: exact for counts."""
    if world_size() == 1:
        return tensors
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    all_reduce(flat, "mean" if mean else "sum")
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset:offset + t.numel()].view(t.shape).to(t.dtype))
        offset += t.numel()
    return tuple(out)


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers to every rank."""
    if world_size() > 1:
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src)


def average_gradients(module: nn.Module) -> None:
    """Replace every gradient by its mean over ranks (one all-reduce of all of them, flattened).
    Call between backward and the gradient clip, so that all ranks clip and step alike."""
    if world_size() == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_mean(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def average_buffers(module: nn.Module) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) over ranks, so that every
    rank evaluates and saves the same network (as timm's distribute_bn does at each epoch end)."""
    if world_size() == 1:
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if buffers:
        flat = all_reduce_mean(torch.cat([b.reshape(-1).to(torch.float64) for b in buffers]))
        offset = 0
        for b in buffers:
            b.copy_(flat[offset:offset + b.numel()].view_as(b))
            offset += b.numel()


def record_error(error: BaseException) -> None:
    """Write `error` where torchrun looks for a failed process's error (TORCHELASTIC_ERROR_FILE), in
    its format, so that its failure summary names the process that failed first and shows the message.
    Written to a temporary file and renamed: torchrun may kill a second failing process mid-write, and
    a half-written file would crash its summary."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": f"{type(error).__name__}: {error}",
                        "extraInfo": {"py_callstack": "".join(traceback.format_exception(error)),
                                      "timestamp": str(int(time.time()))}}}
    try:
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:  # the summary is a convenience: never let it hide the error itself
        pass


def peer_failed(error: BaseException) -> bool:
    """Whether `error` is this process noticing that another one died (its collective lost the
    connection), not a failure of its own."""
    text = str(error)
    return isinstance(error, getattr(dist, "DistNetworkError", ())) or "remote worker" in text or "by peer" in text


def all_gather_object(obj) -> list:
    """Every rank's `obj` (picklable), in rank order."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# ---- the primary network -----------------------------------------------------------------------------

def wrap(model: nn.Module, sync_bn: bool = False) -> nn.Module:
    """The module the training step runs: DistributedDataParallel around `model` when there are
    several ranks, `model` itself otherwise. Parameters are broadcast from rank 0 here.

    BatchNorm: per-rank batch statistics by default (SyncBatchNorm cannot run on CPU, and on GPUs it
    costs two all-reduces per BN layer per step); `sync_bn` converts to SyncBatchNorm on CUDA, which
    keeps the statistics of the global batch. No buffer sync in forward: the running statistics stay
    per rank during an epoch and `average_buffers` averages them at its end.

    Every parameter gets a gradient in every step (the auxiliary head stays in the graph with zero
    weights in `single`), so find_unused_parameters stays off.
    """
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    if sync_bn:
        if device.type != "cuda":
            raise UserError("--sync-bn needs CUDA GPUs (SyncBatchNorm refuses CPU modules): drop --sync-bn")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    # Newer torch renames broadcast_buffers to forward_sync_buffers (buffers still sync once at init,
    # which is harmless: they are equal then).
    options = inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync = "forward_sync_buffers" if "forward_sync_buffers" in options else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=ids, **{no_buffer_sync: False})


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper (or the network itself)."""
    return getattr(model, "module", model)
