"""Training speed of one adapter step on SmolLM2-135M: fp32 against bf16 autocast.

A batch of 8 x 128 tokens (loss on the last 32 of each row), each adapter type; fp32 and bf16
steps interleaved, several repeats, the median. Writes bench/results/train_speed.md.

    python bench/train_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from modulora.adapters import AdapterConfig, attach, detach
from modulora.base import load_base
from modulora.data import IGNORE
from modulora.report import table
from modulora.train import answer_loss, autocast_for, cpu_has_bf16


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
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (8, 128), generator=gen)
    labels = ids.clone()
    labels[:, :96] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    tokens = ids.numel()
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
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    text = (f"# Training speed, SmolLM2-135M-Instruct\n\n"
            f"One optimizer step on a batch of 8 x 128 tokens; median of {args.repeats} interleaved repeats.\n"
            f"Hardware: {cpu}, {torch.get_num_threads()} threads, native bf16: {cpu_has_bf16()}; "
            f"torch {torch.__version__}.\n\n"
            + table(["adapter", "fp32 s/step", "fp32 tokens/s", "bf16 s/step", "bf16 tokens/s", "bf16 speed-up"], rows)
            + "\n\n`modulora train --dtype auto` (the default) uses bf16 autocast on CPUs with native bf16.\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
