"""One training loop for the project: a loss against a (frozen) head, resumable bit for bit, 1 to N processes.

Every random choice is a function of (seed, epoch, sample index): the epoch's order, each clip's
frames and augmentation. A run killed at any point and resumed from its last checkpoint therefore
replays exactly the same steps, whatever the number of loader workers. Checkpoints hold the model,
the optimizer, the AMP scaler, the step (the sampler's position), RNG states, the best metric and
the run's fingerprint; they are written to a temporary file and renamed, and load with
``weights_only=True``.

Distributed (torchrun): each global batch of ``batch_size`` clips is split across ranks (rank r
takes every world-th clip), each rank's share in micro-batches of ``micro_batch`` with gradient
accumulation; losses are weighted so that the DDP gradient equals the single-process gradient of
the global batch. Evaluation gives every clip to exactly one rank and gathers: no padded duplicates.
The loop reports through a callback on rank 0 (a stage wires it to files or DVCLive): no DVC here.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.core.cachefs import as_path
from pipeline.core.errors import DamagedStore, FingerprintMismatch, PipelineError
from pipeline.core.files import CHECKPOINT, checkpoint_problem, write_atomic
from pipeline.core.settings import FinetuneSettings
from pipeline.learning.evaluation import metrics, multilabel_metrics

_F = FinetuneSettings.defaults()  # the defaults



def load_checkpoint(path: Path) -> dict[str, Any]:
    """A run's checkpoint (tensors only: ``weights_only``), its checksums verified; a one-line error when it
    is damaged."""
    problem = checkpoint_problem(path)
    if problem:
        raise DamagedStore(f"checkpoint {path} is damaged: {problem}; delete it, or use --replace-mismatched to "
                           "start the run again")
    try:
        with as_path(path).open("rb") as f:
            ck = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - bad pickle, ...: all mean "damaged"
        raise DamagedStore(f"checkpoint {path} is damaged ({type(e).__name__}); delete it or use "
                           "--replace-mismatched to start the run again") from None
    if not isinstance(ck, dict) or "fingerprint" not in ck:
        raise PipelineError(f"{path} is not a checkpoint of this pipeline")
    return ck


@dataclass
class TrainConfig:
    epochs: int = _F.epochs
    batch_size: int = _F.global_batch_size  # global batch (all ranks, all accumulation steps)
    micro_batch: int = _F.micro_batch  # clips per forward pass on one rank (0: the rank's whole share)
    lr: float = _F.lr  # new modules (paper Table A.3)
    backbone_lr_ratio: float = _F.backbone_lr_ratio  # the pretrained encoder's lr, relative to lr
    temporal_lr: float | None = None  # the temporal module's own lr (None: lr)
    weight_decay: float = _F.weight_decay
    betas: tuple[float, float] = _F.betas  # the released code's (train.py:280); the paper's (0.9, 0.98) is an option
    warmup_epochs: float = _F.warmup_epochs
    min_lr: float = _F.min_lr  # cosine floor, for the lr of new modules (other groups scale with it)
    seed: int = 0
    checkpoint_every: int = _F.checkpoint_every  # steps between checkpoints (0: at epoch ends only)
    amp: bool = _F.amp  # autocast on GPU (bf16 where supported, else fp16 with a scaler); fp32 on CPU
    workers: int = _F.workers  # data-loader processes per rank
    compile: bool = _F.compile  # torch.compile the visual encoder (in place: checkpoints keep their keys)
    log_every: int = _F.log_every  # GPU: steps between loss read-backs (the only host synchronisation of a step)

    def __post_init__(self) -> None:
        for name in ("lr", "backbone_lr_ratio", "weight_decay", "warmup_epochs", "min_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, not {value}")
        if self.temporal_lr is not None and (not math.isfinite(float(self.temporal_lr)) or self.temporal_lr < 0):
            raise ValueError(f"temporal_lr must be a finite number >= 0, not {self.temporal_lr}")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"AdamW betas are two numbers in [0, 1), not {self.betas}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.lr == 0 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("lr must be > 0, and epochs and batch size at least 1")

    def as_dict(self) -> dict:
        return asdict(self)


class ClipSet(Protocol):
    """A training or evaluation set: ``item(index, epoch, train)`` -> (input, label).

    Evaluation inputs carry a leading views axis [V, ...]; their embeddings are averaged over it.
    """

    def __len__(self) -> int: ...

    def item(self, index: int, epoch: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]: ...


class _EpochView(torch.utils.data.Dataset):
    def __init__(self, data: ClipSet, epoch: int, train: bool) -> None:
        self.data, self.epoch, self.train = data, epoch, train

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        return (index, *self.data.item(int(index), self.epoch, self.train))

    def __getitems__(self, indices: list[int]) -> list:  # the DataLoader fetches a batch's items in one call
        items = getattr(self.data, "items", None)
        if items is None:
            return [self[i] for i in indices]
        return [(i, *pair) for i, pair in zip(indices, items([int(i) for i in indices], self.epoch, self.train),
                                               strict=True)]


def _collate(items: list) -> tuple:
    """Stack tensors; keep the batched path's encoded clips as a list (their device decodes them)."""
    if isinstance(items[0][1], torch.Tensor):
        return torch.utils.data.default_collate(items)
    index, inputs, labels = zip(*items, strict=True)
    return torch.as_tensor(index), list(inputs), torch.utils.data.default_collate(list(labels))


def _loader(data: ClipSet, epoch: int, train: bool, batches: Sequence[Sequence[int]], workers: int, pin: bool):
    return torch.utils.data.DataLoader(_EpochView(data, epoch, train), batch_sampler=batches, num_workers=workers,
                                       pin_memory=pin, persistent_workers=False, collate_fn=_collate)


def to_device(data: ClipSet, x, device: torch.device, train: bool) -> torch.Tensor:  # noqa: ANN001
    """A loader batch as model inputs on ``device``: a set on the batched path decodes and augments it there."""
    if isinstance(x, list):
        return data.finish(x, device, train)
    return x.to(device, non_blocking=True)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def lr_at(step: int, total: int, warmup: int, base: float, floor: float) -> float:
    """Linear warm-up to ``base``, then cosine down to ``floor``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, cfg: TrainConfig, lr_of: Callable[[str], float | tuple[float, float]]) -> list[dict]:
    """AdamW groups: each parameter's lr from ``lr_of(name)``, which may also return (lr, weight decay) for
    parameters with their own decay (a trained text tower). Weight decay applies to every trained
    parameter, biases, norms, positions, TokenT1D and the logit scale included, as in the official
    code (its two AdamW groups share one weight_decay)."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        rule = lr_of(name)
        lr, wd = rule if isinstance(rule, tuple) else (rule, cfg.weight_decay)
        groups.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "base_lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The paper's objective: cross-entropy of the scaled cosine logits against the head."""
    return F.cross_entropy(model(x).float(), y)


def autocast_for(device: torch.device, enabled: bool):
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext(), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


@torch.no_grad()
def predict(model: nn.Module, data: ClipSet, batch_size: int, device: torch.device | str = "cpu", workers: int = 0,
            amp: bool = True, on_batch: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits [n, C], labels) over the whole set; under DDP each clip is scored by one rank, then gathered.

    Views (the leading axis of each input) are embedded separately and their raw embeddings averaged before
    the head (whose cosine normalises), as the official test.py:233-235 does.
    """
    device = torch.device(device)
    rank, world = rank_and_world()
    was_training = model.training
    model.eval()
    mine = list(range(rank, len(data), world))
    batches = [mine[lo:lo + batch_size] for lo in range(0, len(mine), batch_size)]
    autocast, _ = autocast_for(device, amp)
    out_idx, out_logits, out_labels = [], [], []
    for idx, x, y in _loader(data, 0, False, batches, workers, device.type == "cuda"):
        x = to_device(data, x, device, False)
        b, v = x.shape[:2]
        with autocast:
            emb = model.embed(x.flatten(0, 1)).float()
        # the views' raw embeddings averaged, then the head's cosine normalises (test.py:233-235)
        video = emb.view(b, v, -1).mean(dim=1)
        out_logits.append(model.head(video).float())  # read back once, after the last batch
        out_idx.append(idx)
        out_labels.append(y)
        if on_batch is not None:
            on_batch(len(idx))  # clips of this rank scored (a progress bar)
    model.train(was_training)
    n_classes = model.head.weight.shape[0]
    local = (torch.cat(out_idx) if out_idx else torch.zeros(0, dtype=torch.long),
             torch.cat(out_logits).cpu() if out_logits else torch.zeros(0, n_classes),
             torch.cat(out_labels) if out_labels else torch.zeros(0, dtype=torch.long))
    if world > 1:
        parts: list = [None] * world
        dist.all_gather_object(parts, local)
        local = tuple(torch.cat([p[k] for p in parts]) for k in range(3))
    order = torch.argsort(local[0])
    return local[1][order].numpy(), local[2][order].numpy()


def cosines_of(model: nn.Module, logits: np.ndarray) -> np.ndarray | None:
    """The cosines behind a model's logits (``exp(s) * cos``), for metrics computed at another scale (the official
    ActivityNet mAP scores 100 x cos, test_anet.py:244); None for a head without a logit scale."""
    scale = getattr(getattr(model, "head", None), "logit_scale", None)
    return None if scale is None else logits / float(scale.detach().float().exp())


def evaluate(model: nn.Module, data: ClipSet, batch_size: int, device: torch.device | str = "cpu",
             workers: int = 0, amp: bool = True) -> dict[str, float]:
    logits, labels = predict(model, data, batch_size, device, workers, amp)
    if labels.ndim == 2:
        return multilabel_metrics(logits, labels, cosines=cosines_of(model, logits))
    return metrics(logits, labels)


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def _step_plan(batch: np.ndarray, rank: int, world: int, micro: int) -> list[tuple[list[int], float]]:
    """This rank's micro-batches of one global batch, each with its share of the global batch.

    A rank left without clips (a last batch smaller than the world) still runs one clip at weight 0,
    so that every rank takes part in the gradient all-reduce.
    """
    mine = batch[rank::world].tolist()
    if not mine:
        return [([int(batch[0])], 0.0)]
    micro = micro or len(mine)
    return [(mine[lo:lo + micro], len(mine[lo:lo + micro]) / len(batch)) for lo in range(0, len(mine), micro)]


def train(model: nn.Module, train_set: ClipSet, val_set: ClipSet | None, cfg: TrainConfig, run_dir: Path,
          fingerprint: str, lr_of: Callable[[str], float] | None = None,
          callback: Callable[[str, dict], None] | None = None, epoch_length: int | None = None,
          device: torch.device | str = "cpu", objective: Callable = cross_entropy,
          eval_batch: int | None = None) -> dict[str, Any]:
    """Train ``model`` (``objective``: cross-entropy by default); resume from ``run_dir`` when its checkpoint matches.

    ``epoch_length``: samples per epoch (few-shot: the full training set's size, the subset repeated).
    The model must have ``embed`` and ``head`` (evaluation averages embeddings over views).
    """
    device = torch.device(device)
    rank, world = rank_and_world()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    callback = callback if (callback and rank == 0) else (lambda kind, values: None)
    lr_of = lr_of or (lambda name: cfg.lr)
    model.to(device)
    # fused AdamW: one kernel for all parameters on a GPU (the for-each implementation elsewhere)
    opt = torch.optim.AdamW(param_groups(model, cfg, lr_of), lr=cfg.lr, betas=cfg.betas,
                            fused=True if device.type == "cuda" else None)
    if cfg.compile:
        (getattr(model, "visual", None) or model).compile()
    logit_scales = [p for name, p in model.named_parameters() if name.endswith("logit_scale") and p.requires_grad]
    autocast, scaler = autocast_for(device, cfg.amp)
    n = epoch_length or len(train_set)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if rank == 0 and warmup >= total:
        warnings.warn(f"the warm-up ({cfg.warmup_epochs:g} epochs, {warmup} steps) is as long as the whole run "
                      f"({total} steps): the learning rate never reaches --lr {cfg.lr:g}; lower --warmup-epochs",
                      stacklevel=2)
    state = {"epoch": 0, "step": 0, "global_step": 0, "best_top1": -1.0, "history": []}

    path = run_dir / CHECKPOINT
    if path.exists():
        ck = load_checkpoint(path)
        if ck["fingerprint"] != fingerprint:
            raise FingerprintMismatch(f"{run_dir} holds a run made with other parameters or inputs; "
                                      "use another --run-name or --replace-mismatched")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        _set_rng_states(ck["rng"])
        state = ck["state"]
    else:
        torch.manual_seed(cfg.seed)

    callback("start", {"step": state["global_step"]})
    ddp = world > 1
    net = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model

    def save() -> None:
        if rank == 0:
            checkpoint = {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": _rng_states(),
                          "scaler": scaler.state_dict() if scaler is not None else None, "state": state,
                          "fingerprint": fingerprint, "config": cfg.as_dict()}
            write_atomic(path, lambda f: torch.save(checkpoint, f))
        if ddp:
            dist.barrier()

    # Step losses stay on the device and are read back once per logging interval (every step on a CPU, where
    # reading costs nothing): a GPU step never waits for the host.
    log_every = max(1, cfg.log_every) if device.type == "cuda" else 1
    pending: list[tuple[dict, torch.Tensor]] = []
    interval_start = time.perf_counter()

    def flush() -> None:
        nonlocal interval_start
        if pending:
            losses = torch.stack([loss for _, loss in pending]).tolist()
            seconds = (time.perf_counter() - interval_start) / len(pending)
            for (record, _), loss in zip(pending, losses, strict=True):
                callback("step", {**record, "loss": loss, "seconds": seconds})
            pending.clear()
        interval_start = time.perf_counter()

    for epoch in range(state["epoch"], cfg.epochs):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n) % len(train_set)
        plans = [_step_plan(order[s * cfg.batch_size:(s + 1) * cfg.batch_size], rank, world, cfg.micro_batch)
                 for s in range(state["step"], steps_per_epoch)]
        micro_batches = [ids for plan in plans for ids, _ in plan]
        batches = iter(_loader(train_set, epoch, True, micro_batches, cfg.workers, device.type == "cuda"))
        model.train()
        for step, plan in zip(range(state["step"], steps_per_epoch), plans, strict=True):
            ratio = lr_at(state["global_step"], total, warmup, cfg.lr, cfg.min_lr) / cfg.lr
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * ratio
            opt.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), dtype=torch.float64, device=device)
            for k, (_, weight) in enumerate(plan):
                _, x, y = next(batches)
                x, y = to_device(train_set, x, device, True), y.to(device, non_blocking=True)
                sync = k == len(plan) - 1
                with (net.no_sync() if ddp and not sync else contextlib.nullcontext()), autocast:
                    # weight * world: DDP averages over ranks, so the sum is the global batch's mean loss
                    loss = objective(net, x, y) * (weight * world)
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                step_loss += loss.detach().double() / world
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            with torch.no_grad():  # open_clip's rule: the forward pass never clamps (its gradient stays intact)
                for scale in logit_scales:
                    scale.clamp_(0, math.log(100))
            if ddp:
                dist.all_reduce(step_loss)
            state["global_step"] += 1
            state["step"] = step + 1
            clips = len(order[step * cfg.batch_size:(step + 1) * cfg.batch_size])
            pending.append(({"step": state["global_step"], "epoch": epoch, "lr": cfg.lr * ratio, "clips": clips},
                            step_loss))
            if len(pending) >= log_every:
                flush()
            if cfg.checkpoint_every and state["global_step"] % cfg.checkpoint_every == 0:
                flush()  # the history holds every step a checkpoint covers
                save()
        flush()
        state["epoch"], state["step"] = epoch + 1, 0
        record = {"epoch": epoch + 1, "step": state["global_step"]}
        if val_set is not None:
            scores = evaluate(model, val_set, eval_batch or cfg.micro_batch or cfg.batch_size, device, cfg.workers,
                              cfg.amp)
            record.update({f"val_{k}": v for k, v in scores.items()})
            state["best_top1"] = max(state["best_top1"], record["val_top1"])
        state["history"].append(record)
        callback("epoch", record)
        save()
    return {"epochs": cfg.epochs, "steps": state["global_step"], "best_top1": state["best_top1"],
            "history": state["history"]}
