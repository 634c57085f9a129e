"""Before and after the engine, side by side: bench/routing.py and bench/serve.py run against the
code before the engine (a tree extracted from commit 74ff831) and against this tree, alternately in
one run, each as its own subprocess with its own PYTHONPATH; writes bench/results/before_after.md.

    mkdir -p /tmp/bench/before && git archive 74ff831 | tar -x -C /tmp/bench/before
    python bench/before_after.py --before /tmp/bench/before [--rounds 2]

Both sides run THIS tree's copies of the two scripts (they use only what both trees have: the
layer's `routing`, `generate_ids`, `generate_routed`, the server's chat completions), so the
benchmark code is the same and only the library code differs. A subprocess runs from a temporary
working directory (the script directory or the interpreter's is first on sys.path, then
PYTHONPATH, then the editable install), and every run records which `modulora/__init__.py` it
imported; the driver stops if a side imported the wrong tree.

Order: round 1 old then new, round 2 new then old, and so on (every side once per round, the
first side alternating, so a slow drift of the machine hits both alike). Each script waits for a
quiet machine before each of its measurements and measures again when other processes used more
than the threshold meanwhile (bench/routing.py's CpuWatch). Figures: the median over every
repeat of every round; the spread is min-max over the same values; ratio = new / old.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ROUTING_KEYS = ["base", "ours top-1", "ours top-4 mixture", "ours Arrow top-4",
                "routed base", "routed top-1", "routed top-4 mixture", "routed Arrow top-4"]


def log(msg: str) -> None:
    print(msg, flush=True)


def cpu_info() -> str:
    text = Path("/proc/cpuinfo").read_text()
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")),
                 platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{model}, {os.cpu_count()} cores, flags: {' '.join(have) or 'none of avx2/avx512/amx'}"


def run_side(side: str, tree: Path | None, script: str, args: list[str], out_json: Path, work: Path,
             logs: Path) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    cmd = [sys.executable, str(HERE / script)] + args + ["--json", str(out_json)]
    logf = logs / f"{out_json.stem}.log"
    log(f"[{time.strftime('%H:%M:%S')}] {side}: {' '.join(shlex.quote(c) for c in cmd)}  (log {logf})")
    t0 = time.perf_counter()
    with open(logf, "w") as f:
        rc = subprocess.run(cmd, env=env, cwd=work, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{side} {script} failed (rc {rc}); see {logf}:\n{logf.read_text()[-3000:]}")
    data = json.loads(out_json.read_text())
    if tree is None:  # other people commit while this runs: say which commit the new side had
        data["git_head"] = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %cI"],
                                          capture_output=True, text=True).stdout.strip()
        out_json.write_text(json.dumps(data))
    want = (tree / "modulora" / "__init__.py") if tree is not None else (ROOT / "modulora" / "__init__.py")
    if Path(data["modulora"]).resolve() != want.resolve():
        raise SystemExit(f"{side}: imported {data['modulora']}, not {want}")
    log(f"  done in {time.perf_counter() - t0:.0f} s, modulora from {data['modulora']}")
    return data


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def spread(xs, fmt="{:.2f}"):
    return f"{fmt.format(min(xs))}-{fmt.format(max(xs))}" if xs else "-"


def routing_tables(runs: dict[str, list[dict]]) -> tuple[str, list[str]]:
    """Markdown for the routing part, and notes on outputs."""
    methods = [m for m in runs["old"][0]["times"] if all(m in r["times"] for s in runs for r in runs[s])]
    rows, split_rows, rel_rows = [], [], []
    figs = {}
    for m in methods:
        f = {}
        for s in ("old", "new"):
            f[s] = {k: [x for r in runs[s] for x in r[k][m]] for k in ("times", "prefill", "decode")}
        figs[m] = f
        o, n = med(f["old"]["times"]), med(f["new"]["times"])
        rows.append([m, f"{o:.2f}", spread(f["old"]["times"]), f"{n:.2f}", spread(f["new"]["times"]),
                     f"**{n / o:.2f}**", str(len(f["old"]["times"])), str(len(f["new"]["times"]))])
        po, pn = med(f["old"]["prefill"]), med(f["new"]["prefill"])
        do, dn = med(f["old"]["decode"]), med(f["new"]["decode"])
        split_rows.append([m, f"{po:.2f}", f"{pn:.2f}", f"{pn / po:.2f}", spread(f["old"]["prefill"]),
                           spread(f["new"]["prefill"]), f"{do:.2f}", f"{dn:.2f}", f"{dn / do:.2f}",
                           spread(f["old"]["decode"]), spread(f["new"]["decode"])])
    for m in methods:
        ref = "routed base" if m.startswith("routed") and "routed base" in figs else "base"
        ro = med(figs[m]["old"]["times"]) / med(figs[ref]["old"]["times"])
        rn = med(figs[m]["new"]["times"]) / med(figs[ref]["new"]["times"])
        # per round: the method over its own side's reference in the same process, then the median
        per = {s: [statistics.median(r["times"][m]) / statistics.median(r["times"][ref]) for r in runs[s]]
               for s in ("old", "new")}
        rel_rows.append([m, ref, f"{ro:.2f}x", spread(per["old"]), f"{rn:.2f}x", spread(per["new"]),
                         f"{rn / ro:.2f}"])
    notes = []
    for m in methods:
        outs = {s: [json.dumps(r["outputs"][m]) for r in runs[s]] for s in ("old", "new")}
        same = len(set(outs["old"] + outs["new"])) == 1
        if not same:
            a, b = runs["old"][0]["outputs"][m], runs["new"][0]["outputs"][m]
            tok = sum(x == y for p, q in zip(a, b) for x, y in zip(p, q)) / max(1, sum(map(len, a)))
            notes.append(f"{m}: generated tokens differ between old and new ({tok:.1%} of tokens equal)")
        else:
            notes.append(f"{m}: the same generated tokens in every old and new run")
    text = ("### Total time per batch, seconds (median over all repeats; spread min-max)\n\n"
            + table(["method", "old s", "old spread", "new s", "new spread", "new / old", "n old", "n new"], rows)
            + "\n\n### Prefill and decode, seconds (summed model forwards of more than one token / one token)\n\n"
            + table(["method", "prefill old", "prefill new", "new / old", "old spread", "new spread",
                     "decode old", "decode new", "new / old", "old spread", "new spread"], split_rows)
            + "\n\n### Relative to the base model alone in the same process (the benchmark's own measure)\n\n"
            "`ours ...` are over `base` (plain `generate_ids`), `routed ...` over `routed base` (the same "
            "batch API, no route). Spread: min-max of the per-process ratios.\n\n"
            + table(["method", "relative to", "old", "old spread", "new", "new spread", "new / old"], rel_rows)
            + "\n")
    return text, notes


def serve_tables(runs: dict[str, list[dict]]) -> str:
    levels = sorted({int(k) for r in runs["old"] for k in r["figures"]["greedy"]})
    rows = []
    for lv in levels:
        for key, label, fmt in (("rps", "requests/s", "{:.2f}"), ("tps", "gen tokens/s", "{:.1f}"),
                                ("p50", "latency p50 s", "{:.2f}"), ("p95", "latency p95 s", "{:.2f}"),
                                ("rows_step", "rows per decode step", "{:.2f}"),
                                ("tokens_per_request", "gen tokens / request", "{:.2f}")):
            v = {s: [r["figures"]["greedy"][str(lv)][key] for r in runs[s]] for s in ("old", "new")}
            o, n = med(v["old"]), med(v["new"])
            rows.append([str(lv), label, fmt.format(o), spread(v["old"], fmt), fmt.format(n), spread(v["new"], fmt),
                         f"**{n / o:.2f}**" if key in ("rps", "tps") else f"{n / o:.2f}"])
    text = ("### Greedy, chat completions (old vs new server)\n\n"
            + table(["clients", "figure", "old", "old spread", "new", "new spread", "new / old"], rows) + "\n")
    extra = {}
    for r in runs["new"]:
        for label, f in r["figures"].items():
            if label != "greedy":
                extra.setdefault(label, []).append(f["16"])
    if extra:
        g = [r["figures"]["greedy"]["16"] for r in runs["new"] if "16" in r["figures"]["greedy"]]
        erows = []
        for label, fs in [("greedy", g)] + list(extra.items()):
            erows.append([label, f"{med([f['rps'] for f in fs]):.2f}", spread([f["rps"] for f in fs]),
                          f"{med([f['cps'] for f in fs]):.2f}", f"{med([f['tps'] for f in fs]):.1f}",
                          spread([f["tps"] for f in fs], "{:.1f}"), f"{med([f['p50'] for f in fs]):.2f}",
                          f"{med([f['p95'] for f in fs]):.2f}", f"{med([f['tokens_per_request'] for f in fs]):.1f}",
                          str(sum(f["failed"] for f in fs))])
        text += ("\n### New server only, 16 clients: greedy, sampling and n\n\n"
                 "(The server before the engine was greedy only: it ignored temperature/top_p and refused n > 1.)\n\n"
                 + table(["16 clients", "requests/s", "spread", "completions/s", "gen tokens/s", "spread",
                          "p50 s", "p95 s", "gen tokens / request", "failed"], erows) + "\n")
    return text


def table(header, rows) -> str:
    from modulora.report import table as t
    return t(header, rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="/tmp/bench/before", help="the tree of commit 74ff831 (git archive)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--routing-args", default="--repeats 2 --skip-peft --skip-retrieval --max-wait 180 --max-tries 4",
                    help="extra arguments of bench/routing.py")
    ap.add_argument("--serve-args", default="--levels 1,16 --seconds 15 --soak-seconds 0 --max-wait 180",
                    help="extra arguments of bench/serve.py")
    ap.add_argument("--skip-routing", action="store_true")
    ap.add_argument("--skip-serve", action="store_true")
    ap.add_argument("--work", default=None, help="where the runs' JSON and logs go (default: a temp dir)")
    ap.add_argument("--reuse", action="store_true", help="take a run's figures from --work where its JSON is "
                                                        "already there (rewrite the report without rerunning)")
    ap.add_argument("--library-note", default="the demo library", help="what --library is, for the report")
    ap.add_argument("--out", default=str(HERE / "results" / "before_after.md"))
    args = ap.parse_args()
    before = Path(args.before).resolve()
    if not (before / "modulora" / "__init__.py").is_file():
        raise SystemExit(f"{before} holds no modulora tree; extract it with git archive 74ff831")
    work = Path(args.work or tempfile.mkdtemp(prefix="modulora-before-after-"))
    work.mkdir(parents=True, exist_ok=True)
    cwd = work / "cwd"
    cwd.mkdir(exist_ok=True)
    t_start = time.perf_counter()
    sides = {"old": before, "new": None}
    runs: dict[str, dict[str, list[dict]]] = {"routing": {"old": [], "new": []}, "serve": {"old": [], "new": []}}
    parts = [p for p, skip in (("routing", args.skip_routing), ("serve", args.skip_serve)) if not skip]
    for rnd in range(args.rounds):
        order = ("old", "new") if rnd % 2 == 0 else ("new", "old")
        for part in parts:
            for side in order:
                if part == "routing":
                    extra = shlex.split(args.routing_args) + ["--out", str(work / f"routing-{side}-{rnd}.md")]
                    script = "routing.py"
                else:
                    extra = shlex.split(args.serve_args) + ["--out", str(work / f"serve-{side}-{rnd}.md")]
                    if side == "old":
                        extra.append("--no-extras")  # greedy only before the engine
                    script = "serve.py"
                out_json = work / f"{part}-{side}-{rnd}.json"
                if args.reuse and out_json.is_file():
                    runs[part][side].append(json.loads(out_json.read_text()))
                    continue
                runs[part][side].append(run_side(side, sides[side], script, extra, out_json, cwd, work))
    import torch

    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    text = ["# Before and after the engine (issue 13, point 9)\n",
            f"Command: `{cmd}` (old tree: `git archive 74ff831 | tar -x -C {before}`).\n",
            f"Hardware: {cpu_info()}; shared with other jobs. torch {torch.__version__}, Python "
            f"{platform.python_version()}. "
            + ("Report rewritten from the runs' saved JSON (`--reuse`; the runs themselves were as below)."
               if args.reuse else f"Whole run {time.perf_counter() - t_start:.0f} s.") + "\n",
            f"Old = commit 74ff831 (before the engine), new = this tree (`{ROOT}`); each run a subprocess "
            f"with its own PYTHONPATH, from a neutral working directory; every run's `modulora` import was "
            f"checked. {args.rounds} rounds, each side once per round, the first side alternating "
            f"(old, new / new, old / ...). New-side HEAD after each run: "
            f"{', '.join(r.get('git_head', '?') for p in runs.values() for r in p['new']) or '-'} "
            "(the working tree also carries uncommitted edits; git status shows them).\n"]
    if "routing" in parts:
        r_text, notes = routing_tables(runs["routing"])
        a = runs["routing"]["new"][0]["args"]
        retries = {s: sum(r["retries"] for r in runs["routing"][s]) for s in ("old", "new")}
        flagged = [f for s in ("old", "new") for r in runs["routing"][s] for f in r["flagged"]]
        loads = [x for s in ("old", "new") for r in runs["routing"][s] for x in r["others_load"]]
        text += [
            "## bench/routing.py\n",
            f"Arguments: `{args.routing_args}`. Setting: {a['experts']} random LoRA experts of rank 8 on all "
            f"linear layers, a batch of {a['requests']} requests of {a['prompt_tokens']} random prompt tokens, "
            f"exactly {a['new_tokens']} greedy new tokens each (no end token), {a['threads']} threads, fp32; "
            f"{a['repeats']} interleaved repeats per process, so {a['repeats'] * args.rounds} values per method "
            "and side. `ours ...`: the multi-expert layer in the plain `generate_ids` loop (the layer changed "
            "a little: slots-backed views, Arrow candidates by module); `routed ...`: the same routes through "
            "`generate_routed`, which is the engine in the new tree (one Engine kept across calls) and "
            "`generate_ids` with per-batch plans in the old one; the routed prompts are the random ids "
            "decoded to text and rendered through the chat template. PEFT methods and the retrieval part "
            "are left out (they do not depend on this change).\n",
            f"Quiet machine: measurements retaken because others used more than {a['quiet_threshold']} cores: "
            f"old {retries['old']}, new {retries['new']}; other processes' load during kept measurements: "
            f"median {med(loads):.3f}, max {max(loads):.3f} cores"
            + (f"; KEPT ALTHOUGH BUSY: {', '.join(flagged)}" if flagged else "") + ".\n",
            r_text,
            "Outputs:\n\n" + "\n".join(f"- {n}" for n in notes) + "\n",
        ]
    if "serve" in parts:
        flagged = [f for s in ("old", "new") for r in runs["serve"][s] for f in r["flagged"]]
        retries = {s: sum(r["retries"] for r in runs["serve"][s]) for s in ("old", "new")}
        startup = {s: med([r["startup_s"] for r in runs["serve"][s]]) for s in ("old", "new")}
        errors = {s: sum(r["server_errors"] for r in runs["serve"][s]) for s in ("old", "new")}
        text += [
            "## bench/serve.py\n",
            f"Arguments: `{args.serve_args}` (old side also `--no-extras`). Library: {args.library_note}; "
            "a real server subprocess on 127.0.0.1, client threads on the same 2 cores, chat completions with "
            "one user message (the same token sequence on both servers), max_tokens 16, greedy; every level "
            "measured on a quiet machine (the server's CPU counted as the benchmark's own). Levels retaken: "
            f"old {retries['old']}, new {retries['new']}"
            + (f"; KEPT ALTHOUGH BUSY: {', '.join(flagged)}" if flagged else "")
            + f". Server start (median): old {startup['old']:.1f} s, new {startup['new']:.1f} s. Server log "
            f"lines with Traceback/ERROR: old {errors['old']}, new {errors['new']}.\n",
            serve_tables(runs["serve"]),
            "Compare requests/s, not generated tokens/s: the new server counts the end token in "
            "`usage.completion_tokens` (the engine reports it as an output token, with its logprob, as "
            "lm-eval's loglikelihood reads it), the old one did not; hence about one more token per request "
            "that ended by the end token (gen tokens / request above) for the same greedy answers.\n",
        ]
    text.append(f"Raw JSON and logs of every run: `{work}` (not kept in the repository).\n")
    Path(args.out).write_text("\n".join(text))
    print("\n".join(text))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
