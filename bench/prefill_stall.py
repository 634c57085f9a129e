"""How long a long prompt holds up the requests already generating, by prefill chunk size.

    python bench/prefill_stall.py                 # SmolLM2, a 1,800-token prompt, 3 repeats
    python bench/prefill_stall.py --base tiny --prompt-tokens 600

One request generates (greedy, 160 tokens); after its 10th token a long prompt joins. The
running request's longest wait between two tokens is measured with the engine's prefill chunk
at 256 and 512 tokens and unchunked (the whole prompt in one forward), the settings interleaved
in each repeat; the medians go to bench/results/prefill_stall.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from routing import cpu_model  # noqa: E402

from modulora.base import load_base  # noqa: E402
from modulora.compute import cpu_has_bf16
from modulora.report import table
from modulora.routing.engine import Engine
from modulora.routing.requests import EngineRequest, SamplingParams


def one_run(base, chunk: int, long_ids: list[int]) -> dict:
    """(longest gap, median gap, the long prompt's time to first token) in seconds."""
    eng = Engine(base, prefill_chunk=chunk)
    stamps: list[float] = []
    first: list[float] = []
    running = EngineRequest(base.tokenizer("Tell me about the sea.")["input_ids"], None,
                            params=SamplingParams(max_tokens=160, ignore_eos=True),
                            on_token=lambda ev: stamps.append(time.perf_counter()))
    long = EngineRequest(long_ids, None, params=SamplingParams(max_tokens=4, ignore_eos=True),
                         on_token=lambda ev: first.append(time.perf_counter()))
    eng.add([running])
    while len(stamps) < 10:
        eng.step()
    joined = time.perf_counter()
    eng.add([long])
    while eng.busy:
        eng.step()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"max_gap": max(gaps), "median_gap": statistics.median(gaps), "ttft": first[0] - joined}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="default: the bundled SmolLM2")
    ap.add_argument("--prompt-tokens", type=int, default=1800)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "prefill_stall.md"))
    args = ap.parse_args()
    base = load_base(args.base, device="cpu", dtype=args.dtype)
    words = " ".join(f"river{i % 97} stone{i % 13}" for i in range(args.prompt_tokens))
    long_ids = base.tokenizer(words)["input_ids"][:args.prompt_tokens]
    settings = {"256": 256, "512": 512, "unchunked": 1 << 30}
    runs: dict[str, list[dict]] = {k: [] for k in settings}
    one_run(base, 512, long_ids[:64])  # warm-up
    for r in range(args.repeats):
        order = list(settings) if r % 2 == 0 else list(reversed(settings))
        for k in order:
            runs[k].append(one_run(base, settings[k], long_ids))
            print(k, {m: round(v, 3) for m, v in runs[k][-1].items()}, flush=True)
    rows = [[k, f"{statistics.median(x['max_gap'] for x in v) * 1000:.0f}",
             f"{statistics.median(x['median_gap'] for x in v) * 1000:.0f}",
             f"{statistics.median(x['ttft'] for x in v):.2f}"] for k, v in runs.items()]
    text = "\n".join([
        "# A long prompt joining a running batch: the running request's longest wait", "",
        f"`python bench/prefill_stall.py {' '.join(sys.argv[1:])}`".replace(" `", "`"), "",
        f"Hardware: {cpu_model()}, {os.cpu_count()} cores, native bf16: {cpu_has_bf16()}; torch {torch.__version__}; "
        f"base {base.name} on {base.compute.describe()}. One request generates 160 tokens; after its 10th a "
        f"{len(long_ids)}-token prompt joins. Medians of {args.repeats} interleaved repeats.", "",
        table(["prefill chunk (tokens)", "longest wait between two tokens (ms)", "median wait (ms)",
               "long prompt's first token (s)"], rows), "",
        "With chunks, the running request waits at most one chunk's forward (plus its own step) for each "
        "token, while the long prompt is fed over several steps; unchunked, it waits for the whole prompt.", ""])
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
