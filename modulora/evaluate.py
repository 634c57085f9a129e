"""The evaluation harness: methods (a route over a library) scored on tasks, resumably.

    tasks = [prepare_task("data/llm-adapters/boolq/test.json", n=200)]
    methods = [Method("base"), Method("arrow", route="arrow", top_k=4)]
    results = evaluate(base, tasks, methods, "runs/eval", library="lib")
    print(results.markdown())

Every prediction is appended to `<out>/predictions.jsonl` as it is made, so an interrupted run
continues where it stopped; `results.json`, `results.md`, `accuracy.png` and (for routed methods)
`routing.png` are written at the end. Everything that can be checked (data, metrics, routes) is
checked before the model runs.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .data import DataError, Example, load_task, sample, split, user_text
from .metrics import METRICS, _CHOICE, fits, mean
from .report import table, write_text_atomic

MAX_NEW_TOKENS = {"number": 256, "letter": 256, "choice": 16, "em": 32, "rougeL": 32}


class EvalError(ValueError):
    """An evaluation cannot run as asked; the message says why (raised before any compute)."""


@dataclass
class EvalTask:
    name: str
    examples: list[Example]
    metrics: list[str]                # the first is the task's main metric
    max_new_tokens: int
    loglik: bool = False              # score multiple choice by log-likelihood of each option
    sources: list[str] | None = None  # per example, the task it comes from (mixed tasks); default: name

    def source(self, i: int) -> str:
        return self.sources[i] if self.sources else self.name


@dataclass
class Method:
    """One row of a results table: a route (see `modulora.routing.api`) over a library.

    The route `own` sends each example to the adapter named like the task it comes from (the
    oracle); `exclude_own` keeps a policy from picking that adapter (out-of-domain routing)."""
    name: str
    route: str = "base"
    library: str | None = None        # library folder; None: the one `evaluate` is given
    top_k: int = 1
    mode: str = "mixture"
    exclude_own: bool = False
    fallback: str | None = None       # retrieval / learned: abstain under the threshold to this policy
    arrow: dict | None = None         # Arrow's other settings (modulora.routing.arrow.SETTINGS)


def auto_metrics(fmt: str, references: list[str]) -> list[str]:
    """The metrics the papers use for a data format: LLM-Adapters answer extraction (a number, an
    option word, or an option letter), exact match and ROUGE-L for free-form answers."""
    if fmt in ("gsm8k",):
        return ["number"]
    if fmt in ("hellaswag",):
        return ["choice"]
    if fmt in ("flan-cot",):
        return ["letter"]
    if fmt == "llm-adapters":
        for metric in ("number", "choice", "letter"):
            if fits(metric, references):
                return [metric]
    return ["em", "rougeL"]


def prepare_task(path: str | os.PathLike, n: int | None = None, seed: int = 0, metric: str = "auto",
                 holdout: float | None = None, loglik: bool = False, max_new_tokens: int | None = None,
                 name: str | None = None, positive_examples: int = 0) -> EvalTask:
    """Read a data file and choose its examples and metric; a metric that does not fit the task's
    references, or log-likelihood scoring of a task without options, is refused here."""
    task = load_task(path, positive_examples=positive_examples)
    examples = task.examples
    if holdout:
        examples = split(examples, holdout if holdout < 1 else int(holdout), seed)[1]
    examples = sample(examples, n, seed)
    if not examples:
        raise DataError(f"{path}: no examples to evaluate")
    refs = [r for ex in examples for r in ex.references]
    if metric == "auto":
        metrics = auto_metrics(task.format, refs)
    else:
        metrics = [m.strip() for m in metric.split(",")]
        for m in metrics:
            if m not in METRICS:
                raise EvalError(f"unknown metric {m!r}; use one of {', '.join(METRICS)} or auto")
            if not fits(m, refs):
                bad = next(r for r in refs if not fits(m, [r]))
                raise EvalError(f"metric {m!r} does not fit task {task.name}: a reference answer is {bad!r}")
    if loglik and metrics[0] not in ("choice", "letter"):
        raise EvalError(f"log-likelihood scoring needs a multiple-choice task; {task.name} is scored by "
                        f"{metrics[0]!r}")
    return EvalTask(name=name or task.name, examples=examples, metrics=metrics, loglik=loglik,
                    max_new_tokens=max_new_tokens or MAX_NEW_TOKENS[metrics[0]])


def options_of(ex: Example, metric: str) -> list[str]:
    """The answer options a multiple-choice prompt offers (for log-likelihood scoring)."""
    text = user_text(ex)
    if metric == "letter":
        found = sorted(set(re.findall(r"\(([A-E])\)|\b([A-E]) \)", text)) - {("", "")})
        letters = sorted({a or b for a, b in found})
        return letters or list("ABCDE")
    found = sorted(set(_CHOICE.findall(text.lower())))
    if not found or found == ["true"] or found == ["false"]:
        return ["true", "false"]
    return found


def _continuation(option: str, metric: str) -> str:
    return f"The answer is ({option})." if metric == "letter" else f"the correct answer is {option}"


def check_methods(methods: list[Method], default_library: str | None,
                  tasks: list[EvalTask] | None = None) -> None:
    """Every route names adapters its library has, before any compute."""
    from .library import Library
    from .routing.api import POLICIES, parse_fixed

    names_seen = set()
    for m in methods:
        if m.name in names_seen:
            raise EvalError(f"two methods are called {m.name!r}")
        names_seen.add(m.name)
        if m.fallback is not None:
            from .routing.abstain import FALLBACKS

            if m.route not in ("retrieval", "learned") or m.fallback not in FALLBACKS:
                raise EvalError(f"method {m.name!r}: a fallback ({', '.join(FALLBACKS)}) is for the retrieval and "
                                f"learned routes; got fallback {m.fallback!r} with route {m.route!r}")
        if m.arrow is not None:
            from .routing.arrow import arrow_route
            from .routing.experts import RoutingError

            if m.route != "arrow" and m.fallback != "arrow":
                raise EvalError(f"method {m.name!r}: Arrow settings are for the arrow route or fallback; got "
                                f"{sorted(m.arrow)} with route {m.route!r}")
            try:
                arrow_route(m.top_k, m.arrow)  # the settings themselves, before any compute
            except RoutingError as e:
                raise EvalError(f"method {m.name!r}: Arrow settings: {e}") from None
        if m.route == "base":
            continue
        lib_path = m.library or default_library
        if lib_path is None:
            raise EvalError(f"method {m.name!r} routes {m.route!r} but no library was given")
        if not Path(lib_path).exists():
            raise EvalError(f"method {m.name!r}: library not found: {lib_path}")
        have = {r.name: r.type for r in Library(lib_path).list()}
        if m.route in POLICIES:
            lora = [n for n, t in have.items() if t == "lora"]
            if not lora:
                raise EvalError(f"method {m.name!r}: route {m.route!r} needs LoRA adapters; the library at "
                                f"{lib_path} has none")
            if m.route != "uniform" and not 1 <= m.top_k <= len(lora):
                raise EvalError(f"method {m.name!r}: top_k={m.top_k} but the library has {len(lora)} LoRA adapters")
            continue
        wanted = ({t.source(i) for t in tasks or [] for i in range(len(t.examples))} if m.route == "own"
                  else parse_fixed(m.route))
        for name in sorted(wanted):
            if name not in have:
                raise EvalError(f"method {m.name!r}: route names adapter {name!r}, which the library at "
                                f"{lib_path} does not have (it has: {', '.join(sorted(have)) or 'nothing'})")


@dataclass
class Results:
    tasks: list[str]
    methods: list[str]
    metrics: dict[str, list[str]]                       # task -> metrics
    scores: dict[str, dict[str, dict[str, float]]]      # method -> task -> metric -> mean
    routing: dict[str, dict[str, dict[str, float]]]     # method -> task -> expert -> mean weight
    n: dict[str, int]                                   # task -> examples
    predictions: list[dict]

    def main(self, method: str, task: str) -> float:
        return self.scores[method][task][self.metrics[task][0]]

    def average(self, method: str, tasks: list[str] | None = None) -> float:
        return mean([self.main(method, t) for t in (tasks or self.tasks)])

    def markdown(self, metric_index: int = 0) -> str:
        """Scores in %, each task by its main metric (or its `metric_index`-th), and the average:
        methods as rows and tasks as columns, or tasks as rows where they outnumber the methods
        (a long table reads better than a wide one)."""
        def pick(t):
            ms = self.metrics[t]
            return ms[min(metric_index, len(ms) - 1)]
        tasks = [f"{t} ({pick(t)})" for t in self.tasks]
        vals = {m: [100 * self.scores[m][t][pick(t)] for t in self.tasks] for m in self.methods}
        if len(self.tasks) <= len(self.methods):
            return table(["method"] + tasks + ["average"],
                         [[m] + [f"{v:.1f}" for v in vals[m]] + [f"{mean(vals[m]):.1f}"] for m in self.methods])
        rows = [[t] + [f"{vals[m][i]:.1f}" for m in self.methods] for i, t in enumerate(tasks)]
        return table(["task"] + self.methods, rows + [["average"] + [f"{mean(vals[m]):.1f}" for m in self.methods]])


def _key(method: str, task: str, ex_id: str) -> str:
    return f"{method}\x1f{task}\x1f{ex_id}"


def _load_done(path: Path) -> dict[str, dict]:
    done = {}
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interruption: that prediction is made again
                done[_key(rec["method"], rec["task"], rec["id"])] = rec
    return done


def evaluate(base, tasks: list[EvalTask], methods: list[Method], out_dir: str | os.PathLike,
             library: str | None = None, batch_size: int = 16, progress: bool = True,
             plots: bool = True, ray=None) -> Results:
    """Score every method on every task; resumes from `<out_dir>/predictions.jsonl`.

    The base's precision (`load_base(dtype=...)`: on a CPU with native bf16, "auto" is bf16
    autocast, about 1.5x the decode rate of fp32; "fp32" gives the exact logits) is part of a
    method's settings.

    ray: a `modulora.cluster.RayOptions`: each chunk (method x task x batch of examples, the
    chunks a local run makes) is a Ray task that loads `base`'s name in its precision and reads the
    library read-only (at the same path on every node); the driver alone writes the results."""
    from .library import Library
    from .routing.api import Router

    if not tasks:
        raise EvalError("no tasks to evaluate")
    if not methods:
        raise EvalError("no methods to evaluate")
    if len({t.name for t in tasks}) != len(tasks):
        raise EvalError("two tasks have the same name; give them distinct names")
    check_methods(methods, library, tasks)
    if ray is not None:
        from .cluster import check

        check(ray)  # no ray installed, a cluster not there: said before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, tasks, methods, library, base.compute.describe())
    pred_path = out / "predictions.jsonl"
    done = _load_done(pred_path)
    routers: dict[str, Router] = {}

    def router_for(m: Method) -> Router:
        lib = m.library or library or ""
        if lib not in routers:
            routers[lib] = Router(base, Library(lib) if lib else _EmptyLibrary())
        return routers[lib]

    chunks = []  # (method, task, example rows) still to score
    for m in methods:
        for t in tasks:
            pending = [i for i, ex in enumerate(t.examples) if _key(m.name, t.name, ex.id) not in done]
            step = max(1, batch_size // 4) if t.loglik else batch_size
            chunks += [(m, t, pending[s:s + step]) for s in range(0, len(pending), step)]
    bar = tqdm(total=sum(len(rows) for _, _, rows in chunks), desc="eval" + (" (ray)" if ray else ""), unit="ex",
               disable=not progress, dynamic_ncols=True, initial=0, mininterval=0.5)
    with open(pred_path, "a", encoding="utf-8") as sink:
        def save(recs: list[dict]) -> None:  # the only writer of predictions.jsonl, also with ray
            for rec in recs:
                done[_key(rec["method"], rec["task"], rec["id"])] = rec
                sink.write(json.dumps(rec) + "\n")
            sink.flush()
            os.fsync(sink.fileno())

        if ray is None:
            for m, t, rows in chunks:
                bar.set_postfix(method=m.name, task=t.name[:24])
                save(_run_chunk(router_for(m), m, t, rows, batch_size))
                bar.update(len(rows))
        else:
            from .cluster import eval_unit, precision_of, run_units, worker_base

            spec = worker_base(base, "auto", precision_of(base.compute), ray)
            lib_of = {m.name: str(Path(m.library or library).resolve()) if (m.library or library) else ""
                      for m in methods}  # workers start elsewhere: absolute paths
            units = [(i, (spec, lib_of[m.name], m, t, rows, batch_size), len(rows))
                     for i, (m, t, rows) in enumerate(chunks)]
            failed = run_units(ray, eval_unit, units, lambda _, recs: save(recs), bar)
            if failed:
                bar.close()
                raise EvalError(f"{len(failed)} of {len(units)} unit(s) failed on the Ray cluster (a rerun scores "
                                "only those): " + "; ".join(f"{chunks[i][0].name} x {chunks[i][1].name}: {why}"
                                                           for i, why in failed.items()))
    bar.close()
    results = _collect(tasks, methods, done)
    write_results(results, out, plots=plots, config={"methods": [asdict(m) for m in methods],
                                                      "library": library, "batch_size": batch_size,
                                                      "dtype": base.compute.describe()})
    return results


def _check_settings(out: Path, tasks: list[EvalTask], methods: list[Method], library: str | None,
                    dtype: str) -> None:
    """A results folder resumes only the same settings: a method or task of the same name that was
    run differently there is refused (new methods and tasks are welcome)."""
    path = out / "settings.json"
    new = {"methods": {m.name: {**asdict(m), "library": str(m.library or library or ""), "dtype": dtype}
                       for m in methods},
           "tasks": {t.name: {"metrics": t.metrics, "max_new_tokens": t.max_new_tokens, "loglik": t.loglik,
                              "ids": [ex.id for ex in t.examples]} for t in tasks}}
    old = json.loads(path.read_text()) if path.exists() else {"methods": {}, "tasks": {}}
    added = {f.name: f.default for f in fields(Method)}  # a folder from before a field existed ran its default
    for kind in ("methods", "tasks"):
        for name, settings in new[kind].items():
            was = {**added, **old[kind][name]} if kind == "methods" and name in old[kind] else old[kind].get(name)
            if name in old[kind] and was != json.loads(json.dumps(settings)):
                raise EvalError(f"{out} holds results of {kind[:-1]} {name!r} run with other settings; "
                                "use another output folder, or remove that one")
            old[kind][name] = settings
    write_text_atomic(path, json.dumps(old, indent=1))


class _EmptyLibrary:
    """Stands in for a library where every method is `base`."""

    root = Path(".")

    def list(self):
        return []

    def latest_object_ids(self):
        return {}


def _run_chunk(router, m: Method, t: EvalTask, rows: list[int], batch_size: int) -> list[dict]:
    chunk = [t.examples[i] for i in rows]
    prompts = [user_text(ex) for ex in chunk]
    routes = [t.source(i) if m.route == "own" else m.route for i in rows]
    exclude = [[t.source(i)] for i in rows] if m.exclude_own else None
    metric = t.metrics[0]
    if t.loglik:
        from .routing.score import continuation_logprobs

        options = [options_of(ex, metric) for ex in chunk]
        conts = [[_continuation(o, metric) for o in opts] for opts in options]
        lps = continuation_logprobs(router, prompts, conts, routes, top_k=m.top_k, mode=m.mode,
                                    batch_size=batch_size, exclude=exclude, fallback=m.fallback, arrow=m.arrow)
        texts = [_continuation(opts[max(range(len(lp)), key=lp.__getitem__)], metric)
                 for opts, lp in zip(options, lps)]
        answers = [None] * len(chunk)
        if m.route != "base":  # which experts the route picks, for the heatmap (one cheap pass)
            answers = router.answer(prompts, routes, top_k=m.top_k, mode=m.mode, max_new_tokens=0,
                                    batch_size=batch_size, exclude=exclude, fallback=m.fallback, arrow=m.arrow)
    else:
        answers = router.answer(prompts, routes, top_k=m.top_k, mode=m.mode, max_new_tokens=t.max_new_tokens,
                                batch_size=batch_size, exclude=exclude, fallback=m.fallback, arrow=m.arrow)
        texts = [a.text.strip() for a in answers]
    recs = []
    for i, ex, text, a in zip(rows, chunk, texts, answers):
        rec = {"method": m.name, "task": t.name, "source": t.source(i), "id": ex.id, "prediction": text,
               "references": ex.references[:5], "scores": {k: METRICS[k](text, ex.references) for k in t.metrics},
               "experts": {k: round(float(v), 4) for k, v in (a.experts if a else {}).items()}}
        if a is not None and a.abstention is not None:
            rec["abstention"] = a.abstention.as_dict()
        recs.append(rec)
    return recs


def _collect(tasks: list[EvalTask], methods: list[Method], done: dict[str, dict]) -> Results:
    scores, routing, preds = {}, {}, []
    for m in methods:
        scores[m.name], routing[m.name] = {}, {}
        for t in tasks:
            recs = [done[_key(m.name, t.name, ex.id)] for ex in t.examples]
            preds.extend(recs)
            scores[m.name][t.name] = {k: mean([r["scores"][k] for r in recs]) for k in t.metrics}
            weights: dict[str, float] = {}
            for r in recs:
                for e, w in r["experts"].items():
                    weights[e] = weights.get(e, 0.0) + w / len(recs)
            routing[m.name][t.name] = weights
    return Results(tasks=[t.name for t in tasks], methods=[m.name for m in methods],
                   metrics={t.name: t.metrics for t in tasks}, scores=scores, routing=routing,
                   n={t.name: len(t.examples) for t in tasks}, predictions=preds)


def write_results(results: Results, out: Path, plots: bool = True, config: dict | None = None) -> None:
    """results.json (every prediction), results.md, and the plots, written atomically."""
    data = {"config": config or {}, "tasks": results.tasks, "methods": results.methods, "metrics": results.metrics,
            "n": results.n, "scores": results.scores,
            "average": {m: results.average(m) for m in results.methods},
            "routing": results.routing, "predictions": results.predictions}
    write_text_atomic(out / "results.json", json.dumps(data, indent=1))
    md = ["# Evaluation results", "", "Scores in %, each task by its main metric; n per task: " +
          ", ".join(f"{t} {n}" for t, n in results.n.items()), "", results.markdown()]
    if any(len(ms) > 1 for ms in results.metrics.values()):
        md += ["", "Second metric (ROUGE-L where the first is exact match):", "", results.markdown(1)]
    write_text_atomic(out / "results.md", "\n".join(md) + "\n")
    if plots:
        plot_scores(results, out / "accuracy.png")
        if any(results.routing[m][t] for m in results.methods for t in results.tasks):
            plot_routing(results, out / "routing.png")


def load_results(path: str | os.PathLike) -> Results:
    """The Results in a `results.json` that `write_results` wrote (a report can be rebuilt from it)."""
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
        return Results(tasks=d["tasks"], methods=d["methods"], metrics=d["metrics"], scores=d["scores"],
                       routing=d["routing"], n=d["n"], predictions=d["predictions"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EvalError(f"{p} is not a results.json written by modulora eval: {e}") from None


def plot_scores(results: Results, path: Path, title: str = "Score by method (main metric, %)") -> Path:
    """Grouped bars (one group per task plus the average, one bar per method), or where the tasks
    outnumber the methods a task-by-method heatmap with the scores written in (as in `markdown`)."""
    from matplotlib.figure import Figure

    groups = results.tasks + ["average"]
    vals = {m: [100 * results.main(m, t) for t in results.tasks] + [100 * results.average(m)]
            for m in results.methods}
    n_m = len(results.methods)
    if len(results.tasks) > n_m:
        fig = Figure(figsize=(1.1 * n_m + 4.0, 0.35 * len(groups) + 2.0))
        ax = fig.add_subplot(1, 1, 1)
        grid = np.array([[vals[m][i] for m in results.methods] for i in range(len(groups))])
        im = ax.imshow(grid, cmap="viridis", aspect="auto", interpolation="nearest")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, f"{v:.1f}" if i == len(groups) - 1 else f"{v:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if v < grid.max() / 2 else "black")
        ax.set_xticks(range(n_m))
        ax.set_xticklabels([m[:28] for m in results.methods], rotation=40, ha="right", fontsize=7)
        ax.set_yticks(range(len(groups)))
        ax.set_yticklabels([g[:40] for g in groups], fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.04, label="%")
    else:
        fig = Figure(figsize=(max(6.0, 0.5 * len(groups) * max(n_m, 2) * 0.45 + 3), 4.5))
        ax = fig.add_subplot(1, 1, 1)
        width = 0.8 / max(n_m, 1)
        for j, m in enumerate(results.methods):
            ax.bar([i + j * width for i in range(len(groups))], vals[m], width, label=m)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
        ax.set_xticklabels([g[:28] for g in groups], rotation=40, ha="right", fontsize=7)
        ax.set_ylabel("%")
        ax.legend(fontsize=7, ncol=2)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_routing(results: Results, path: Path) -> Path:
    """Heatmaps, one per routed method: task by expert (the experts that method gave weight), the
    mean routing weight."""
    from matplotlib.figure import Figure

    routed = [m for m in results.methods if any(results.routing[m][t] for t in results.tasks)]
    experts = {m: sorted({e for t in results.tasks for e in results.routing[m][t]}) for m in routed}
    cols = min(3, len(routed))
    rows = (len(routed) + cols - 1) // cols
    cell_w = max(4.0, 0.3 * max(len(v) for v in experts.values()) + 2.5)
    fig = Figure(figsize=(cell_w * cols, (0.3 * len(results.tasks) + 2.2) * rows))
    for k, m in enumerate(routed):
        ax = fig.add_subplot(rows, cols, k + 1)
        grid = [[results.routing[m][t].get(e, 0.0) for e in experts[m]] for t in results.tasks]
        im = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        ax.set_title(m, fontsize=9)
        ax.set_xticks(range(len(experts[m])))
        ax.set_xticklabels([e[:20] for e in experts[m]], rotation=60, ha="right", fontsize=6)
        ax.set_yticks(range(len(results.tasks)))
        ax.set_yticklabels([t[:28] for t in results.tasks], fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.suptitle("Mean routing weight (task by expert)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def task_files(path: str | os.PathLike) -> list[tuple[str, Path]]:
    """(task name, file) for a data file, a folder of task files, or a folder of LLM-Adapters sets
    (`<set>/test.json`, named by the set)."""
    from .build import BuildError, find_task_files

    p = Path(path)
    if p.is_file():
        return [(load_task_name(p), p)]
    if not p.is_dir():
        raise DataError(f"data not found: {p}")
    sets = sorted(d for d in p.iterdir() if (d / "test.json").is_file())
    if sets:
        return [(d.name, d / "test.json") for d in sets]
    try:
        return find_task_files(p)
    except BuildError as e:
        raise DataError(str(e)) from None


def load_task_name(path: Path) -> str:
    """A task's name from its file: the LLM-Adapters set for `<set>/test.json`, else the file name."""
    name = path.name.split(".")[0]
    return path.parent.name if name in ("train", "test") else name


def mixed_task(tasks: list[EvalTask], name: str = "mixed", seed: int = 0) -> EvalTask:
    """One task whose examples come from several (shuffled, so that batches mix them); each keeps
    its source task, and ids become `<task>/<id>`. The tasks must share their metrics."""
    if not tasks:
        raise EvalError("no tasks to mix")
    if len({tuple(t.metrics) for t in tasks}) != 1 or len({t.loglik for t in tasks}) != 1:
        raise EvalError("tasks mixed into one must share their metrics and scoring")
    rows = [(t.name, Example(ex.instruction, ex.input, ex.output, ex.references, f"{t.name}/{ex.id}"))
            for t in tasks for ex in t.examples]
    random.Random(seed).shuffle(rows)
    return EvalTask(name=name, examples=[ex for _, ex in rows], metrics=list(tasks[0].metrics),
                    max_new_tokens=max(t.max_new_tokens for t in tasks), loglik=tasks[0].loglik,
                    sources=[s for s, _ in rows])


def by_source(results: Results, method: str, task: str, metric: str | None = None) -> dict[str, float]:
    """A mixed task's score per source task (the main metric unless `metric`)."""
    metric = metric or results.metrics[task][0]
    per: dict[str, list[float]] = {}
    for r in results.predictions:
        if r["method"] == method and r["task"] == task:
            per.setdefault(r["source"], []).append(r["scores"][metric])
    return {s: mean(v) for s, v in sorted(per.items())}


def paired_difference(results: Results, a: str, b: str, n_boot: int = 2000, seed: int = 0,
                      ) -> tuple[float, float, float]:
    """Method a minus method b on the task-averaged main metric, in points, with a 95% paired bootstrap
    interval (examples resampled within each task, the same draw for both methods): tells a real gap
    from a few examples' worth of noise on these small test sets."""
    per: dict[str, dict[str, dict[str, float]]] = {a: {}, b: {}}
    for r in results.predictions:
        if r["method"] in per:
            per[r["method"]].setdefault(r["task"], {})[r["id"]] = r["scores"][results.metrics[r["task"]][0]]
    rng = np.random.default_rng(seed)
    diff, boot = 0.0, np.zeros(n_boot)
    for t in results.tasks:
        ids = sorted(per[a].get(t, {}))
        if not ids or set(ids) != set(per[b].get(t, {})):
            raise EvalError(f"methods {a!r} and {b!r} were not scored on the same examples of task {t!r}")
        d = np.array([per[a][t][i] - per[b][t][i] for i in ids])
        diff += d.mean()
        boot += d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    k = 100 / len(results.tasks)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return k * diff, k * float(lo), k * float(hi)


def right_expert_rate(results: Results, method: str, task: str) -> float:
    """How often the expert with the largest weight is the one named like the example's source task."""
    recs = [r for r in results.predictions if r["method"] == method and r["task"] == task]
    hits = [bool(r["experts"]) and max(r["experts"], key=r["experts"].get) == r["source"] for r in recs]
    return mean([float(h) for h in hits])


def own_expert_weight(results: Results, method: str, task: str) -> float:
    """The mean weight a route gives the expert named like each example's source task."""
    return mean([r["experts"].get(r["source"], 0.0) for r in results.predictions
                 if r["method"] == method and r["task"] == task])
