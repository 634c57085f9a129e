"""Training speed of one adapter step on SmolLM2-135M: fp32 against bf16 autocast, and
modulora's LoRA against PEFT's.

A batch of 8 x 128 tokens (loss on the last 32 of each row). First each adapter type, fp32 and
bf16 steps interleaved. Then LoRA (rank 8, alpha 16, dropout 0.05, all linear layers, AdamW)
in modulora and in PEFT (`get_peft_model`) on two copies of the base, steps interleaved, each
precision: the same loss function for both (modulora's `answer_loss`, logits only where answers
are), and PEFT as most scripts call it (`labels=` to the model: logits at every position). The
memory peak of each is the peak RSS of a fresh process that loads the base, wraps it and runs
3 steps (VmHWM), beside the RSS once the model is loaded. Several repeats, the median.
Writes bench/results/train_speed.md.

    python bench/train_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from modulora.adapters import AdapterConfig, attach, detach
from modulora.base import load_base
from modulora.data import IGNORE
from modulora.report import table
from modulora.train import answer_loss, autocast_for, cpu_has_bf16

sys.path.insert(0, str(Path(__file__).parent))
from routing import cpu_model  # noqa: E402

IMPLS = ("modulora", "PEFT", "PEFT, labels= loss")


def make_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (8, 128), generator=gen)
    labels = ids.clone()
    labels[:, :96] = IGNORE
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def wrapped(impl: str):
    """A fresh base with a LoRA of the same settings, the modulora or the PEFT way; its optimizer."""
    base = load_base(dtype="fp32")
    cfg = AdapterConfig(type="lora", r=8, alpha=16.0, dropout=0.05)
    if impl == "modulora":
        attach(base.model, cfg)
        model = base.model
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base.model, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                      target_modules=list(cfg.target_modules)))
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def peft_step_seconds(model, opt, batch, dtype: str) -> float:
    """A step as PEFT users usually write it: the model computes the loss from `labels`."""
    t = time.perf_counter()
    with autocast_for(dtype):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t


def one_step(impl: str, model, opt, batch, dtype: str) -> float:
    return (peft_step_seconds if impl == "PEFT, labels= loss" else step_seconds)(model, opt, batch, dtype)


def memory_mb(field: str) -> float:
    """A /proc/self/status figure in MB: VmRSS (now) or VmHWM (the peak; unlike ru_maxrss, a
    fresh process does not inherit its parent's)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def peak_memory(impl: str, dtype: str) -> dict:
    """In a fresh process: RSS once the wrapped model is loaded, and the peak after 3 steps (MB)."""
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import train_speed as t; "
            f"m, o = t.wrapped({impl!r}); b = t.make_batch(); loaded = t.memory_mb('VmRSS'); "
            f"[t.one_step({impl!r}, m, o, b, {dtype!r}) for _ in range(3)]; "
            f"print(json.dumps({{'loaded': loaded, 'peak': t.memory_mb('VmHWM')}}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_peft(repeats: int) -> str:
    """modulora's LoRA step against PEFT's, interleaved; the table and the memory peaks."""
    batch = make_batch()
    dtypes = ("fp32", "bf16") if cpu_has_bf16() else ("fp32",)
    models = {impl: wrapped(impl if impl != "PEFT, labels= loss" else "PEFT") for impl in IMPLS[:2]}
    models[IMPLS[2]] = models["PEFT"]
    times = {(i, d): [] for i in IMPLS for d in dtypes}
    for impl in IMPLS:  # warm-up
        for d in dtypes:
            one_step(impl, *models[impl], batch, d)
    for _ in range(repeats):
        for d in dtypes:
            for impl in IMPLS:
                times[(impl, d)].append(one_step(impl, *models[impl], batch, d))
    rows = []
    for d in dtypes:
        ours = statistics.median(times[("modulora", d)])
        for impl in IMPLS:
            t = statistics.median(times[(impl, d)])
            mem = peak_memory(impl, d) if impl != "PEFT, labels= loss" or d == dtypes[0] else None
            rows.append([impl, d, f"{t:.2f}", f"{batch['input_ids'].numel() / t:.0f}", f"{t / ours:.2f}x",
                         f"{mem['loaded']:.0f}" if mem else "", f"{mem['peak']:.0f}" if mem else "",
                         " ".join(f"{x:.2f}" for x in times[(impl, d)])])
            print(rows[-1], flush=True)
    return table(["implementation", "precision", "s/step", "tokens/s", "time vs modulora", "RSS loaded MB",
                  "peak RSS MB", "all repeats s"], rows)


def step_seconds(model, opt, batch, dtype: str) -> float:
    t = time.perf_counter()
    with autocast_for(dtype):
        loss, _ = answer_loss(model, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_speed.md"))
    args = ap.parse_args()
    base = load_base(dtype="fp32")
    batch = make_batch()
    tokens = batch["input_ids"].numel()
    rows = []
    for cfg in (AdapterConfig(type="lora", r=8), AdapterConfig(type="series", bottleneck=64),
                AdapterConfig(type="parallel", bottleneck=64), AdapterConfig(type="prefix", num_virtual_tokens=16)):
        attach(base.model, cfg)
        base.model.train()
        opt = torch.optim.AdamW([p for p in base.model.parameters() if p.requires_grad], lr=1e-5)
        for dtype in ("fp32", "bf16"):  # warm-up
            step_seconds(base.model, opt, batch, dtype)
        times = {"fp32": [], "bf16": []}
        for _ in range(args.repeats):
            for dtype in ("fp32", "bf16"):
                times[dtype].append(step_seconds(base.model, opt, batch, dtype))
        base.model.eval()
        detach(base.model)
        f32, b16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
        rows.append([cfg.type, f"{f32:.2f}", f"{tokens / f32:.0f}", f"{b16:.2f}", f"{tokens / b16:.0f}",
                     f"{f32 / b16:.2f}x"])
        print(rows[-1], flush=True)
    cpu = cpu_model()
    peft_table = compare_peft(args.repeats)
    text = (f"# Training speed, SmolLM2-135M-Instruct\n\n"
            f"One optimizer step on a batch of 8 x 128 tokens; median of {args.repeats} interleaved repeats.\n"
            f"Hardware: {cpu}, {torch.get_num_threads()} threads, native bf16: {cpu_has_bf16()}; "
            f"torch {torch.__version__}.\n\n"
            + table(["adapter", "fp32 s/step", "fp32 tokens/s", "bf16 s/step", "bf16 tokens/s", "bf16 speed-up"], rows)
            + "\n\n`modulora train --dtype auto` (the default) uses bf16 autocast on CPUs with native bf16.\n"
            + "\n## modulora's LoRA against PEFT's\n\nSame base, batch, rank, alpha, dropout, modules and optimizer; "
              "steps interleaved. \"PEFT\" uses modulora's loss function (the adapters alone differ); \"PEFT, labels= "
              "loss\" is the usual PEFT script (the model's own loss, logits at every position; same model object as "
              "\"PEFT\"). Memory: a fresh process per row (3 steps).\n\n" + peft_table + "\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
