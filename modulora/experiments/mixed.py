"""Experiment 3, mixed requests (LoraRetriever protocol, Zhao et al. 2024).

Requests from the library's own tasks, shuffled so every batch mixes tasks, each routed on its own:
how often retrieval ranks the request's own expert first, and the routed score against the oracle
(each request served by its own expert). In-domain, and out-of-domain with the own expert excluded.
"""

from __future__ import annotations

from ..evaluate import Method, by_source, evaluate, mixed_task, prepare_task, right_expert_rate
from .common import HOLDOUT, Context, met, publish, sni_library, sni_task_names, write_report


def run(ctx: Context, progress: bool = True) -> dict:
    s = ctx.settings
    names, _ = sni_task_names(ctx)
    tasks = [prepare_task(ctx.sni(n), n=s.n_mixed, holdout=HOLDOUT, metric="em,rougeL", name=n) for n in names]
    mixed = mixed_task(tasks, "mixed", seed=0)
    lib, _ = sni_library(ctx, progress)
    k = min(3, len(names))
    methods = [
        Method("base"),
        Method("oracle (own expert)", "own", str(lib)),
        Method("retrieval top-1", "retrieval", str(lib), top_k=1),
        Method(f"retrieval top-{k} mixture", "retrieval", str(lib), top_k=k),
        Method("Arrow top-1", "arrow", str(lib), top_k=1),
        Method("uniform mixture", "uniform", str(lib)),
        Method("OOD retrieval top-1", "retrieval", str(lib), top_k=1, exclude_own=True),
        Method(f"OOD retrieval top-{k} mixture", "retrieval", str(lib), top_k=k, exclude_own=True),
    ]
    res = evaluate(ctx.base, [mixed], methods, ctx.work / "eval-mixed", batch_size=16, progress=progress)
    publish(ctx, ctx.work / "eval-mixed", {"results.json": "results.json", "routing.png": "routing.png"})
    oracle = 100 * res.main(methods[1].name, "mixed")
    rows, per_task = [], {}
    for m in methods:
        score = 100 * res.main(m.name, "mixed")
        rouge = 100 * res.scores[m.name]["mixed"]["rougeL"]
        first = right_expert_rate(res, m.name, "mixed") if m.route in ("retrieval", "arrow") and not m.exclude_own else None
        rows.append(f"| {m.name} | {score:.1f} | {rouge:.1f} | {100 * score / oracle if oracle else 0:.0f}% | "
                    f"{'' if first is None else f'{100 * first:.1f}%'} |")
        per_task[m.name] = by_source(res, m.name, "mixed")
    first = 100 * right_expert_rate(res, "retrieval top-1", "mixed")
    best = max((m.name for m in methods[2:6]), key=lambda n: res.main(n, "mixed"))
    ratio = 100 * res.main(best, "mixed") / res.main(methods[1].name, "mixed") if oracle else 0.0
    _plot_per_task(per_task, [m.name for m in methods], ctx.results / "per-task.png")
    header = "| task | " + " | ".join(m.name for m in methods) + " |"
    table = [header, "|" + "---|" * (len(methods) + 1)] + [
        f"| {t} | " + " | ".join(f"{100 * per_task[m.name][t]:.0f}" for m in methods) + " |" for t in names]
    body = [
        f"Library: the {len(names)} private SNI experts of experiment 2. Requests: {s.n_mixed} held-out examples "
        f"of each library task ({len(mixed.examples)} in all), shuffled into batches of 16 that mix tasks; "
        "greedy, 32 new tokens at most. OOD rows exclude each request's own expert from retrieval.",
        "", "| method | exact match % | ROUGE-L % | of oracle (EM) | own expert first |", "|---|---|---|---|---|",
        *rows, "",
        f"Targets: own expert first for at least 90% of in-domain requests: {first:.1f}% -> {met(first >= 90)}; "
        f"routed score at least 95% of the oracle: best routed ({best}) {ratio:.0f}% -> {met(ratio >= 95)}.", "",
        "## Exact match % per task", "", *table, "", "![per task](per-task.png)", "", "![routing](routing.png)",
    ]
    write_report(ctx, "Experiment 3: mixed requests, retrieval routing in and out of domain", body)
    return {"first": first, "ratio": ratio, "oracle": oracle}


def _plot_per_task(per_task: dict[str, dict[str, float]], methods: list[str], path) -> None:
    from matplotlib.figure import Figure

    tasks = sorted(next(iter(per_task.values())))
    fig = Figure(figsize=(max(7.0, 0.6 * len(tasks) + 3), 4.5))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        ax.bar([i + j * width for i in range(len(tasks))], [100 * per_task[m][t] for t in tasks], width, label=m)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))])
    ax.set_xticklabels([t.split("_", 1)[1][:26] if "_" in t else t for t in tasks], rotation=45, ha="right",
                       fontsize=7)
    ax.set_ylabel("exact match %")
    ax.set_title("Mixed requests: exact match per task")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
