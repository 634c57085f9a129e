"""What adding one adapter costs while serving: copying it into a free slot (`ExpertSlots.load`)
against re-stacking the whole set (`ExpertSet`, what the server did before the engine).

Experts have SmolLM2-135M's module shapes (30 layers x 7 projections, rank 8), random weights;
the library has 16 experts and a 17th arrives. Interleaved repeats, median.

    python bench/slots.py            # writes bench/results/slots.md
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch

from modulora.routing.experts import ExpertSet, LoraExpert
from modulora.routing.slots import ExpertSlots

HIDDEN, KV, INTER, LAYERS, RANK = 576, 192, 1536, 30, 8
SHAPES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV, HIDDEN), "self_attn.v_proj": (KV, HIDDEN),
          "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
          "mlp.down_proj": (HIDDEN, INTER)}


def expert(name: str, gen: torch.Generator) -> LoraExpert:
    A, B = {}, {}
    for layer in range(LAYERS):
        for m, (out, d_in) in SHAPES.items():
            key = f"model.layers.{layer}.{m}"
            A[key] = torch.randn(RANK, d_in, generator=gen) * 0.01
            B[key] = torch.randn(out, RANK, generator=gen) * 0.01
    return LoraExpert(name=name, object_id=name, r=RANK, scaling=1.0, A=A, B=B)


def main(repeats: int = 7) -> None:
    gen = torch.Generator().manual_seed(0)
    library = [expert(f"e{i}", gen) for i in range(16)]
    newcomer = expert("new", gen)
    slots = ExpertSlots(capacity=32, rank=RANK)
    for e in library:
        slots.load(e)
    restack, load = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        ExpertSet(library + [newcomer])
        restack.append(time.perf_counter() - t)
        t = time.perf_counter()
        slots.load(newcomer)
        load.append(time.perf_counter() - t)
        slots.evict("new")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    r, s = statistics.median(restack) * 1000, statistics.median(load) * 1000
    text = (f"# Adding one adapter while serving\n\n{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
            f"16 resident experts with SmolLM2-135M's shapes (rank {RANK}, 210 modules), a 17th arrives; "
            f"median of {repeats} interleaved repeats (`python bench/slots.py`).\n\n"
            "| what | ms |\n|---|---|\n"
            f"| re-stack the whole set (before) | {r:.1f} |\n| copy into a free slot (engine) | {s:.1f} |\n"
            f"| ratio | {r / s:.1f}x |\n")
    out = Path(__file__).parent / "results" / "slots.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
