"""The alternating RL-AUX loop: act on a batch, train the primary net, measure the reward, update the agent.

Each epoch: (a) the RL phase trains a throw-away copy of the primary network with sampled actions and
updates the agent with PPO; (b) the main phase trains the canonical network with the agent's argmax
actions, steps the LR schedule and evaluates. Methods without an agent run (b) only; `single_pass`
skips (a) and lets the agent learn online during (b).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable

import torch
from torch import nn

from . import distributed, kernels
from .agent import PPO, WEIGHT_BINS, Policy, PPOSettings, Step, weight_factor
from .config import Config
from .data import Dataset, make_loader
from .errors import UserError
from .models import VGG16
from .speed import Compiler


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available: use --device cpu or auto")
    return torch.device(name)


def make_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "apex-sgd":
        try:
            from apex.optimizers import FusedSGD
        except ImportError:
            raise UserError("--optimizer apex-sgd needs NVIDIA apex, which is not installed: use --optimizer sgd") from None
        return FusedSGD(params, **kwargs)
    params = list(params)
    # Not fused under fp16's GradScaler: when the scaler skips the first step (inf gradients, as it
    # often does at its initial scale), fused SGD leaves its momentum buffers uninitialised
    # (torch.empty_like) and the next step reads garbage (seen with torch 2.14).
    if cfg.amp != "fp16":
        try:  # the fused kernel is ~2.7x faster per step on CPU and faster on CUDA; older builds lack it
            return torch.optim.SGD(params, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.SGD(params, foreach=True, **kwargs)


def label_entropy(counts: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the distribution given by counts or probabilities."""
    p = counts.float() / counts.sum().clamp_min(1e-12)
    return -(p * torch.log(p.clamp_min(1e-12))).sum()


def count_into(counts: torch.Tensor, values: torch.Tensor) -> None:
    """counts[v] += 1 for every v in `values`, in place (bincount would sync with the host on CUDA)."""
    counts.index_add_(0, values, torch.ones_like(values))


class NonFiniteError(UserError):
    pass


@dataclass
class PhaseStats:
    """Sums kept on the device during a phase; read once at its end."""
    images: int = 0
    primary_loss: torch.Tensor | float = 0.0
    aux_loss: torch.Tensor | float = 0.0
    rewards: list = field(default_factory=list)
    diagnostics: list = field(default_factory=list)
    first_bad_step: torch.Tensor | None = None
    usage: torch.Tensor | None = None  # counts of (fine label, chosen auxiliary class)
    bins: torch.Tensor | None = None   # counts of chosen weight bins


class Trainer:
    """Owns the primary network, its optimizer and schedule, the agent, and the data loaders."""

    def __init__(self, cfg: Config, data: Dataset, device: torch.device, progress: Callable = None):
        self.cfg, self.data, self.device = cfg, data, device
        self.progress = progress or (lambda iterable, **_: iterable)
        h = data.hierarchy
        self.hierarchy = h
        self.block_start = h.block_start.to(device)
        self.block_size = h.block_size.to(device)
        self.fine_to_aux = data.fine_to_aux.to(device) if data.fine_to_aux is not None else None
        # Row c: the auxiliary classes of primary class c; a batch's mask is one gather, on the device.
        self.block_masks = h.block_mask(torch.arange(h.num_primary)).to(device)
        if cfg.kernels == "triton" and not kernels.triton_runs_on(device):
            raise UserError(f"--kernels triton needs triton and a CUDA device, not {device.type} (the CPU only under "
                            "TRITON_INTERPRET=1): use --kernels auto or torch")
        if len(data.train.primary) < cfg.batch_size:
            raise UserError(f"--batch-size {cfg.batch_size} is larger than the {len(data.train.primary)} training examples: lower --batch-size")

        # Under torchrun each process trains on its share of every batch (distributed.py).
        self.batch_size = distributed.local_batch_size(cfg.batch_size)
        torch.manual_seed(cfg.seed)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = VGG16(h.num_primary, h.num_aux, cfg.width).to(device, memory_format=self.memory_format)
        # The training step runs through DistributedDataParallel (the network itself on one process);
        # self.model stays the plain network: evaluation, copies and checkpoints use it.
        self.train_model = distributed.wrap(self.model, cfg.sync_bn)
        self.optimizer = make_optimizer(self.model.parameters(), cfg)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, cfg.lr_step, cfg.lr_gamma)
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        # --compile / --cuda-graphs (speed.py): the step's forward + loss, the reward forward and the
        # PPO minibatch loss each become one graph; without the flags these are the plain methods.
        self.compiler = Compiler(cfg.compile, cfg.cuda_graphs, device)
        self.forward_loss = self.compiler(self.primary_forward_loss)
        self.reward_loss = self.compiler(self.random_batch_loss)
        self._rl_copy = None

        self.agent = None
        if cfg.uses_agent:
            policy = Policy(cfg.policy_backbone, h.num_aux, WEIGHT_BINS if cfg.method == "rlaux-weights" else 0,
                            in_features=self.model.feature_dim, width=cfg.width,
                            weight_init=cfg.weight_init).to(device, memory_format=self.memory_format)
            distributed.broadcast_module(policy)
            # Each process acts on its own examples, so it samples with its own noise; the minibatch
            # and the reward batch are split over the processes like the training batch.
            minibatch = math.ceil(cfg.ppo_minibatch / distributed.world_size())
            self.reward_batch_size = math.ceil(cfg.reward_batch_size / distributed.world_size())
            settings = PPOSettings(cfg.ppo_epochs, minibatch, cfg.ppo_lr, cfg.clip, cfg.vf_coef, cfg.ent_coef,
                                   cfg.max_grad_norm, cfg.gamma, cfg.gae_lambda, cfg.kernels, amp_dtype=self.amp_dtype)
            self.agent = PPO(policy, settings, seed=distributed.rank_seed(cfg.seed),
                             sync_gradients=distributed.average_gradients, compile=self.compiler)
            # Uint8 training images stay on the device for random reward batches.
            self.reward_images = data.train.images.to(device)
            self.reward_labels = data.train.primary.to(device)
            self.reward_generator = torch.Generator(device=device)
            self.reward_generator.manual_seed(distributed.rank_seed(cfg.seed) + 1)
            self.pixel_mean = torch.tensor(data.mean, device=device)[:, None, None]
            self.pixel_std = torch.tensor(data.std, device=device)[:, None, None]

        common = dict(kind=cfg.loader, device=device, mean=data.mean, std=data.std, seed=cfg.seed,
                      rank=distributed.rank(), world_size=distributed.world_size())
        self.train_loader = make_loader(data.train, batch_size=self.batch_size, train=True, flip=data.flip,
                                        drop_last=cfg.last_batch == "drop", **common)
        self.test_loader = make_loader(data.test, batch_size=max(cfg.batch_size, 256), train=False, flip=False,
                                       drop_last=False, **common)
        self.random_labels = None

    # ---- the pieces of one step ---------------------------------------------------------------

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def focal_loss(self, primary_logits, aux_logits, primary, aux_labels, weights):
        return kernels.multihead_focal_loss(
            primary_logits, aux_logits, primary, aux_labels, self.block_start, self.block_size, weights,
            gamma=self.cfg.focal_gamma, soft_target=self.cfg.aux_target == "soft",
            backend=None if self.cfg.kernels == "auto" else self.cfg.kernels)

    def choose_aux(self, batch, features: torch.Tensor, noise: torch.Tensor | None):
        """The method's auxiliary labels and per-example weights for a batch (and the agent's step).
        The agent samples with `noise` (its uniform draws), or takes its argmax actions when None."""
        cfg, n = self.cfg, batch.primary.shape[0]
        constant = torch.full((n,), cfg.aux_weight, device=self.device)
        if cfg.method == "single":
            return self.block_start[batch.primary], torch.zeros(n, device=self.device), None
        if cfg.method == "human":
            return self.fine_to_aux[batch.fine], constant, None
        if cfg.method == "random":
            return self.random_labels[batch.index], constant, None
        obs = features.detach() if cfg.policy_backbone == "shared" else batch.images
        step = self.agent.act(obs, self.block_masks[batch.primary], noise is None, noise)
        labels = step.actions[:, 0]
        weights = weight_factor(step.actions[:, 1]) if cfg.method == "rlaux-weights" else constant
        return labels, weights, step

    def train_step(self, model, optimizer, batch, deterministic: bool):
        """One SGD step of the primary network on the method's auxiliary task."""
        # Sampling noise is drawn here, outside the (possibly compiled) forward: generators do not trace.
        sample = self.agent is not None and not deterministic
        noise = self.agent.sampling_noise(batch.primary.shape[0]) if sample else None
        out, aux_labels, weights, step = self.forward_loss(model, batch, noise)
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
        return out, aux_labels, weights, step

    def primary_forward_loss(self, model, batch, noise: torch.Tensor | None):
        """The network's forward, the method's auxiliary labels and weights, and the focal loss: one
        graph under --compile (`self.forward_loss`)."""
        images = batch.images.contiguous(memory_format=self.memory_format)
        with self.autocast():
            primary_logits, aux_logits, features = model(images, return_features=True)
        aux_labels, weights, step = self.choose_aux(batch, features, noise)
        out = self.focal_loss(primary_logits, aux_logits, batch.primary, aux_labels, weights)
        return out, aux_labels, weights, step

    def aux_target_mean(self, aux_labels, primary) -> torch.Tensor:
        """The batch-mean auxiliary target [A]; its entropy is the reward's bonus for a diverse auxiliary task."""
        targets = kernels.soft_block_targets(aux_labels, primary, self.block_start, self.block_size,
                                             self.hierarchy.num_aux, soft=self.cfg.aux_target == "soft")
        return targets.mean(0)

    @torch.no_grad()
    def reward_batch_loss(self, model) -> torch.Tensor:
        """Primary focal loss on random training images; eval mode, so BatchNorm statistics stay untouched."""
        model = distributed.unwrap(model)  # a forward without gradients needs no DDP (and no collective)
        n = self.reward_images.shape[0]
        idx = torch.randint(n, (min(self.reward_batch_size, n),), device=self.device, generator=self.reward_generator)
        was_training = model.training
        model.eval()
        loss = self.reward_loss(model, idx)
        model.train(was_training)
        return loss

    def random_batch_loss(self, model, idx: torch.Tensor) -> torch.Tensor:
        """Mean primary focal loss of the training images `idx` (normalised here): one graph under --compile."""
        images = ((self.reward_images[idx].float() / 255 - self.pixel_mean) / self.pixel_std).contiguous(memory_format=self.memory_format)
        with self.autocast():
            primary_logits, aux_logits = model(images)
        primary = self.reward_labels[idx]
        return self.focal_loss(primary_logits, aux_logits, primary, self.block_start[primary],
                               torch.zeros_like(primary, dtype=torch.float32)).primary.mean()

    # ---- phases ---------------------------------------------------------------------------------

    def run_phase(self, model, optimizer, epoch: int, *, phase: str, learn: bool, deterministic: bool,
                  fraction: float = 1.0) -> PhaseStats:
        cfg, stats = self.cfg, PhaseStats()
        # The RL phase sees its own shuffle of the data, not the main phase's.
        self.train_loader.set_epoch(2 * epoch + (phase == "rl"))
        n_batches = max(1, math.floor(len(self.train_loader) * fraction))
        usage = torch.zeros(self.fine_count * self.hierarchy.num_aux, device=self.device, dtype=torch.long)
        bins = torch.zeros(WEIGHT_BINS, device=self.device, dtype=torch.long)
        rollout: list[Step] = []
        aux_means: list[torch.Tensor] = []
        first_bad = torch.full((), -1, device=self.device, dtype=torch.long)
        batches = self.progress(islice(self.train_loader, n_batches), total=n_batches, desc=f"epoch {epoch + 1} {phase}")
        for t, batch in enumerate(batches):
            out, aux_labels, weights, step = self.train_step(model, optimizer, batch, deterministic)
            n = batch.primary.shape[0]
            stats.images += n
            stats.primary_loss = stats.primary_loss + out.primary.detach().sum()
            stats.aux_loss = stats.aux_loss + (weights * out.aux.detach()).sum()
            bad = ~torch.isfinite(out.loss.detach())
            first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, t), first_bad)
            if batch.fine is not None and self.fine_count > 1:
                count_into(usage, batch.fine * self.hierarchy.num_aux + aux_labels)
            else:
                count_into(usage, aux_labels)
            if step is not None and cfg.method == "rlaux-weights":
                count_into(bins, step.actions[:, 1])
            if not learn:
                continue
            # Reward of a step: -(primary loss after its update) + coef * entropy of its auxiliary target.
            rollout.append(step)
            aux_means.append(self.aux_target_mean(aux_labels, batch.primary))
            if cfg.reward_batch == "random":
                self.set_reward(rollout[-1], aux_means[-1], self.reward_batch_loss(model), stats)
            elif len(rollout) >= 2:  # "next": this batch's loss before its own update rewards the previous step
                self.set_reward(rollout[-2], aux_means[-2], out.primary.detach().mean(), stats)
            if len(rollout) > cfg.ppo_steps and rollout[cfg.ppo_steps - 1].reward is not None:
                stats.diagnostics.append(self.agent.update(rollout[:cfg.ppo_steps], rollout[cfg.ppo_steps].values, False))
                rollout, aux_means = rollout[cfg.ppo_steps:], aux_means[cfg.ppo_steps:]
        if learn and rollout:
            if rollout[-1].reward is None:  # the last "next" step has no next batch: use a random one
                self.set_reward(rollout[-1], aux_means[-1], self.reward_batch_loss(model), stats)
            stats.diagnostics.append(self.agent.update(rollout, torch.zeros_like(rollout[-1].values), True))
        stats.first_bad_step = first_bad
        stats.usage = usage
        stats.bins = bins
        return self.sum_over_processes(stats)

    def set_reward(self, step: Step, aux_mean: torch.Tensor, primary_loss: torch.Tensor, stats: PhaseStats):
        """-(primary loss) + coef * entropy of the batch-mean auxiliary target, both taken over all
        processes' batches (one all-reduce), so that every process learns from the same reward."""
        primary_loss, aux_mean = distributed.all_reduce_many(primary_loss, aux_mean, mean=True)
        step.reward = (-primary_loss + self.cfg.reward_entropy_coef * label_entropy(aux_mean)).float()
        stats.rewards.append(step.reward)

    def sum_over_processes(self, stats: PhaseStats) -> PhaseStats:
        """A phase's sums over every process (one all-reduce; nothing to do on one process)."""
        if distributed.world_size() == 1:
            return stats
        # The first bad step of any process (none: -1); every process then stops alike.
        first_bad = torch.where(stats.first_bad_step < 0, torch.iinfo(torch.long).max, stats.first_bad_step)
        stats.first_bad_step = distributed.all_reduce(first_bad, "min")
        stats.first_bad_step[stats.first_bad_step == torch.iinfo(torch.long).max] = -1
        stats.primary_loss, stats.aux_loss, stats.usage, stats.bins = distributed.all_reduce_many(
            torch.as_tensor(stats.primary_loss), torch.as_tensor(stats.aux_loss), stats.usage, stats.bins)
        stats.images *= distributed.world_size()  # equal shards: every process saw as many images
        if stats.diagnostics:  # each process's PPO diagnostics on its own minibatches: their mean
            names = list(stats.diagnostics[0])
            means = distributed.all_reduce_many(*[torch.stack([d[k] for d in stats.diagnostics]) for k in names], mean=True)
            stats.diagnostics = [dict(zip(names, step)) for step in zip(*means)]
        return stats

    @functools.cached_property
    def fine_count(self) -> int:
        fine = self.data.train.fine
        return int(fine.max()) + 1 if fine is not None else 1

    def draw_random_labels(self, epoch: int):
        """The `random` control: a uniformly random auxiliary class inside each example's block, per epoch."""
        g = torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch)
        primary = self.data.train.primary
        offset = (torch.rand(len(primary), generator=g) * self.hierarchy.block_size[primary]).long()
        self.random_labels = (self.hierarchy.block_start[primary] + offset).to(self.device)

    @torch.no_grad()
    def evaluate(self, model) -> torch.Tensor:
        """Test accuracy of the primary head (eval mode), as a device tensor. Each process counts its
        shard of the test set; the counts are summed over processes."""
        model = distributed.unwrap(model)
        model.eval()
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        total = 0
        self.test_loader.set_epoch(0)
        for batch in self.test_loader:
            with self.autocast():
                primary_logits, _ = model(batch.images)
            correct += (primary_logits.argmax(1) == batch.primary).sum()
            total += batch.primary.shape[0]
        model.train()
        correct, total = distributed.all_reduce_many(correct, torch.tensor(total, device=self.device))
        return correct.float() / total

    def check_finite(self, stats: PhaseStats, epoch: int, phase: str):
        bad = int(stats.first_bad_step)
        if bad >= 0:
            raise NonFiniteError(f"non-finite loss at epoch {epoch + 1}, {phase} phase, step {bad + 1}: lower --lr "
                                 "or try without --amp; the last good checkpoint is kept")
        for i, r in enumerate(torch.stack(stats.rewards).tolist() if stats.rewards else []):
            if not math.isfinite(r):
                raise NonFiniteError(f"non-finite reward at epoch {epoch + 1}, {phase} phase, step {i + 1}: "
                                     "the last good checkpoint is kept")

    def run_epoch(self, epoch: int) -> dict:
        """One epoch of the method; returns the metrics record (host numbers, one sync per epoch)."""
        cfg = self.cfg
        record: dict = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
        if cfg.method == "random":
            self.draw_random_labels(epoch)
        rl_stats = None
        start = time.perf_counter()
        self.compiler.take_seconds()  # compile time is kept out of every *_seconds field below
        if self.agent is not None and not cfg.single_pass:
            rl_model, optimizer_copy = self.rl_copy()
            rl_stats = self.run_phase(rl_model, optimizer_copy, epoch, phase="rl", learn=True,
                                      deterministic=False, fraction=cfg.rl_fraction)
            self.check_finite(rl_stats, epoch, "RL")
        rl_compile = self.compiler.take_seconds()
        rl_seconds = time.perf_counter() - start - rl_compile
        start = time.perf_counter()
        online = self.agent is not None and cfg.single_pass
        main = self.run_phase(self.train_model, self.optimizer, epoch, phase="main", learn=online, deterministic=not online)
        self.scheduler.step()
        self.check_finite(main, epoch, "main")
        # Per-process BatchNorm statistics, averaged: every process evaluates and saves one network.
        distributed.average_buffers(self.model)
        if self.agent is not None:
            distributed.average_buffers(self.agent.policy)
        main_compile = self.compiler.take_seconds()
        main_seconds = time.perf_counter() - start - main_compile
        accuracy = self.evaluate(self.model)
        agent_stats = rl_stats if rl_stats is not None else main

        record["train_primary_loss"] = float(main.primary_loss) / main.images
        record["train_aux_loss"] = float(main.aux_loss) / main.images
        record["test_acc"] = float(accuracy)
        usage_by_aux = main.usage.view(-1, self.hierarchy.num_aux).sum(0)
        record["aux_label_entropy"] = float(label_entropy(usage_by_aux))
        if agent_stats.rewards:
            record["reward"] = float(torch.stack(agent_stats.rewards).mean())
        if agent_stats.diagnostics:
            for name in agent_stats.diagnostics[0]:
                record[f"ppo_{name}"] = float(torch.stack([d[name] for d in agent_stats.diagnostics]).mean())
        if cfg.method == "rlaux-weights":
            b = main.bins.float()
            record["aux_weight_mean"] = float((b * weight_factor(torch.arange(WEIGHT_BINS, device=b.device))).sum() / b.sum())
        record["rl_seconds"] = rl_seconds
        record["main_seconds"] = main_seconds
        record["epoch_seconds"] = rl_seconds + main_seconds
        if cfg.compile:  # spent compiling (and recording CUDA graphs) this epoch, outside the figures above
            record["compile_seconds"] = rl_compile + main_compile
        record["images_per_s"] = (main.images + (rl_stats.images if rl_stats else 0)) / record["epoch_seconds"]
        self.last_usage = {"fine_by_aux": main.usage.view(-1, self.hierarchy.num_aux).tolist(),
                           "weight_bins": main.bins.tolist() if cfg.method == "rlaux-weights" else None}
        return record

    def rl_copy(self):
        """The RL phase's throw-away copy of the network (as trained: DDP-wrapped under torchrun) and of
        its optimizer, refreshed from the canonical ones. The copy is made once and overwritten in
        place every epoch, so compiled graphs and captured CUDA graphs see the same tensors each epoch."""
        if self._rl_copy is None:
            model = copy.deepcopy(self.model)
            # every process copies and wraps alike
            self._rl_copy = (model, distributed.wrap(model, self.cfg.sync_bn), make_optimizer(model.parameters(), self.cfg))
        model, wrapped, optimizer = self._rl_copy
        with torch.no_grad():
            for copied, canonical in zip(model.state_dict().values(), self.model.state_dict().values()):
                copied.copy_(canonical)
        # Deep-copied state: load_state_dict would otherwise share momentum buffers with the canonical net.
        optimizer.load_state_dict(copy.deepcopy(self.optimizer.state_dict()))
        return wrapped, optimizer

    # ---- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}
        if self.agent is not None:
            state["policy"] = self.agent.policy.state_dict()
            state["agent_optimizer"] = self.agent.optimizer.state_dict()
            state["agent_scaler"] = self.agent.scaler.state_dict()
            # The agent's sampling/shuffling generator and the reward-batch generator: exact resume needs both.
            state["agent_generator"] = self.agent.generator.get_state()
            state["reward_generator"] = self.reward_generator.get_state()
            if distributed.world_size() > 1:  # every process's own streams (a collective: call on every process)
                state["process_generators"] = distributed.all_gather_object(
                    [self.agent.generator.get_state(), self.reward_generator.get_state()])
        return state

    def load_state_dict(self, state: dict):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.agent is not None:
            self.agent.policy.load_state_dict(state["policy"])
            self.agent.optimizer.load_state_dict(state["agent_optimizer"])
            if "agent_scaler" in state:
                self.agent.scaler.load_state_dict(state["agent_scaler"])
            saved = state.get("process_generators", [[state["agent_generator"], state["reward_generator"]]])
            if distributed.rank() < len(saved):  # else, with more processes than the run had, fresh seeds
                self.agent.generator.set_state(saved[distributed.rank()][0])
                self.reward_generator.set_state(saved[distributed.rank()][1])
