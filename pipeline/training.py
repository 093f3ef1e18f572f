"""One training loop for the project: cross-entropy against a (frozen) head, resumable bit for bit.

Every random choice is a function of (seed, epoch, step or sample index), so a run killed at any
point and resumed from its last checkpoint replays exactly the same steps. Checkpoints hold the
model, the optimizer, the step, torch's RNG state (dropout), the best metric and the run's
fingerprint; they are written to a temporary file and renamed, and load with weights_only=True.
The loop reports through a callback (a stage wires it to files or DVCLive): no DVC here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import FingerprintMismatch
from .evaluation import metrics

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 256
    lr: float = 5e-5  # new modules (paper Table A.3)
    temporal_lr: float | None = None  # the temporal module's own lr (None: lr)
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_epochs: float = 5.0
    min_lr: float = 5e-6  # cosine floor, for the lr of new modules (other groups scale with it)
    seed: int = 0
    checkpoint_every: int = 0  # steps between checkpoints (0: at epoch ends only)

    def as_dict(self) -> dict:
        return asdict(self)


class ClipSet:
    """A training or evaluation set: ``get(indices, epoch)`` -> (inputs, labels) tensors."""

    def __len__(self) -> int:
        raise NotImplementedError

    def get(self, indices: Sequence[int], epoch: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def lr_at(step: int, total: int, warmup: int, base: float, floor: float) -> float:
    """Linear warm-up to ``base``, then cosine down to ``floor``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, cfg: TrainConfig, lr_of: Callable[[str], float]) -> list[dict]:
    """AdamW groups: weight decay on matrices only; each parameter's lr from ``lr_of(name)``."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = cfg.weight_decay if (p.ndim >= 2 and "position" not in name) else 0.0
        groups.setdefault((lr_of(name), decay), []).append(p)
    return [{"params": ps, "lr": lr, "base_lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


@torch.no_grad()
def evaluate(model: nn.Module, data: ClipSet, batch_size: int) -> dict[str, float]:
    model.eval()
    logits, labels = [], []
    for lo in range(0, len(data), batch_size):
        x, y = data.get(range(lo, min(len(data), lo + batch_size)), epoch=0, train=False)
        logits.append(model(x).float())
        labels.append(y)
    return metrics(torch.cat(logits).numpy(), torch.cat(labels).numpy())


def train(model: nn.Module, train_set: ClipSet, val_set: ClipSet | None, cfg: TrainConfig, run_dir: Path,
          fingerprint: str, lr_of: Callable[[str], float] | None = None,
          callback: Callable[[str, dict], None] | None = None, epoch_length: int | None = None) -> dict[str, Any]:
    """Train ``model`` (cross-entropy on its logits); resume from ``run_dir`` when its checkpoint matches.

    ``epoch_length``: samples per epoch (few-shot: the full training set's size, the subset repeated).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    callback = callback or (lambda kind, values: None)
    lr_of = lr_of or (lambda name: cfg.lr)
    opt = torch.optim.AdamW(param_groups(model, cfg, lr_of), lr=cfg.lr, betas=cfg.betas)
    n = epoch_length or len(train_set)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    state = {"epoch": 0, "step": 0, "global_step": 0, "best_top1": -1.0, "history": []}

    path = run_dir / CHECKPOINT
    if path.exists():
        ck = torch.load(path, map_location="cpu", weights_only=True)
        if ck["fingerprint"] != fingerprint:
            raise FingerprintMismatch(f"{run_dir} holds a run made with other parameters or inputs; "
                                      "use another --run name or --replace-mismatched")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])
        state = ck["state"]
    else:
        torch.manual_seed(cfg.seed)

    def save() -> None:
        tmp = path.with_suffix(".partial")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state(),
                    "state": state, "fingerprint": fingerprint, "config": cfg.as_dict()}, tmp)
        os.replace(tmp, path)

    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(state["epoch"], cfg.epochs):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n) % len(train_set)
        model.train()
        for step in range(state["step"], steps_per_epoch):
            batch = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x, y = train_set.get(batch.tolist(), epoch=epoch, train=True)
            ratio = lr_at(state["global_step"], total, warmup, cfg.lr, cfg.min_lr) / cfg.lr
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * ratio
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            state["global_step"] += 1
            state["step"] = step + 1
            callback("step", {"step": state["global_step"], "epoch": epoch, "loss": float(loss.detach()),
                              "lr": cfg.lr * ratio})
            if cfg.checkpoint_every and state["global_step"] % cfg.checkpoint_every == 0:
                save()
        state["epoch"], state["step"] = epoch + 1, 0
        record = {"epoch": epoch + 1, "step": state["global_step"]}
        if val_set is not None:
            record.update({f"val_{k}": v for k, v in evaluate(model, val_set, cfg.batch_size).items()})
            state["best_top1"] = max(state["best_top1"], record["val_top1"])
        state["history"].append(record)
        callback("epoch", record)
        save()
    return {"epochs": cfg.epochs, "steps": state["global_step"], "best_top1": state["best_top1"],
            "history": state["history"]}
