"""`modulora demo`: the main job on embedded defaults, with no external data.

It trains a LoRA per generated task, adds them to a fresh library, and prints each adapter's
answers beside the base model's on held-out prompts.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .adapters import AdapterConfig
from .base import home, load_base
from .generate import generate, using_adapter
from .library import Library
from .metrics import exact_match, mean
from .report import table
from .tasks import make_task
from .train import TrainConfig, train_adapter

DEMO_TASKS = ("capital", "add", "upper", "acronym")


def run_demo(base_name: str | None = None, tasks: tuple[str, ...] = DEMO_TASKS, steps: int = 60,
             n_eval: int = 20, workdir: str | Path | None = None, progress: bool = True) -> list[dict]:
    """Train, store and compare; returns one row per task (also printed)."""
    t0 = time.time()
    work = Path(workdir) if workdir else home() / "demo"
    if (work / "library").exists():
        shutil.rmtree(work / "library")
    base = load_base(base_name)
    print(f"base model: {base.name} ({sum(p.numel() for p in base.model.parameters()) / 1e6:.0f}M parameters, "
          f"fingerprint {base.fingerprint['id']}), loaded in {time.time() - t0:.0f} s")
    library = Library(work / "library")
    held: dict[str, list] = {}
    for name in tasks:
        task = make_task(name, n=160 + n_eval)
        task.examples, held[name] = task.examples[:-n_eval], task.examples[-n_eval:]
        out = work / "adapters" / name
        metrics = train_adapter(base, task, AdapterConfig(type="lora", r=8, alpha=16),
                                TrainConfig(steps=steps, batch_size=8, max_length=96, holdout=0.0), out,
                                data_hash=f"generated:{name}", progress=progress)
        library.add(name, out, base.fingerprint)
        print(f"trained {name}: loss {metrics['first_loss']:.2f} -> {metrics['train_loss']:.2f} "
              f"in {metrics['seconds']:.0f} s ({metrics['tokens_per_s']:.0f} tokens/s); added to the library")
    rows = []
    for name in tasks:
        examples = held[name]
        base_answers = generate(base.model, base.tokenizer, examples, max_new_tokens=16)
        with using_adapter(base, library.get(name).path) as model:
            tuned = generate(model, base.tokenizer, examples, max_new_tokens=16)
        rows.append({
            "task": name, "base_em": mean([exact_match(a, e.references) for a, e in zip(base_answers, examples)]),
            "adapter_em": mean([exact_match(a, e.references) for a, e in zip(tuned, examples)]),
            "input": examples[0].input, "expected": examples[0].output,
            "base_answer": base_answers[0], "adapter_answer": tuned[0],
        })
    print()
    print(f"Exact match on {n_eval} held-out prompts per task (library: {library.root})")
    print(table(["task", "base EM", "adapter EM", "input", "expected", "base says", "adapter says"],
                [[r["task"], r["base_em"], r["adapter_em"], r["input"], r["expected"],
                  r["base_answer"][:40], r["adapter_answer"][:40]] for r in rows]))
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    return rows
