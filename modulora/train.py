"""One training loop for every adapter type: progress bar, checkpoints, resume, validation loss,
and an adapter card written beside the weights."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import __version__
from .adapters import AdapterConfig, attach, detach, save_adapter
from .base import Base
from .compute import DTYPES, cpu_has_bf16, resolve  # noqa: F401  (cpu_has_bf16: re-exported for the benchmarks)
from .data import IGNORE, DataError, Task, collate, encode, split, user_text
from .forward import forward

DEFAULT_LR = {"lora": 3e-4, "series": 3e-4, "parallel": 3e-4, "prefix": 3e-3}


@dataclass
class TrainConfig:
    steps: int | None = None       # optimizer steps; None = run `epochs` over the data
    epochs: float = 1.0
    lr: float | None = None        # None = the adapter type's default (DEFAULT_LR)
    batch_size: int = 8
    max_length: int = 256
    seed: int = 0
    dtype: str = "auto"            # auto, bf16, fp16, fp32: see modulora.compute.resolve
    holdout: float = 0.1           # validation share (a fraction, or a count when >= 1)
    warmup: float = 0.05           # share of steps with a linear warm-up
    checkpoint_every: int = 50
    max_samples: int = 32          # sample inputs kept on the card (retrieval uses them)
    micro_batch: int | None = None  # rows per forward/backward pass (None = the whole batch): less memory,
    #                                 the same update (gradients accumulate), so not part of settings()

    def settings(self) -> dict:
        """The fields that decide the trained adapter (recorded on the card, compared on reuse)."""
        d = asdict(self)
        d.pop("micro_batch")
        return d

    def validate(self) -> None:
        def positive(name, value, optional=False):
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"training setting {name} must be a positive integer, got {value!r}")
        for name in ("batch_size", "max_length", "checkpoint_every"):
            positive(name, getattr(self, name))
        positive("steps", self.steps, optional=True)
        positive("micro_batch", self.micro_batch, optional=True)
        if not (isinstance(self.epochs, (int, float)) and self.epochs > 0):
            raise ValueError(f"training setting epochs must be > 0, got {self.epochs!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown training dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")


def autocast_for(dtype: str, device: torch.device | str = "cpu"):
    """The autocast a training forward runs in (`modulora.compute.resolve`)."""
    return resolve(device, dtype, training=True).autocast()


def answer_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over answer tokens, and how many there were.

    Logits are computed only at positions where some row has an answer token: the vocabulary
    projection is a large share of a step on a small model.
    """
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = batch["labels"][:, 1:]
    keep = (labels != IGNORE).any(0).nonzero().squeeze(1)
    logits, _ = forward(model, batch["input_ids"], batch["attention_mask"], logits_to_keep=keep)
    labels = labels[:, keep]
    n = int((labels != IGNORE).sum())
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
    return loss, n


def _lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    warm = max(1, int(total * warmup))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def _save_checkpoint(path: Path, model, opt, step: int, meta: dict) -> None:
    tensors = {}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    for n in names:
        tensors[f"param/{n}"] = params[n].detach().contiguous()
        for k, v in opt.state.get(params[n], {}).items():
            tensors[f"opt/{n}/{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().contiguous()
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**meta, "step": step}))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, model, opt, meta: dict) -> int:
    """Restore weights and optimizer state; 0 when there is no usable checkpoint."""
    if not (path / "state.json").exists():
        return 0
    saved = json.loads((path / "state.json").read_text())
    if {k: saved.get(k) for k in meta} != meta:
        return 0  # made with other settings or data: start over
    tensors = load_file(str(path / "state.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            kind, rest = key.split("/", 1)
            if kind == "param":
                params[rest].copy_(value)
            else:
                name, field = rest.rsplit("/", 1)
                opt.state[params[name]][field] = value.clone()
    return int(saved["step"])


def _accumulate(model, rows: list, pad_id: int, cfg: TrainConfig) -> float:
    """Backward pass of the mean answer-token loss over `rows`, in micro-batches of cfg.micro_batch
    rows; each part is weighted by its share of the answer tokens, so the summed gradient is the
    whole batch's. Returns the batch loss."""
    size = cfg.micro_batch or len(rows)
    parts = [collate(rows[i:i + size], pad_id) for i in range(0, len(rows), size)]
    counts = [int((p["labels"][:, 1:] != IGNORE).sum()) for p in parts]
    total_n, total = max(sum(counts), 1), 0.0
    for part, n in zip(parts, counts):
        if n == 0:
            continue
        with autocast_for(cfg.dtype, next(model.parameters()).device):
            loss, _ = answer_loss(model, part)
        (loss * (n / total_n)).backward()
        total += loss.item() * n / total_n
    return total


@torch.no_grad()
def evaluate_loss(model, rows: list, pad_id: int, batch_size: int, dtype: str) -> float:
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        with autocast_for(dtype, next(model.parameters()).device):
            loss, n = answer_loss(model, collate(rows[i:i + batch_size], pad_id))
        total, count = total + float(loss) * n, count + n
    return total / max(count, 1)


def train_adapter(base: Base, task: Task, adapter: AdapterConfig, cfg: TrainConfig, out_dir: str | Path,
                  data_hash: str = "", progress: bool = True) -> dict:
    """Train one adapter on a task and write it (PEFT layout for LoRA) with its card to `out_dir`.

    Checkpoints go to `<out_dir>.ckpt/` and are resumed from when the settings and data match;
    they are removed once the adapter is written.
    """
    adapter.validate()
    cfg.validate()
    if not task.examples:
        raise DataError(f"task {task.name!r} has no examples to train on")
    out_dir = Path(out_dir)
    model, tok = base.model, base.tokenizer
    lr = cfg.lr or DEFAULT_LR[adapter.type]
    train_ex, val_ex = split(task.examples, cfg.holdout, cfg.seed) if cfg.holdout else (task.examples, [])
    train_rows = [encode(tok, ex, cfg.max_length) for ex in train_ex]
    val_rows = [encode(tok, ex, cfg.max_length) for ex in val_ex[:256]]
    per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    total = cfg.steps or max(1, math.ceil(per_epoch * cfg.epochs))
    meta = json.loads(json.dumps({"task": task.name, "data_hash": data_hash, "adapter": asdict(adapter),
                                  "train": cfg.settings(), "base": base.fingerprint["id"]}))  # as stored

    attach(model, adapter, seed=cfg.seed)
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        ckpt = out_dir.with_name(out_dir.name + ".ckpt")
        start = _load_checkpoint(ckpt, model, opt, meta)
        model.train()
        t0, tokens, losses = time.time(), 0, []
        bar = tqdm(total=total, initial=start, desc=f"train {adapter.type}", unit="step", disable=not progress,
                   dynamic_ncols=True, mininterval=0.5)
        for step in range(start, total):
            epoch, pos = divmod(step, per_epoch)
            order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(cfg.seed + epoch))
            idx = order[pos * cfg.batch_size:(pos + 1) * cfg.batch_size].tolist()
            torch.manual_seed(cfg.seed * 100003 + step)  # dropout: same masks after a resume
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, lr, cfg.warmup)
            opt.zero_grad(set_to_none=True)
            loss = _accumulate(model, [train_rows[i] for i in idx], tok.pad_token_id, cfg)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            tokens += sum(len(train_rows[i][0]) for i in idx)
            losses.append(loss)
            rate = tokens / max(time.time() - t0, 1e-9)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:.0f}")
            bar.update(1)
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
                _save_checkpoint(ckpt, model, opt, step + 1, meta)
        bar.close()
        model.eval()
        seconds = time.time() - t0
        metrics = {
            "steps": total, "resumed_from": start,
            "train_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1) if losses else None,
            "first_loss": losses[0] if losses and start == 0 else None,
            "val_loss": evaluate_loss(model, val_rows, tok.pad_token_id, cfg.batch_size, cfg.dtype) if val_rows else None,
            "tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
            "train_examples": len(train_rows), "val_examples": len(val_rows),
        }
        card = {
            "name": out_dir.name, "type": adapter.type, "task": task.name, "description": task.description,
            "data_hash": data_hash, "base_fingerprint": base.fingerprint,
            "train_config": {**cfg.settings(), "lr": lr, "adapter": asdict(adapter)},
            "samples": [user_text(ex)[:1000] for ex in train_ex[: cfg.max_samples]],
            "metrics": metrics, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "modulora_version": __version__,
        }
        save_adapter(model, out_dir, card=card, base_name=base.name)
        shutil.rmtree(ckpt, ignore_errors=True)
        return metrics
    finally:
        model.eval()
        detach(model)
