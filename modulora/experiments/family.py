"""Experiment 1, the adapter family (LLM-Adapters protocol, Hu et al. 2023).

LoRA, series, parallel and prefix adapters trained on a math mixture (GSM8K train + FLAN AQuA
chain of thought) and on a commonsense mixture (BoolQ, ARC-Easy, ARC-Challenge, OpenBookQA train
sets + the SNI WinoGrande and PIQA tasks), scored on the LLM-Adapters test sets with the paper's
answer extraction, the base model as a row.
"""

from __future__ import annotations

import datetime
import json

from ..adapters import AdapterConfig
from ..data import load_task, mixture
from ..evaluate import Method, evaluate, load_results, prepare_task
from ..report import write_text_atomic
from .common import Context, add, environment, gap, met, publish, train_one, write_report

MATH_TRAIN = ["gsm8k/train.jsonl", "flan-cot/aqua_train.tsv"]
CS_TRAIN = ["llm-adapters/boolq/train.json", "llm-adapters/ARC-Easy/train.json",
            "llm-adapters/ARC-Challenge/train.json", "llm-adapters/openbookqa/train.json",
            "sni/task033_winogrande_answer_generation.json", "sni/task080_piqa_answer_generation.json"]
MATH_TEST = ["gsm8k", "AQuA", "AddSub", "MultiArith", "SingleEq", "SVAMP"]
CS_TEST = ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa"]
TYPES = {"lora": "LoRA", "series": "Series", "parallel": "Parallel", "prefix": "Prefix"}


DOMAINS = {"math": (MATH_TRAIN, MATH_TEST), "commonsense": (CS_TRAIN, CS_TEST)}
EVAL_BATCH = 50  # divides the 200 test examples per set: no ragged last batch


def run(ctx: Context, progress: bool = True, domains: list[str] | None = None) -> dict:
    """Train and score the chosen domains (default both), then write the report from every
    domain whose results are in the report folder, so the two halves may run at different times."""
    s = ctx.settings
    domains = domains or list(DOMAINS)
    tests = {}
    for domain in domains:  # every file is read and checked before training
        tests[domain] = [
            prepare_task(ctx.data_file("hellaswag/hellaswag_val_full.txt.bz2") if t == "hellaswag"
                         else ctx.data_file(f"llm-adapters/{t}/test.json"), n=s.family_n_eval, seed=0, name=t,
                         max_new_tokens=s.math_new_tokens if domain == "math" else None)
            for t in DOMAINS[domain][1]]
    train = {d: mixture([load_task(ctx.data_file(f)) for f in DOMAINS[d][0]], s.family_per_source, f"{d}-mixture")
             for d in domains}
    lib = ctx.work / "lib-family"
    for domain, task in train.items():
        for kind in TYPES:
            out = train_one(ctx, task, ctx.work / "family" / f"{domain}-{kind}", AdapterConfig(type=kind),
                            steps=s.family_steps, progress=progress, max_length=s.family_max_length)
            add(ctx, lib, f"{domain}-{kind}", out)
    for domain in domains:
        methods = [Method("base")] + [Method(label, f"{domain}-{kind}", str(lib)) for kind, label in TYPES.items()]
        evaluate(ctx.eval_base, tests[domain], methods, ctx.work / f"eval-family-{domain}", batch_size=EVAL_BATCH,
                 progress=progress, ray=ctx.ray)
        publish(ctx, ctx.work / f"eval-family-{domain}", {"results.json": f"{domain}-results.json",
                                                           "accuracy.png": f"{domain}.png"})
        run_info = {"command": ctx.command, "environment": environment(),
                    "finished": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        write_text_atomic(ctx.results / f"{domain}-run.json", json.dumps(run_info, indent=1))
    return report(ctx)


def report(ctx: Context) -> dict:
    """README.md from the domains whose results are in the report folder; the others say how to run them."""
    s = ctx.settings
    body, verdicts, summary = [], [], {}
    for domain in DOMAINS:
        path = ctx.results / f"{domain}-results.json"
        if not path.exists():
            verdicts.append(f"{domain}: not run yet")
            body += [f"## {domain.capitalize()}", "",
                     f"Not run yet: `modulora experiment family --domain {domain}{' --quick' if ctx.quick else ''}`.", ""]
            continue
        res = load_results(path)
        run_info = json.loads((ctx.results / f"{domain}-run.json").read_text())
        avg = {m: 100 * res.average(m) for m in res.methods}
        summary[domain] = avg
        beat = all(avg[label] > avg["base"] for label in TYPES.values())
        verdicts.append(f"{domain}: every adapter type beats the base on average -> {met(beat)} "
                        f"(base {avg['base']:.1f}; " + ", ".join(f"{lab} {avg[lab]:.1f}" for lab in TYPES.values()) + ")")
        gaps = [f"- {gap(res, label, 'base')}" for label in TYPES.values()]
        headers = ["model"] + res.tasks + ["avg"]
        rows = [[m] + [f"{100 * res.main(m, t):.1f}" for t in res.tasks] + [f"{avg[m]:.1f}"] for m in res.methods]
        body += [f"## {domain.capitalize()} (accuracy %)", "",
                 f"Run: `{run_info['command']}`, finished {run_info['finished']}  ",
                 f"Environment: {run_info['environment']}", "",
                 "| " + " | ".join(headers) + " |", "|---" * len(headers) + "|",
                 *["| " + " | ".join(r) + " |" for r in rows], "",
                 "Each type against the base, with how far chance alone moves the average on these samples:", "",
                 *gaps, "", f"![{domain}]({domain}.png)", "",
                 f"Every prediction: [{domain}-results.json]({domain}-results.json)", ""]
    intro = [
        f"Training: math mixture = GSM8K train + FLAN AQuA CoT; commonsense mixture = BoolQ, ARC-Easy, "
        f"ARC-Challenge, OpenBookQA train + SNI WinoGrande (task033) and PIQA (task080); a seeded sample of at most "
        f"{s.family_per_source} examples per source, {s.family_steps} steps of {s.batch_size}, max length "
        f"{s.family_max_length}; adapters at their defaults (LoRA rank 8 on all linear layers, series/parallel "
        "bottleneck 64, prefix 16 tokens).",
        f"Test: a seeded sample of {s.family_n_eval} per LLM-Adapters test set (the whole set when smaller; "
        "HellaSwag from its validation file), greedy decoding, answers extracted as in the paper: the last number "
        "for arithmetic (within 0.001), the option letter for AQuA, the first option word for multiple choice; "
        f"at most {s.math_new_tokens} new tokens for math, 16 for multiple choice; the model under bf16 autocast "
        f"where the CPU has native bf16 (adapter products in fp32), batches of {EVAL_BATCH}.", "",
        "Targets: " + "; ".join(verdicts), "",
    ]
    write_report(ctx, "Experiment 1: the adapter family on math and commonsense", intro + body)
    return summary

