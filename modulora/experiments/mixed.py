"""Experiment 3, mixed requests (LoraRetriever protocol, Zhao et al. 2024).

Requests from the library's own tasks, shuffled so every batch mixes tasks, each routed on its own:
how often retrieval ranks the request's own expert first, and the routed score against the oracle
(each request served by its own expert). In-domain, and out-of-domain with the own expert excluded.
Retrieval and the learned router also run with their calibrated abstention (fallback: the uniform
mixture), fitted on the library's card samples only.
"""

from __future__ import annotations

from ..evaluate import Method, by_source, evaluate, mixed_task, prepare_task, right_expert_rate
from .common import HOLDOUT, Context, gap, met, publish, sni_library, sni_task_names, write_report

FALLBACK = "uniform"


def run(ctx: Context, progress: bool = True) -> dict:
    s = ctx.settings
    names, _ = sni_task_names(ctx)
    tasks = [prepare_task(ctx.sni(n), n=s.n_mixed, holdout=HOLDOUT, metric="em,rougeL", name=n) for n in names]
    mixed = mixed_task(tasks, "mixed", seed=0)
    lib, _ = sni_library(ctx, progress)
    fitted = _calibrate(lib)
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
        *_abstaining(str(lib)),
    ]
    res = evaluate(ctx.eval_base, [mixed], methods, ctx.work / "eval-mixed", batch_size=16, progress=progress,
                   ray=ctx.ray)
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
    _plot_per_task(per_task, [m.name for m in methods[:8]], ctx.results / "per-task.png")
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
        *_abstention_section(res, fitted), "",
        "## Exact match % per task", "", *table, "", "![per task](per-task.png)", "", "![routing](routing.png)",
    ]
    write_report(ctx, "Experiment 3: mixed requests, retrieval routing in and out of domain", body)
    return {"first": first, "ratio": ratio, "oracle": oracle}


def _calibrate(lib) -> dict:
    """Fit both routers' thresholds on the library (retrieval: card samples; learned: trained on
    them); {policy: Abstention}."""
    from ..library import Library
    from ..routing.learned import train_router
    from ..routing.retrieval import RetrievalRouter

    library = Library(lib)
    router = train_router(library)
    router.save(library)
    return {"retrieval": RetrievalRouter(library).calibrate(), "learned": router.abstention()}


def _abstaining(lib: str) -> list[Method]:
    """Retrieval and learned top-1, in and out of domain, without and with abstention."""
    out = [Method("learned top-1", "learned", lib), Method("OOD learned top-1", "learned", lib, exclude_own=True)]
    for policy in ("retrieval", "learned"):
        for ood in (False, True):
            out.append(Method(f"{'OOD ' if ood else ''}{policy} top-1, abstain -> {FALLBACK}", policy, lib,
                              exclude_own=ood, fallback=FALLBACK))
    return out


def _abstention_section(res, fitted: dict) -> list[str]:
    """The abstention table, rates, and the targets: in-domain within 1 point of routing without
    abstention; out of domain at least the better of the uniform mixture and plain routing."""
    rows, verdicts = [], []
    uniform = 100 * res.main("uniform mixture", "mixed")
    for policy in ("retrieval", "learned"):
        a = fitted[policy]
        plain, plain_ood = f"{policy} top-1", f"OOD {policy} top-1"
        abst, abst_ood = f"{plain}, abstain -> {FALLBACK}", f"{plain_ood}, abstain -> {FALLBACK}"
        score = {m: 100 * res.main(m, "mixed") for m in (plain, plain_ood, abst, abst_ood)}
        rate = {m: _abstained(res, m) for m in (abst, abst_ood)}
        rows.append(f"| {policy} | {a.threshold:.3f} ({a.score}) | {score[plain]:.1f} | {score[abst]:.1f} "
                    f"({100 * rate[abst]:.0f}% abstained) | {score[plain_ood]:.1f} | {score[abst_ood]:.1f} "
                    f"({100 * rate[abst_ood]:.0f}% abstained) |")
        ok_in = score[abst] >= score[plain] - 1
        ok_out = score[abst_ood] >= max(uniform, score[plain_ood])
        verdicts += [f"- {policy}: in-domain {score[abst]:.1f} vs {score[plain]:.1f} without abstention "
                     f"(within 1 point: {met(ok_in)}); out of domain {score[abst_ood]:.1f} vs the better of the uniform "
                     f"mixture {uniform:.1f} and plain {policy} {score[plain_ood]:.1f} ({met(ok_out)}).",
                     f"  - {gap(res, abst, plain)}", f"  - {gap(res, abst_ood, plain_ood)}",
                     f"  - {gap(res, abst_ood, 'uniform mixture')}"]
    return ["## Abstention: knowing when no expert fits", "",
            f"Each router's threshold is fitted on the library's card samples only (no test data; see "
            f"`modulora/routing/abstain.py`): at most {100 * fitted['retrieval'].max_in_domain:.0f}% of in-domain "
            f"calibration requests may abstain. A request whose best score is under it is answered by the "
            f"{FALLBACK} mixture instead.", "",
            "| router | threshold | in-domain | in-domain, abstaining | out of domain | out of domain, abstaining |",
            "|---|---|---|---|---|---|", *rows, "",
            "Calibration (the fit's own estimate): " + "; ".join(
                f"{p}: {100 * fitted[p].in_domain_abstain:.1f}% of in-domain and "
                f"{100 * fitted[p].out_of_domain_abstain:.1f}% of out-of-domain calibration requests abstain"
                for p in ("retrieval", "learned")), "", "Targets (exact match %):", "", *verdicts]


def _abstained(res, method: str) -> float:
    recs = [r for r in res.predictions if r["method"] == method and r["task"] == "mixed"]
    return sum(bool((r.get("abstention") or {}).get("abstained")) for r in recs) / max(1, len(recs))


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
