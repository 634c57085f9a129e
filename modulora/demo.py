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
             n_eval: int = 20, workdir: str | Path | None = None, progress: bool = True, device: str = "auto",
             dtype: str = "auto") -> list[dict]:
    """Train, store and compare; returns one row per task (also printed)."""
    t0 = time.time()
    work = Path(workdir) if workdir else home() / "demo"
    if (work / "library").exists():
        shutil.rmtree(work / "library")
    base = load_base(base_name, device=device, dtype=dtype)
    print(f"base model: {base.name} ({sum(p.numel() for p in base.model.parameters()) / 1e6:.0f}M parameters, "
          f"fingerprint {base.fingerprint['id']}) on {base.compute.describe()}, loaded in {time.time() - t0:.0f} s")
    library = Library(work / "library")
    held: dict[str, list] = {}
    for name in tasks:
        task = make_task(name, n=160 + n_eval)
        task.examples, held[name] = task.examples[:-n_eval], task.examples[-n_eval:]
        out = work / "adapters" / name
        metrics = train_adapter(base, task, AdapterConfig(type="lora", r=8, alpha=16),
                                TrainConfig(steps=steps, batch_size=8, max_length=96, holdout=0.0, dtype=dtype), out,
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
    print()
    routed = route_mixed(base, library, held, per_task=max(1, min(5, n_eval)))
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    return rows + routed


def route_mixed(base, library: Library, held: dict[str, list], per_task: int = 5) -> list[dict]:
    """Mixed prompts from every task in one batch, routed by Arrow and by retrieval: which expert
    did each go to, and was it the right one?"""
    import random

    from .routing.api import Router, top_expert
    from .data import user_text

    mixed = [(name, ex) for name, examples in held.items() for ex in examples[:per_task]]
    random.Random(0).shuffle(mixed)
    prompts = [user_text(ex) for _, ex in mixed]
    router = Router(base, library)
    t = time.time()
    arrow = router.answer(prompts, ["arrow"] * len(prompts), top_k=1, max_new_tokens=16)
    t_arrow = time.time() - t
    t = time.time()
    retrieval = router.answer(prompts, ["retrieval"] * len(prompts), top_k=1, max_new_tokens=16)
    t_retrieval = time.time() - t
    rows = []
    for (task, ex), a, r in zip(mixed, arrow, retrieval):
        rows.append({"task": task, "input": ex.input, "arrow": top_expert(a), "retrieval": top_expert(r),
                     "arrow_em": exact_match(a.text.strip(), ex.references),
                     "retrieval_em": exact_match(r.text.strip(), ex.references), "answer": r.text.strip()})
    print(f"Routing {len(rows)} mixed prompts in one batch (Arrow: top-1 per token, expert with the largest mean "
          f"weight shown; retrieval: top-1 by MiniLM similarity to each adapter's sample inputs)")
    print(table(["prompt", "task", "Arrow picked", "retrieval picked", "answer (retrieval)"],
                [[r["input"][:32], r["task"], _mark(r["arrow"], r["task"]), _mark(r["retrieval"], r["task"]),
                  r["answer"][:32]] for r in rows]))
    n = len(rows)
    print(f"right expert: Arrow {sum(r['arrow'] == r['task'] for r in rows)}/{n}, "
          f"retrieval {sum(r['retrieval'] == r['task'] for r in rows)}/{n}; "
          f"exact match of the routed answers: Arrow {mean([r['arrow_em'] for r in rows]):.2f}, "
          f"retrieval {mean([r['retrieval_em'] for r in rows]):.2f} "
          f"({t_arrow:.0f} s and {t_retrieval:.0f} s for the batch)")
    return rows


def _mark(picked: str | None, truth: str) -> str:
    return f"{picked} {'ok' if picked == truth else 'WRONG'}"
