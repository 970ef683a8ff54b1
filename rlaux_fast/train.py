"""`python -m rlaux_fast.train`: train a network with RL-AUX or a baseline, writing a run folder."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint
from .config import Config, parse_config
from .data import load_dataset
from .errors import UserError
from .loop import Trainer, resolve_device


def default_out(cfg: Config) -> Path:
    return Path("runs") / f"{cfg.dataset}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare_run_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to run folder {path} ({e.strerror}): pass a writable --out") from None
    return path


def format_epoch(record: dict, epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}",
             f"loss {record['train_primary_loss']:.4f} aux {record['train_aux_loss']:.4f}",
             f"test acc {100 * record['test_acc']:.2f}%"]
    if "reward" in record:
        parts.append(f"reward {record['reward']:.4f}")
    parts.append(f"aux entropy {record['aux_label_entropy']:.3f}")
    if "ppo_approx_kl" in record:
        parts.append(f"kl {record['ppo_approx_kl']:.4f} clip {record['ppo_clip_fraction']:.3f}")
    parts.append(f"{record['images_per_s']:.0f} img/s ({record['epoch_seconds']:.1f} s)")
    return " | ".join(parts)


def run(cfg: Config, log=print) -> dict:
    device = resolve_device(cfg.device)
    run_dir = prepare_run_dir(Path(cfg.out) if cfg.out else default_out(cfg))
    data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, psi=cfg.psi, download=cfg.download, flat=cfg.flat,
                        image_size=cfg.image_size, seed=cfg.seed, limit=cfg.subset)
    progress = (lambda it, **kw: tqdm(it, leave=False, dynamic_ncols=True, **kw)) if cfg.progress else None
    trainer = Trainer(cfg, data, device, progress=progress)
    (run_dir / "config.json").write_text(cfg.to_json())
    log(f"run folder {run_dir} | {cfg.dataset} ({len(data.train.primary)} train, {len(data.test.primary)} test) | "
        f"method {cfg.method} | device {device}")

    history: list[dict] = []
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        record = trainer.run_epoch(epoch)
        history.append(record)
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        (run_dir / "usage.json").write_text(json.dumps(trainer.last_usage))
        checkpoint.atomic_save({"epoch": epoch + 1, "trainer": trainer.state_dict(), "history": history},
                               run_dir / checkpoint.CHECKPOINT)
        log(format_epoch(record, cfg.epochs))
    wall = time.perf_counter() - start
    images = sum(r["images_per_s"] * r["epoch_seconds"] for r in history)
    summary = {"final_test_acc": history[-1]["test_acc"], "best_test_acc": max(r["test_acc"] for r in history),
               "epochs": len(history), "wall_seconds": wall, "images_per_s": images / max(wall, 1e-9)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"done: final test acc {100 * summary['final_test_acc']:.2f}% (best {100 * summary['best_test_acc']:.2f}%, "
        f"reported only; the final model is kept) | {wall:.1f} s | results in {run_dir}")
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_config(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
