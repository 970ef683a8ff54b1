"""`python -m rlaux_fast.train`: train a network with RL-AUX or a baseline, writing a run folder.

A run folder holds config.json, metrics.jsonl (one record per epoch), usage.json (the last epoch's
auxiliary-label usage), summary.json and checkpoint.pt. The checkpoint is written atomically at the
end of every epoch and holds everything needed to continue bit for bit: `--resume RUN_DIR`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from .config import Config, build_parser, parse_config, resolve, takes_psi
from .errors import UserError

# torch and everything built on it are imported inside `run`: flag errors and --help answer at once
# instead of after the 2-3 s it takes to import torch.

# Settings that may change when a run is resumed; every other setting must match the saved run.
RESUMABLE = ("epochs", "resume", "out", "progress", "tensorboard", "device")
# Per-epoch fields that measure time, not training: they legitimately differ between two runs.
TIMING_FIELDS = ("rl_seconds", "main_seconds", "epoch_seconds", "images_per_s", "compile_seconds")
SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}
TENSORBOARD_MISSING = ("--tensorboard needs the tensorboard package, which is not installed: "
                       "pip install tensorboard, or drop --tensorboard")


def is_main_process() -> bool:
    """Rank 0 under torchrun (RANK is set before torch starts), or the only process: the one that
    prints and writes the run folder; the other processes train and stay silent."""
    return os.environ.get("RANK", "0") == "0"


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, so that no `except Exception` swallows it."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum, self.message = signum, message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell convention: 130 for SIGINT, 143 for SIGTERM


class StopOnSignal:
    """Turns SIGINT/SIGTERM into `Interrupted`, except inside `deferred()`, where the signal waits
    until the block is done (so a checkpoint and its metrics line are written together or not at all)."""

    def __init__(self):
        self.pending: int | None = None
        self.defer = False
        self.previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNAL_NAMES:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        return False

    def _handle(self, signum, frame):
        if self.defer:
            self.pending = signum
        else:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def deferred(self):
        self.defer = True
        try:
            yield
        finally:
            self.defer = False
        if self.pending is not None:
            raise Interrupted(self.pending)


# ---- the run folder ------------------------------------------------------------------------------------

def default_out(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.dataset}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to run folder {path} ({e.strerror or type(e).__name__}): pass a writable --out") from None
    return path


def write_text(path: Path, text: str) -> None:
    from . import checkpoint

    if not is_main_process():
        return
    try:
        checkpoint.atomic_write_text(path, text)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or type(e).__name__}): check the disk and the folder's permissions") from None


def read_run_config(run_dir: Path) -> Config:
    """The Config a run folder was made with (its config.json)."""
    path = Path(run_dir) / "config.json"
    if not Path(run_dir).is_dir():
        raise UserError(f"--resume {run_dir}: no such run folder")
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"--resume {run_dir}: no config.json there, so it is not a run folder") from None
    except (OSError, ValueError) as e:
        raise UserError(f"--resume {run_dir}: config.json is unreadable ({type(e).__name__}): start a new run") from None
    names = {f.name for f in dataclasses.fields(Config)}
    if not isinstance(saved, dict):
        raise UserError(f"--resume {run_dir}: config.json does not hold a configuration: start a new run")
    if not takes_psi(saved.get("dataset", "mnist5k"), saved.get("flat", False)):
        saved["psi"] = None  # runs made before ψ became optional recorded the unused default, 5
    if saved.get("method", "rlaux-weights") == "rlaux-weights":
        saved.setdefault("weight_init", "uniform")  # runs made before --weight-init started uniform
    return resolve(Config(**{k: v for k, v in saved.items() if k in names}))


def flag(name: str, value) -> str:
    option = "--" + name.replace("_", "-")
    if value is None:
        return f"no {option}"
    if isinstance(value, bool):
        return option if value else "--no-" + name.replace("_", "-")
    return f"{option} {value}"


def check_resumable(saved: Config, cfg: Config, run_dir: Path,
                    fix: str = "drop the conflicting flags, or start a new run in another --out") -> None:
    """Refuse to continue a run with settings that differ from the ones it was made with."""
    diffs = [f.name for f in dataclasses.fields(Config)
             if f.name not in RESUMABLE and getattr(saved, f.name) != getattr(cfg, f.name)]
    if "psi" in diffs and ({"dataset", "flat"} & set(diffs)):
        diffs.remove("psi")  # whether ψ is set follows from the dataset: name the cause only
    if diffs:
        made = " ".join(flag(n, getattr(saved, n)) for n in diffs)
        asked = " ".join(flag(n, getattr(cfg, n)) for n in diffs)
        raise UserError(f"--resume {run_dir}: the run was made with {made}, not {asked}: {fix}")
    if cfg.out is not None and Path(cfg.out).resolve() != Path(run_dir).resolve():
        raise UserError(f"--out {cfg.out} conflicts with --resume {run_dir}: a resumed run stays in its folder; drop --out")


def explicit_flags(argv: list[str] | None) -> dict:
    """The settings given on the command line (not defaulted), parsed to their values."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def resume_config(run_dir: str, given: dict) -> Config:
    """The saved config of `run_dir`, with the flags given now on top (checked later in `run`)."""
    saved = read_run_config(Path(run_dir))
    # The saved --out may be relative to another working directory: the folder is the one named by --resume.
    return resolve(dataclasses.replace(saved, **{"out": None, **given}, resume=run_dir))


def resume_command(run_dir: Path) -> str:
    return f"python -m rlaux_fast.train --resume {shlex.quote(str(run_dir))}"


# ---- logging -------------------------------------------------------------------------------------------

def format_epoch(record: dict, epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}",
             f"loss {record['train_primary_loss']:.4f} aux {record['train_aux_loss']:.4f}",
             f"test acc {100 * record['test_acc']:.2f}%"]
    if "reward" in record:
        parts.append(f"reward {record['reward']:.4f}")
    if record["train_aux_loss"] or "reward" in record:  # single trains no auxiliary task
        parts.append(f"aux entropy {record['aux_label_entropy']:.3f}")
    if "ppo_approx_kl" in record:
        parts.append(f"kl {record['ppo_approx_kl']:.4f} clip {record['ppo_clip_fraction']:.3f}")
    parts.append(f"{record['images_per_s']:.0f} img/s ({record['epoch_seconds']:.1f} s)")
    return " | ".join(parts)


def open_tensorboard(run_dir: Path):
    """A SummaryWriter in RUN_DIR/tensorboard; a clear error when the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(TENSORBOARD_MISSING) from None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def log_scalars(writer, record: dict) -> None:
    """One TensorBoard scalar per numeric field of an epoch record, at step = epoch."""
    for name, value in record.items():
        if name != "epoch" and isinstance(value, (int, float)):
            writer.add_scalar(name, value, record["epoch"])
    writer.flush()


def describe_hierarchy(data) -> dict:
    """What usage.json needs besides the counts to be read alone: the blocks (psi) and, with fine
    labels, each fine class's primary class (for the report's per-class mutual information)."""
    meta = {"psi": list(data.hierarchy.psi), "fine_to_primary": None}
    fine, primary = data.train.fine, data.train.primary
    if fine is not None:
        f2p = [-1] * (int(fine.max()) + 1)
        for f, p in zip(fine.tolist(), primary.tolist()):
            f2p[f] = p
        meta["fine_to_primary"] = f2p
    return meta


def describe_machine(device) -> str:
    """What ran the training: the GPU, or the CPU and its torch threads, and the torch version."""
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    threads = torch.get_num_threads()
    return f"CPU, {os.cpu_count()} cores, {threads} torch thread{'s' if threads != 1 else ''}, torch {torch.__version__}"


def summarize(history: list[dict], wall: float, machine: str) -> dict:
    images = sum(r["images_per_s"] * r["epoch_seconds"] for r in history)
    return {"final_test_acc": history[-1]["test_acc"], "best_test_acc": max(r["test_acc"] for r in history),
            "epochs": len(history), "wall_seconds": wall, "images_per_s": images / max(wall, 1e-9),
            "machine": machine}


# ---- the run -------------------------------------------------------------------------------------------

def run(cfg: Config, log=print) -> dict:
    """Train (or continue, with cfg.resume) one run; returns its summary. Raises UserError on bad input
    and Interrupted (with the resume command in its message) on SIGINT/SIGTERM."""
    with StopOnSignal() as stop:
        return _run(cfg, log, stop)


def _run(cfg: Config, log, stop: StopOnSignal) -> dict:
    # Checks that need no torch come first, so that they answer at once.
    if cfg.resume:
        run_dir = Path(cfg.resume)
        check_resumable(read_run_config(run_dir), cfg, run_dir)
        if is_main_process():
            prepare_run_dir(run_dir)
    elif cfg.out and (Path(cfg.out) / "checkpoint.pt").exists():
        raise UserError(f"{cfg.out} already holds a run: continue it with --resume {cfg.out}, or pass another --out")
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError(TENSORBOARD_MISSING)

    from tqdm import tqdm

    from . import checkpoint
    from .data import load_dataset
    from . import distributed
    from .loop import NonFiniteError, Trainer, resolve_device

    if not is_main_process():
        log = lambda *args, **kwargs: None  # noqa: E731
    device = distributed.init(resolve_device(cfg.device))  # joins torchrun's processes, if any
    state, created = None, False
    if cfg.resume:
        if is_main_process():
            checkpoint.remove_stale_temps(run_dir)
        state = checkpoint.load(run_dir / checkpoint.CHECKPOINT)
        if state["device"] != device.type:
            raise UserError(f"--resume {run_dir}: the run was made on {state['device']}, this one is on {device.type}: "
                            f"pass --device {state['device']} (random states do not carry across devices)")
        if cfg.epochs < state["epoch"]:
            raise UserError(f"--epochs {cfg.epochs} is fewer than the {state['epoch']} epochs {run_dir} has already "
                            "done: pass a larger --epochs, or none")
    else:
        run_dir = Path(cfg.out) if cfg.out else default_out(cfg)
        if is_main_process():
            created = not run_dir.exists()
            prepare_run_dir(run_dir)
    show_progress = cfg.progress and is_main_process()
    progress = (lambda it, **kw: tqdm(it, leave=False, dynamic_ncols=True, disable=None, **kw)) if show_progress else None
    try:
        data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, psi=cfg.psi, download=cfg.download, flat=cfg.flat,
                            image_size=cfg.image_size, seed=0, limit=cfg.subset)  # one subset for every --seed: runs compare on the same images
        trainer = Trainer(cfg, data, device, progress=progress)
    except UserError:
        if created:  # bad data or settings: leave no empty run folder behind
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise
    writer = open_tensorboard(run_dir) if cfg.tensorboard and is_main_process() else None
    usage_meta = describe_hierarchy(data)
    history: list[dict] = []
    wall_before, done = 0.0, 0
    if state is not None:
        trainer.load_state_dict(state["trainer"])
        checkpoint.restore_rng(state["rng"])
        history, wall_before, done = list(state["history"]), state["wall_seconds"], state["epoch"]
        # What the checkpoint holds is the truth: a metrics line or usage.json written after it is dropped.
        write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        if state.get("usage") is not None:
            write_text(run_dir / "usage.json", json.dumps(state["usage"]))
    else:
        write_text(run_dir / "metrics.jsonl", "")
    write_text(run_dir / "config.json", dataclasses.replace(cfg, out=str(run_dir), resume=None).to_json())
    ckpt_path = run_dir / checkpoint.CHECKPOINT
    verb = f"resuming after epoch {done}" if state is not None else "run folder"
    log(f"{verb} {run_dir} | {cfg.dataset} ({len(data.train.primary)} train, {len(data.test.primary)} test) | "
        f"method {cfg.method} | device {device}")

    start = time.perf_counter()
    epoch = done
    try:
        for epoch in range(done, cfg.epochs):
            record = trainer.run_epoch(epoch)
            history.append(record)
            wall = wall_before + time.perf_counter() - start
            usage = {**trainer.last_usage, **usage_meta}
            trainer_state = trainer.state_dict()  # on every process: it gathers each one's random streams
            with stop.deferred():  # the checkpoint, then the files that describe it
                if is_main_process():
                    checkpoint.atomic_save({"format": checkpoint.FORMAT, "epoch": epoch + 1, "device": device.type,
                                            "trainer": trainer_state, "rng": checkpoint.capture_rng(),
                                            "history": history, "usage": usage, "wall_seconds": wall},
                                           ckpt_path)
                    with open(run_dir / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                done = epoch + 1
                write_text(run_dir / "usage.json", json.dumps(usage))
            if writer is not None:
                log_scalars(writer, record)
            log(format_epoch(record, cfg.epochs))
            if record.get("compile_seconds"):  # its own line: compile time is not in the img/s above
                log(f"compile: {record['compile_seconds']:.1f} s in epoch {record['epoch']} (torch.compile"
                    f"{' and CUDA graph recording' if cfg.cuda_graphs else ''}; not counted in img/s)")
    except Interrupted as e:
        name = SIGNAL_NAMES.get(e.signum, f"signal {e.signum}")
        if done:
            where = (f"the checkpoint of epoch {done} in {ckpt_path} is intact; resume with: {resume_command(run_dir)}")
        else:
            where = "no epoch had finished, so there is no checkpoint: run the same command again"
        # A signal that arrived while the checkpoint was written is handled once it is complete.
        when = f"during epoch {epoch + 1}" if done <= epoch else f"after epoch {done}"
        raise Interrupted(e.signum, f"interrupted by {name} {when}: {where}") from None
    except NonFiniteError as e:
        kept = f"{ckpt_path}, epoch {done}" if done else "none yet: no epoch had finished"
        raise NonFiniteError(f"{e} ({kept})") from None
    except OSError as e:
        raise UserError(f"cannot write to run folder {run_dir} ({e.strerror or type(e).__name__}): "
                        f"the last complete checkpoint is kept; free space, then {resume_command(run_dir)}") from None
    finally:
        if writer is not None:
            writer.close()

    wall = wall_before + time.perf_counter() - start
    if not history:
        raise UserError(f"{run_dir} has no finished epoch to summarise")
    summary = summarize(history, wall, describe_machine(device))
    write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    log(f"done: final test acc {100 * summary['final_test_acc']:.2f}% (best {100 * summary['best_test_acc']:.2f}%, "
        f"reported only; the final model is kept) | {wall:.1f} s | results in {run_dir}")
    return summary


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    try:
        with StopOnSignal():
            given = explicit_flags(argv)
            # A resumed run's settings are its saved ones with the flags given now on top.
            cfg = resume_config(given.pop("resume"), given) if given.get("resume") else parse_config(argv)
            run(cfg)
            _leave_process_group()
    except UserError as e:
        return _fail(f"error: {e}", 2, e)
    except Interrupted as e:
        return _fail(e.message or f"interrupted by {SIGNAL_NAMES.get(e.signum, e.signum)}", e.exit_code)
    except Exception as e:
        if not _in_process_group():
            raise
        import traceback

        return _fail(traceback.format_exc().rstrip(), 1, e)
    except KeyboardInterrupt:  # a Ctrl-C outside the handlers (for example while Python starts)
        print("interrupted by SIGINT", file=sys.stderr)
        return 130
    return 0


# ---- several processes (torchrun) ----------------------------------------------------------------------

def _in_process_group() -> bool:
    dist = sys.modules.get("rlaux_fast.distributed")  # imported (with torch) only once a run starts
    return dist is not None and dist.world_size() > 1


def _leave_process_group() -> None:
    if _in_process_group():
        sys.modules["rlaux_fast.distributed"].cleanup()


def _fail(message: str, code: int, error: BaseException | None = None) -> int:
    """Report a failure and give its exit code. Under torchrun, an error before the processes joined
    (a flag, a file) is the same on every process and rank 0 prints it; after they joined it may be one
    process's own, so each prints it with its rank and leaves at once: no collective, no teardown that
    could wait for a peer. torchrun then stops the others and exits non-zero."""
    if not _in_process_group():
        if is_main_process():
            print(message, file=sys.stderr)
        return code
    dist = sys.modules["rlaux_fast.distributed"]
    rank = dist.rank()
    if error is not None and dist.peer_failed(error):
        # Only a consequence of another process's failure: say so, and give torchrun time to see that
        # process exit first (it then stops this one), so that its summary names the real cause.
        print(f"[rank {rank}] stopping: another process failed (its error is shown above or below)", file=sys.stderr)
        sys.stderr.flush()
        time.sleep(10)
        os._exit(code)
    if error is not None:
        dist.record_error(error)  # torchrun's failure summary then shows it
    print("\n".join(f"[rank {rank}] {line}" for line in message.splitlines()), file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
