"""Experiment 4, continual learning (L2R protocol, Ostapenko et al. / "Learning to Route").

Tasks arrive one at a time. After each: its adapter is trained in isolation (the experts of the
SNI library are reused), added to a growing library, and the learned router is retrained on a
memory of at most 50 examples per seen task. Scored on every task seen so far, against Arrow,
retrieval and the oracle (each request served by its own expert).
"""

from __future__ import annotations

from ..evaluate import Method, by_source, evaluate, mixed_task, prepare_task, right_expert_rate
from ..metrics import mean
from .common import HOLDOUT, Context, add, met, sni_library, sni_task_names, write_report

MEMORY = 50


def run(ctx: Context, progress: bool = True) -> dict:
    from ..library import Library
    from ..routing.learned import train_router

    s = ctx.settings
    names, _ = sni_task_names(ctx)
    order = names[: s.continual_tasks]
    tasks = {n: prepare_task(ctx.sni(n), n=s.n_mixed, holdout=HOLDOUT, metric="em,rougeL", name=n) for n in order}
    _, build = sni_library(ctx, progress)
    lib = ctx.work / "lib-continual"
    method_names = ["learned (L2R)", "Arrow top-1", "retrieval top-1", "oracle"]
    scores: dict[str, list[dict[str, float]]] = {m: [] for m in method_names}  # per step: task -> score
    first: dict[str, list[float]] = {m: [] for m in method_names[:3]}  # per step: right expert first
    for step, name in enumerate(order, 1):
        add(ctx, lib, name, build / "adapters" / name)
        router = train_router(Library(lib), memory_per_task=MEMORY, seed=0)
        router.save(Library(lib))
        seen = mixed_task([tasks[n] for n in order[:step]], f"seen-{step}", seed=0)
        methods = [Method(method_names[0], "learned", str(lib)), Method(method_names[1], "arrow", str(lib)),
                   Method(method_names[2], "retrieval", str(lib)), Method(method_names[3], "own", str(lib))]
        res = evaluate(ctx.eval_base, [seen], methods, ctx.work / "eval-continual" / f"step-{step}", batch_size=16,
                       progress=progress, plots=False, ray=ctx.ray)
        for m in method_names:
            scores[m].append(by_source(res, m, seen.name))
        for m in first:
            first[m].append(100 * right_expert_rate(res, m, seen.name))
    sizes = {n: len(tasks[n].examples) for n in order}
    final = {m: 100 * mean(list(scores[m][-1].values())) for m in method_names}
    forgetting = {m: round(100 * mean([max(st[n] for st in scores[m][i:-1]) - scores[m][-1][n]
                                 for i, n in enumerate(order[:-1])]), 1) + 0.0 if len(order) > 1 else 0.0
                  for m in method_names}  # + 0.0 turns a rounded -0.0 into 0.0
    curve = {m: [100 * mean(list(st.values())) for st in scores[m]] for m in method_names}
    _plot(curve, ctx.results / "average-by-step.png")
    oracle = final["oracle"]
    ratio = 100 * final["learned (L2R)"] / oracle if oracle else 0.0
    rows = [f"| {m} | " + " | ".join(f"{v:.1f}" for v in curve[m]) + f" | {forgetting[m]:.1f} |" for m in method_names]
    body = [
        f"Task order: {', '.join(order)}. Each step adds that task's expert (trained in isolation, {s.steps} steps) "
        f"and retrains the learned router on at most {MEMORY} examples per seen task (the samples stored on "
        f"each adapter's card). Scores: exact match % on up to {s.n_mixed} held-out examples per seen task "
        f"({', '.join(str(v) for v in sizes.values())}), requests of all seen tasks mixed in each batch, greedy.", "",
        "## Average over seen tasks after each step", "",
        "| method | " + " | ".join(f"step {i}" for i in range(1, len(order) + 1)) + " | forgetting (points) |",
        "|---" * (len(order) + 2) + "|", *rows, "",
        "Forgetting: per task, its best score at an earlier step minus its final score, averaged over all "
        "but the last task.", "",
        "## Right expert first (% of requests, by step)", "",
        "| router | " + " | ".join(f"step {i}" for i in range(1, len(order) + 1)) + " |",
        "|---" * (len(order) + 1) + "|",
        *[f"| {m} | " + " | ".join(f"{v:.1f}" for v in first[m]) + " |" for m in first], "",
        f"Targets: final average of the learned router at least 90% of the oracle: {final['learned (L2R)']:.1f} vs "
        f"{oracle:.1f} = {ratio:.0f}% -> {met(ratio >= 90)}; forgetting at most 2 points: "
        f"{forgetting['learned (L2R)']:.1f} -> {met(forgetting['learned (L2R)'] <= 2)}.", "",
        "## Final per task (exact match %)", "",
        "| task | " + " | ".join(method_names) + " |", "|---" * (len(method_names) + 1) + "|",
        *[f"| {n} | " + " | ".join(f"{100 * scores[m][-1][n]:.1f}" for m in method_names) + " |" for n in order],
        "", "![average by step](average-by-step.png)",
    ]
    write_report(ctx, "Experiment 4: continual learning with a learned router", body)
    return {"final": final, "forgetting": forgetting, "ratio": ratio, "right_first": first}


def _plot(curve: dict[str, list[float]], path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    for m, vals in curve.items():
        ax.plot(range(1, len(vals) + 1), vals, marker="o", label=m)
    ax.set_xlabel("tasks seen")
    ax.set_ylabel("average exact match % over seen tasks")
    ax.set_title("Continual learning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
