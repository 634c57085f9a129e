"""The `modulora` command: thin wrappers over the Python API."""

from __future__ import annotations

import argparse
import json
import sys


def _library(args):
    from .library import Library

    return Library(args.library)


def _adapter_path(args):
    """The files of `--adapter NAME[@VERSION]` in the library, or None for the base alone."""
    if not args.adapter:
        return None
    name, _, version = args.adapter.partition("@")
    if version and not version.isdigit():
        raise ValueError(f"bad adapter reference {args.adapter!r}: use NAME or NAME@VERSION")
    return _library(args).get(name, int(version) if version else None).path


def cmd_train(args) -> None:
    from .adapters import AdapterConfig
    from .base import load_base
    from .data import file_hash, load_task
    from .train import TrainConfig, train_adapter

    task = load_task(args.data, positive_examples=args.positive_examples)
    if args.task_name:
        task.name = args.task_name
    adapter = AdapterConfig(type=args.type, r=args.rank, alpha=args.alpha if args.alpha else 2.0 * args.rank,
                            dropout=args.dropout, bottleneck=args.bottleneck, placement=args.placement,
                            num_virtual_tokens=args.virtual_tokens,
                            **({"target_modules": tuple(args.target_modules.split(","))} if args.target_modules else {}))
    adapter.validate()
    holdout = args.holdout if args.holdout < 1 else int(args.holdout)
    cfg = TrainConfig(steps=args.steps, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                      max_length=args.max_length, seed=args.seed, dtype=args.dtype, holdout=holdout,
                      micro_batch=args.micro_batch)
    base = load_base(args.base, device=args.device, dtype=args.dtype)
    metrics = train_adapter(base, task, adapter, cfg, args.out, data_hash=file_hash(args.data))
    print(json.dumps(metrics, indent=2))
    print(f"adapter written to {args.out}")
    if args.add:
        record = _library(args).add(args.add, args.out, base.fingerprint)
        print(f"added to the library as {record.name} v{record.version}")


def cmd_generate(args) -> None:
    from .base import load_base
    from .routing.requests import SamplingParams

    if not args.prompt:
        raise SystemExit("error: give at least one --prompt")
    if sum(map(bool, (args.adapter, args.base_only, args.route))) != 1:
        raise SystemExit("error: give one of --adapter NAME, --route POLICY or --base-only")
    arrow = arrow_settings(args)
    if arrow and not (args.route == "arrow" or args.fallback == "arrow"):
        raise SystemExit("error: --arrow-* settings apply to --route arrow or --fallback arrow")
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop=tuple(args.stop))
    params.validate()
    base = load_base(args.base, device=args.device, dtype=args.dtype, serving=True)
    if args.route:
        from .routing.api import Router, explain_lines

        router = Router(base, _library(args))
        answers = router.answer(args.prompt, [args.route] * len(args.prompt), top_k=args.top_k, mode=args.mode,
                                explain=args.explain, sampling=params, fallback=args.fallback, arrow=arrow)
        for prompt, ans in zip(args.prompt, answers):
            print(f">>> {prompt}\n{ans.text.strip()}")
            if args.explain:
                print("\n".join(["routing:"] + explain_lines(ans, per_layer=args.route == "arrow")))
            print()
        return
    from .routing.engine import Engine
    from .routing.requests import EngineRequest

    engine = Engine(base)
    route = None
    if args.adapter:
        route = {_load_one(engine, _library(args), args.adapter, base): 1.0}
    answers = engine.run([EngineRequest(p, route, params=params) for p in args.prompt])
    engine.release()
    for prompt, a in zip(args.prompt, answers):
        print(f">>> {prompt}\n{a.text.strip()}\n" if len(args.prompt) > 1 else a.text.strip())


def _load_one(engine, lib, ref: str, base) -> str:
    """Put adapter `NAME[@VERSION]` of the library (any type) into the engine; its name."""
    from .routing.experts import library_record, load_experts
    from .routing.family import load_family

    rec = library_record(lib, ref)
    if rec.type == "lora":
        engine.use_experts(load_experts(lib, [ref], fingerprint=base.fingerprint))
    else:
        engine.use_family(load_family(lib, [ref], fingerprint=base.fingerprint))
    return rec.name


def cmd_router(args) -> None:
    from .base import load_base
    from .routing.abstain import table
    from .routing.learned import train_router

    lib = _library(args)
    if args.action == "calibrate":
        from .routing.retrieval import RetrievalRouter

        fitted = RetrievalRouter(lib).calibrate(args.max_in_domain_abstain)
        print(f"fitted the retrieval router's abstention threshold; saved in {lib.root}\n{table(fitted)}")
        return
    base = (load_base(args.base, device=args.device, dtype=args.dtype, serving=True) if args.embedder == "base"
            else None)
    embedder = None
    if base is not None:
        from .routing.embed import BaseEmbedder

        embedder = BaseEmbedder(base)
    router = train_router(lib, embedder=embedder, memory_per_task=args.memory, epochs=args.epochs, seed=args.seed,
                          max_in_domain=args.max_in_domain_abstain)
    router.save(lib)
    print(f"trained the learned router on {len(router.names)} adapters "
          f"({args.memory} examples per task at most); saved in {lib.root}")
    fitted = router.abstention()
    print(table(fitted) if fitted else "no abstention threshold: it needs two adapters with two examples each")


def cmd_eval(args) -> None:
    from .base import load_base
    from .evaluate import Method, check_methods, evaluate, prepare_task, task_files

    files = [f for d in args.data for f in task_files(d)]
    tasks = [prepare_task(f, n=args.n, seed=args.seed, metric=args.metric, holdout=args.holdout or None,
                          loglik=args.loglik, max_new_tokens=args.max_new_tokens, name=name,
                          positive_examples=args.positive_examples) for name, f in files]
    routes = list(args.route) + ([args.adapter] if args.adapter else [])
    arrow = arrow_settings(args)
    if arrow and not ("arrow" in routes or args.fallback == "arrow"):
        raise SystemExit("error: --arrow-* settings apply to --route arrow or --fallback arrow")

    def uses_arrow(r: str) -> bool:
        return r == "arrow" or (r in ("retrieval", "learned") and args.fallback == "arrow")

    methods = [Method(name=(r if r == "base" or args.top_k == 1 or "," in r or ":" in r else f"{r} top-{args.top_k}")
                      + (f" abstain->{args.fallback}" if args.fallback and r in ("retrieval", "learned") else "")
                      + (" (" + ", ".join(f"{k} {v}" for k, v in arrow.items()) + ")" if arrow and uses_arrow(r) else ""),
                      route=r, top_k=args.top_k, mode=args.mode,
                      fallback=args.fallback if r in ("retrieval", "learned") else None,
                      arrow=arrow if uses_arrow(r) else None) for r in routes or ["base"]]
    lib = args.library or str(_library(args).root)
    check_methods(methods, lib)  # before the model loads
    ray = ray_options(args)
    if ray is not None:
        from .cluster import check

        check(ray)  # before the model loads
    base = load_base(args.base, device=args.device, dtype=args.dtype, serving=True)
    results = evaluate(base, tasks, methods, args.out, library=lib, batch_size=args.batch_size, ray=ray)
    print(results.markdown())
    if args.show:
        for rec in results.predictions[: args.show]:
            mark = "ok" if list(rec["scores"].values())[0] >= 1 else "--"
            print(f"[{mark}] {rec['method']} {rec['task']} #{rec['id']}: {rec['prediction'][:70]!r} "
                  f"(expected {rec['references'][0][:40]!r})")
    print(f"results: {args.out}/results.md, results.json (every prediction), accuracy.png"
          + (", routing.png" if any(r != "base" for r in routes) else ""))


def cmd_library(args) -> None:
    lib = _library(args)
    if args.action == "add":
        from .base import load_base

        fp = load_base(args.base).fingerprint if not args.no_base_check else None
        r = lib.add(args.name, args.path, fp)
        print(f"added {r.name} v{r.version} ({r.type}, {r.num_params} parameters)")
    elif args.action == "list":
        from .report import table

        records = lib.list()
        if not records:
            print(f"the library at {lib.root} is empty")
            return
        print(table(["name", "version", "type", "task", "parameters", "created"],
                    [[r.name, r.version, r.type, (r.card or {}).get("task", ""), r.num_params, r.created]
                     for r in records]))
    elif args.action == "show":
        print(json.dumps(lib.show(args.name, args.version), indent=2, default=str))
    elif args.action == "remove":
        n = lib.remove(args.name, args.version)
        print(f"removed {n} version(s) of {args.name}")
    elif args.action == "export":
        out = lib.export(args.name, args.out, args.version)
        print(f"exported {args.name} to {out}")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(base_name=args.base, steps=args.steps, n_eval=args.n_eval, workdir=args.workdir, device=args.device,
             dtype=args.dtype)


def add_arrow_args(p: argparse.ArgumentParser) -> None:
    """Arrow's settings beside --top-k (see modulora.routing.arrow)."""
    p.add_argument("--arrow-temperature", type=float, default=None,
                   help="arrow: softmax temperature over the top-k scores (default 1)")
    p.add_argument("--arrow-cosine", action="store_true", help="arrow: score by cosine, not the raw dot product")
    p.add_argument("--arrow-prototypes", default=None, choices=["product", "a", "spectral"],
                   help="arrow: each expert's prototype from B A (default), from A alone, or B A's whole "
                        "spectrum (SpectR: score |B A x|)")
    p.add_argument("--arrow-modules", default=None, metavar="REGEX",
                   help="arrow: route per token only in modules matching REGEX; the others mix all experts equally")


def arrow_settings(args) -> dict | None:
    """The Arrow settings given on the command line (None: none given)."""
    got = {"temperature": args.arrow_temperature, "normalize": args.arrow_cosine or None,
           "prototypes": args.arrow_prototypes, "modules": args.arrow_modules}
    got = {k: v for k, v in got.items() if v is not None}
    return got or None


def add_compute_args(p: argparse.ArgumentParser) -> None:
    """--device and --dtype: every command that loads a base model takes them (modulora.compute)."""
    from .compute import DTYPES

    p.add_argument("--device", default="auto",
                   help="auto (a CUDA GPU, else Apple MPS, else the CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="auto: bf16 on a GPU (fp16 where bf16 is missing); on a CPU: serve, generate and eval load "
                        "bf16 weights where the CPU has AMX (else fp32), training keeps fp32 weights under bf16 "
                        "autocast where the CPU has native bf16; bf16 on a CPU: bf16 weights to generate, autocast "
                        "to train; fp16: GPUs only")


def add_ray_args(p: argparse.ArgumentParser) -> None:
    """--ray ADDRESS and the resources of each unit: build and eval run their units as Ray tasks
    (modulora.cluster; needs the `ray` extra)."""
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run the units as tasks on a running Ray cluster (HOST:PORT, or auto); "
                        "needs pip install 'modulora[ray]'")
    p.add_argument("--ray-cpus", type=float, default=1.0, help="CPUs each unit reserves (and its torch threads)")
    p.add_argument("--ray-gpus", type=float, default=0.0, help="GPUs each unit reserves (> 0: units run on CUDA)")
    p.add_argument("--ray-retries", type=int, default=3, help="reruns of a unit whose worker or node died")


def ray_options(args):
    """The RayOptions that --ray asks for, or None (the default: no cluster, no ray import)."""
    if not args.ray:
        return None
    from .cluster import RayOptions

    return RayOptions(address=args.ray, num_cpus=args.ray_cpus, num_gpus=args.ray_gpus, max_retries=args.ray_retries)


def build_parser() -> argparse.ArgumentParser:
    from .routing.abstain import DEFAULT_MAX_IN_DOMAIN, FALLBACKS

    p = argparse.ArgumentParser(prog="modulora", description=__doc__)
    p.add_argument("--library", default=None, help="library folder (default $MODULORA_HOME/library)")
    sub = p.add_subparsers(dest="command", required=True)

    base_help = ("base model: HF directory or id, .gguf file, 'tiny' (or tiny-mistral, tiny-qwen2, tiny-phi3, "
                 "tiny-gemma2: random test models), or the bundled SmolLM2 (default)")

    t = sub.add_parser("train", help="train one adapter on a data file")
    t.add_argument("--data", required=True, help="JSONL, LLM-Adapters JSON, SNI task JSON or GSM8K JSONL")
    t.add_argument("--type", default="lora", choices=["lora", "series", "parallel", "prefix"])
    t.add_argument("--out", required=True, help="directory to write the adapter to")
    t.add_argument("--base", default=None, help=base_help)
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs over the data)")
    t.add_argument("--epochs", type=float, default=1.0)
    t.add_argument("--lr", type=float, default=None, help="learning rate (default per type)")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--micro-batch", type=int, default=None,
                   help="rows per forward/backward pass: less memory, same update (default: the whole batch)")
    t.add_argument("--max-length", type=int, default=256, help="tokens per example (prompt cut from the left)")
    t.add_argument("--rank", type=int, default=8, help="LoRA rank")
    t.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    t.add_argument("--dropout", type=float, default=0.05)
    t.add_argument("--target-modules", default=None, help="comma list, e.g. q_proj,v_proj (default: all linear)")
    t.add_argument("--bottleneck", type=int, default=64, help="series/parallel bottleneck size")
    t.add_argument("--placement", default="pfeiffer", choices=["pfeiffer", "houlsby"], help="series adapter placement")
    t.add_argument("--virtual-tokens", type=int, default=16, help="prefix length")
    t.add_argument("--seed", type=int, default=0)
    add_compute_args(t)
    t.add_argument("--holdout", type=float, default=0.1, help="validation share, or a count when >= 1")
    t.add_argument("--positive-examples", type=int, default=0, help="SNI: positive examples in the prompt")
    t.add_argument("--task-name", default=None)
    t.add_argument("--add", metavar="NAME", default=None, help="also add the adapter to the library as NAME")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="generate with an adapter from the library, or the base alone")
    g.add_argument("--adapter", default=None, help="library name, optionally NAME@VERSION (any adapter type)")
    g.add_argument("--route", default=None,
                   help="arrow | retrieval | learned | uniform (LoRA experts) | NAME[,NAME...] | NAME:W,NAME:W "
                        "(LoRA, or series/parallel adapters of one kind, or one prefix adapter)")
    g.add_argument("--top-k", type=int, default=1, help="experts per request (arrow: per token)")
    g.add_argument("--mode", default="mixture", choices=["mixture", "average"],
                   help="compose by output mixture or by parameter averaging")
    g.add_argument("--explain", action="store_true", help="print which experts each request used")
    g.add_argument("--fallback", default=None, choices=FALLBACKS,
                   help="retrieval/learned: when the best expert's score is under the calibrated threshold, "
                        "answer with this instead (modulora router calibrate / router train fit it)")
    add_arrow_args(g)
    g.add_argument("--base-only", action="store_true")
    g.add_argument("--prompt", action="append", default=[], help="repeat for a batch")
    g.add_argument("--base", default=None, help=base_help)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="a string that ends the answer (repeatable)")
    add_compute_args(g)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="score routes (methods) on data files; resumable; tables and plots")
    e.add_argument("--data", required=True, action="append",
                   help="a data file, a folder of task files, or a folder of LLM-Adapters sets (<set>/test.json); "
                        "repeat for more")
    e.add_argument("--route", action="append", default=[],
                   help="a method: base | arrow | retrieval | learned | uniform | NAME[,NAME] | NAME:W,...; repeat")
    e.add_argument("--adapter", default=None, help="shorthand for --route NAME")
    e.add_argument("--top-k", type=int, default=1)
    e.add_argument("--fallback", default=None, choices=FALLBACKS,
                   help="retrieval/learned routes abstain under their calibrated threshold to this policy")
    add_arrow_args(e)
    e.add_argument("--mode", default="mixture", choices=["mixture", "average"])
    e.add_argument("--base", default=None, help=base_help)
    e.add_argument("--n", type=int, default=None, help="a seeded subsample of at most N examples per task")
    e.add_argument("--holdout", type=float, default=0, help="score the split `train --holdout` held out (same --seed)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--metric", default="auto", help="auto, or a comma list of: em, rougeL, number, choice, letter")
    e.add_argument("--loglik", action="store_true", help="multiple choice: pick the option of highest log-likelihood")
    e.add_argument("--positive-examples", type=int, default=0)
    e.add_argument("--max-new-tokens", type=int, default=None, help="default by metric (256 for math, 32 short answers)")
    e.add_argument("--batch-size", type=int, default=16)
    add_compute_args(e)
    add_ray_args(e)
    e.add_argument("--out", default="eval-results", help="results folder; a rerun with the same settings resumes")
    e.add_argument("--show", type=int, default=0, help="print the first N predictions")
    e.set_defaults(func=cmd_eval)

    lib = sub.add_parser("library", help="manage the adapter library")
    lsub = lib.add_subparsers(dest="action", required=True)
    a = lsub.add_parser("add", help="validate and add an adapter directory")
    a.add_argument("name")
    a.add_argument("path")
    a.add_argument("--base", default=None, help=base_help + "; its fingerprint is checked")
    a.add_argument("--no-base-check", action="store_true", help="validate files only, without loading a base")
    lsub.add_parser("list", help="latest version of each adapter")
    for action, helptext in (("show", "everything about one adapter"), ("remove", "remove an adapter")):
        s = lsub.add_parser(action, help=helptext)
        s.add_argument("name")
        s.add_argument("--version", type=int, default=None)
    x = lsub.add_parser("export", help="copy an adapter's files out (PEFT-loadable for LoRA)")
    x.add_argument("name")
    x.add_argument("out")
    x.add_argument("--version", type=int, default=None)
    lib.set_defaults(func=cmd_library)

    r = sub.add_parser("router", help="the learned router (L2R) and the abstention thresholds")
    rsub = r.add_subparsers(dest="action", required=True)
    rc = rsub.add_parser("calibrate", help="fit the retrieval router's abstention threshold on the library's card "
                                           "samples (the learned router's is fitted by router train)")
    rc.add_argument("--max-in-domain-abstain", type=float, default=DEFAULT_MAX_IN_DOMAIN,
                    help="let at most this share of in-domain requests abstain")
    rt = rsub.add_parser("train", help="(re)train it on a memory of examples per adapter; run after adding adapters")
    rt.add_argument("--memory", type=int, default=50, help="examples per task at most")
    rt.add_argument("--max-in-domain-abstain", type=float, default=DEFAULT_MAX_IN_DOMAIN,
                    help="the abstention threshold lets at most this share of in-domain requests abstain")
    rt.add_argument("--epochs", type=int, default=100)
    rt.add_argument("--seed", type=int, default=0)
    rt.add_argument("--embedder", default="minilm", choices=["minilm", "base"])
    rt.add_argument("--base", default=None, help=base_help)
    add_compute_args(rt)
    r.set_defaults(func=cmd_router)

    from .build import add_build_command
    from .routing.merge import add_merge_command

    from .experiments import add_experiment_command
    from .gateway import add_gateway_command
    from .serve import add_serve_command

    add_build_command(sub)
    add_experiment_command(sub)
    add_merge_command(sub)
    add_serve_command(sub)
    add_gateway_command(sub)

    d = sub.add_parser("demo", help="train small adapters on generated tasks and compare with the base")
    d.add_argument("--base", default=None, help=base_help)
    d.add_argument("--steps", type=int, default=60)
    d.add_argument("--n-eval", type=int, default=20)
    d.add_argument("--workdir", default=None, help="default $MODULORA_HOME/demo")
    add_compute_args(d)
    d.set_defaults(func=cmd_demo)
    return p


STORAGE_ERRNOS = {"ENOSPC": "full", "EDQUOT": "full", "EROFS": "read-only"}
STORAGE_WORDS = {"full": "no space left on device", "read-only": "read-only file system"}


def storage_problem(exc: BaseException) -> tuple[str, str | None] | None:
    """("full" | "read-only", the path when known) when `exc`, or an exception it was raised
    from, is a full disk or quota (ENOSPC, EDQUOT), a read-only file system (EROFS), or SQLite
    saying so; None otherwise. Stdlib only (the server uses it too)."""
    import errno
    import sqlite3

    codes = {getattr(errno, n): kind for n, kind in STORAGE_ERRNOS.items() if hasattr(errno, n)}
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in codes:
            return codes[exc.errno], None if exc.filename is None else str(exc.filename)
        if isinstance(exc, sqlite3.Error):
            text = str(exc).lower()
            if "disk is full" in text:
                return "full", None
            if "readonly database" in text or "read-only" in text:
                return "read-only", None
        exc = exc.__cause__ or exc.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    """Run a command; known errors print one clear line and exit 2, never a traceback."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        args.func(args)
    except Exception as e:  # storage errors anywhere in a command; other errors as before
        problem = storage_problem(e)
        if problem is not None:
            path = problem[1] or getattr(args, "library", None) or os.path.join(
                os.environ.get("MODULORA_HOME") or os.path.expanduser("~/.modulora"), "library")
            print(f"error: cannot write ({STORAGE_WORDS[problem[0]]}): {path}", file=sys.stderr)
            return 2
        if isinstance(e, (ValueError, FileNotFoundError, PermissionError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
