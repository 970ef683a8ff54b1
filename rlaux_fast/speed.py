"""Speed plumbing kept out of the training loop: torch.compile and CUDA graphs for the hot functions,
and a clock for the time spent compiling, so that throughput figures can leave it out.

    compiler = Compiler(cfg.compile, cfg.cuda_graphs, device)
    forward_loss = compiler(trainer_forward_loss)  # the function itself when --compile is off
    ...
    compiler.take_seconds()                        # seconds spent compiling since the last take

What gets compiled (by the Trainer and the agent, through one `Compiler`):
- the primary step's forward: the network, the agent's choice of auxiliary labels and weights (its
  policy forward and sampling, with the sampling noise drawn outside) and the focal loss, as ONE
  graph; AOTAutograd compiles its backward as one graph too. The optimizer step stays eager: with
  `SGD(fused=True)` it is already one fused kernel, and a compiled optimizer step graph-breaks.
- the reward forward (eval mode, no grad);
- the PPO minibatch loss (the policy forward and the clipped loss; its backward is compiled, the
  fused Adam step is not).

Shapes are static (`dynamic=False`): a new shape (the last partial batch with --last-batch keep,
a shorter last rollout) compiles one more graph, once. Sampling noise and reward-batch indices
come from torch.Generators, which dynamo cannot trace, so they are drawn eagerly and passed in.

`--cuda-graphs` uses mode="reduce-overhead": each compiled graph is captured as a CUDA graph per
shape and replayed. Captured graphs read their parameters at fixed addresses, so the Trainer keeps
one persistent copy of the network for the RL phase (refreshed in place every epoch) instead of a
fresh deepcopy: nothing is recorded again in later epochs. The outputs of a CUDA graph are
overwritten by its next replay, so the wrapper marks a new step before each call and clones the
outputs it returns.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import torch

from .errors import UserError

CUDA_GRAPHS_NEED_CUDA = "--cuda-graphs needs a CUDA GPU: drop --cuda-graphs, or run with --device cuda on a GPU machine"


class CompileClock:
    """Seconds spent compiling in this process: dynamo tracing with the inductor compile inside it,
    lazy backward compiles and CUDA graph recordings (dynamo's compile start/end callbacks, which
    fire for the outermost compile only). One clock per process, registered once."""

    def __init__(self):
        self.total = 0.0
        self._start: float | None = None
        try:
            from torch._dynamo.callback import callback_handler
        except ImportError:  # pragma: no cover - older torch: compile time then shows up in the step times
            return
        callback_handler.register_start_callback(self._on_start)
        callback_handler.register_end_callback(self._on_end)

    def _on_start(self, *args):
        self._start = time.perf_counter()

    def _on_end(self, *args):
        if self._start is not None:
            self.total += time.perf_counter() - self._start
            self._start = None


@functools.cache
def compile_clock() -> CompileClock:
    return CompileClock()


def clone_outputs(value: Any) -> Any:
    """Tensors cloned through tuples, lists, dicts, NamedTuples and dataclasses (None and numbers kept)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: clone_outputs(getattr(value, f.name))
                                            for f in dataclasses.fields(value) if f.init})
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(clone_outputs(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(clone_outputs(v) for v in value)
    if isinstance(value, dict):
        return {k: clone_outputs(v) for k, v in value.items()}
    return value


class Compiler:
    """Wraps hot functions with torch.compile (and CUDA graphs) when asked; identity otherwise."""

    def __init__(self, enabled: bool, cuda_graphs: bool = False, device: torch.device | str = "cpu"):
        device = torch.device(device)
        if cuda_graphs and (device.type != "cuda" or not torch.cuda.is_available()):
            raise UserError(CUDA_GRAPHS_NEED_CUDA)
        if cuda_graphs and not enabled:
            raise UserError("--cuda-graphs needs --compile")
        self.enabled, self.cuda_graphs = enabled, cuda_graphs
        self._taken = compile_clock().total if enabled else 0.0

    def __call__(self, fn: Callable) -> Callable:
        if not self.enabled:
            return fn
        mode = "reduce-overhead" if self.cuda_graphs else None
        compiled = torch.compile(fn, dynamic=False, mode=mode)
        if not self.cuda_graphs:
            return compiled

        @functools.wraps(fn)
        def replay(*args, **kwargs):
            # A new step: the previous replay's outputs may now be overwritten; keep ours by cloning.
            torch.compiler.cudagraph_mark_step_begin()
            return clone_outputs(compiled(*args, **kwargs))

        return replay

    def take_seconds(self) -> float:
        """Seconds spent compiling since the last call (or since this Compiler was made); 0 when
        compilation is off."""
        if not self.enabled:
            return 0.0
        total = compile_clock().total
        seconds, self._taken = total - self._taken, total
        return seconds
