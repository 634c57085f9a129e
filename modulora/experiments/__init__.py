"""The papers' experiments, one command each: `modulora experiment NAME [--quick] --data DIR`.

Trained adapters and raw evaluations live under `--work` (default runs/experiments/<mode>), so a
rerun resumes; full-mode reports go to experiments/results/<name>/ (quick mode: under --work).
"""

from __future__ import annotations

import sys

EXPERIMENTS = {
    "family": "1: LoRA, series, parallel, prefix on math and commonsense (LLM-Adapters)",
    "zeroshot": "2: zero-shot reuse on held-out SNI tasks: merges, Arrow, retrieval, MBC (Arrow/MBC)",
    "mixed": "3: mixed requests, retrieval in and out of domain (LoraRetriever)",
    "continual": "4: tasks arriving one at a time, learned router (L2R)",
}


def cmd_experiment(args) -> None:
    import importlib

    from .common import make_context

    from ..cli import ray_options
    from ..data import DataError

    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    if args.domain and names != ["family"]:
        raise DataError("--domain applies to the family experiment only")
    ray = ray_options(args)
    if ray is not None:
        from ..cluster import check

        check(ray)  # before any model loads
    for name in names:
        ctx = make_context(name, args.data, args.work, args.results if len(names) == 1 else None, args.quick,
                           sys.argv[1:] if args.argv is None else args.argv, args.device, args.dtype, ray)
        module = importlib.import_module(f".{name}", __name__)
        extra = {"domains": [args.domain]} if args.domain else {}
        module.run(ctx, progress=not args.no_progress, **extra)
        print(f"experiment {name}: report in {ctx.results / 'README.md'}")


def add_experiment_command(subparsers) -> None:
    p = subparsers.add_parser("experiment", help="run one of the papers' experiments (resumable)",
                              description="\n".join(f"{k}: {v}" for k, v in EXPERIMENTS.items()))
    p.add_argument("name", choices=list(EXPERIMENTS) + ["all"])
    p.add_argument("--data", default=None, help="the shared data folder (default $MODULORA_DATA)")
    p.add_argument("--quick", action="store_true", help="the tiny model and a few examples: checks the pipeline")
    p.add_argument("--work", default=None, help="adapters, libraries and raw results (default runs/experiments)")
    p.add_argument("--results", default=None, help="report folder (default experiments/results/NAME; "
                                                    "quick: under --work)")
    p.add_argument("--domain", choices=["math", "commonsense"], default=None,
                   help="family only: run one domain (the report keeps the other's published results)")
    p.add_argument("--no-progress", action="store_true")
    from ..cli import add_compute_args, add_ray_args

    add_compute_args(p)
    add_ray_args(p)
    p.set_defaults(func=cmd_experiment, argv=None)
