"""Micro-benchmark of candidate multi-expert LoRA kernels on SmolLM2-135M shapes (random tensors).

Not a test. Times only the LoRA part (what is added to a base Linear's output), summed over all
30 layers x 7 target modules, and prints it next to the base Linears' own time, for:

- sequence-level routes (experts per request), top-1 (every row its own expert) and top-4 of 16:
    gather per call    each row's k experts gathered at every call, two batched matmuls (rank k*R)
    pregathered        the same with the gather done once per generate call
    grouped by expert  (row, expert) pairs sorted by expert, padded [U, C, .] bmm, index_add back
  modulora uses "gather per call" for prompts (t > 1) and "grouped by expert" for decode steps.
- Arrow top-4 of E (E = 16 and 64), per token:
    used experts, one product   the experts some token selected, one masked product (modulora)
    sorted pairs, loop          pairs sorted by expert, a loop over selected experts (modulora)
    sorted pairs, padded bmm    the same pairs in one padded [U, C, .] bmm
    per-pair gather             each pair gathers its expert's A/B (decode only)
    PEFT 0.21                   every expert for every token with a [t, E, out] intermediate
  modulora picks "used" while U <= 4k or N <= 64 tokens, else "sorted" (arrow.DENSE_MAX_*).

Shapes: batch 16 x 128 prompt tokens (prefill) and 16 x 1 (one decode step). Run e.g.

    python bench/routing_layer_micro.py --threads 1 --reps 3 --phase decode
    python bench/routing_layer_micro.py --threads 1 --reps 1 --phase prefill --what arrow
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

HIDDEN, INTER, LAYERS = 576, 1536, 30
SHAPES = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
          "gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}  # [out, in]
E, R = 16, 8


def make_modules(gen):
    mods = []
    for _ in range(LAYERS):
        for out, inn in SHAPES.values():
            mods.append({
                "W": torch.randn(out, inn, generator=gen) * 0.02,
                "A": torch.randn(E, R, inn, generator=gen) * 0.05,
                "B": torch.randn(E, out, R, generator=gen) * 0.05,
                "P": F.normalize(torch.randn(E, inn, generator=gen), dim=-1),
            })
    return mods


def inputs(mods, b, t, gen):
    xs = {}
    for m in mods:
        inn = m["W"].shape[1]
        if inn not in xs:
            xs[inn] = torch.randn(b, t, inn, generator=gen)
    return xs


def timeit(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# sequence-level candidates; idx, w: [b, k]


def seq_gather(m, x, idx, w):
    b, k = idx.shape
    A = m["A"][idx].reshape(b, k * R, -1)
    B = (m["B"][idx] * w[:, :, None, None]).permute(0, 2, 1, 3).reshape(b, -1, k * R)
    return torch.bmm(torch.bmm(x, A.transpose(1, 2)), B.transpose(1, 2))


def seq_prepare(m, idx, w):
    b, k = idx.shape
    A = m["A"][idx].reshape(b, k * R, -1).contiguous()
    B = (m["B"][idx] * w[:, :, None, None]).permute(0, 2, 1, 3).reshape(b, -1, k * R).contiguous()
    return A, B


def seq_pregather(prep, x):
    A, B = prep
    return torch.bmm(torch.bmm(x, A.transpose(1, 2)), B.transpose(1, 2))


def group_plan(idx, w):
    """Pairs (row, expert) sorted by expert, padded per expert to the largest group."""
    b, k = idx.shape
    e = idx.reshape(-1)
    order = torch.argsort(e, stable=True)
    es = e[order]
    used, counts = torch.unique_consecutive(es, return_counts=True)
    C = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    g = torch.repeat_interleave(torch.arange(len(used)), counts)
    slot = g * C + (torch.arange(len(es)) - starts[g])
    rows = torch.zeros(len(used) * C, dtype=torch.long)
    wp = torch.zeros(len(used) * C)
    rows[slot] = order // k
    wp[slot] = w.reshape(-1)[order]
    return used, C, rows, wp


def seq_group_prepare(m, gp):
    used = gp[0]
    return m["A"][used].contiguous(), m["B"][used].contiguous()


def seq_grouped(prep, gp, x, y):
    A, B = prep
    used, C, rows, wp = gp
    b, t, inn = x.shape
    xs = x.reshape(b, t * inn).index_select(0, rows).view(len(used), C * t, inn)
    z = torch.bmm(xs, A.transpose(1, 2))
    z.mul_(wp.view(len(used), C, 1, 1).expand(-1, -1, t, 1).reshape(len(used), C * t, 1))
    ys = torch.bmm(z, B.transpose(1, 2)).view(len(used) * C, -1)
    y.view(b, -1).index_add_(0, rows, ys)


# ---------------------------------------------------------------------------------------------
# Arrow candidates; x: [N, in] valid tokens


def arrow_route(m, x, k, temperature=1.0):
    logits = (x @ m["P"].T).abs_()
    vals, idx = torch.topk(logits, k, dim=-1)
    return idx, torch.softmax(vals / temperature, dim=-1)


def arrow_peft(m, x, k):
    idx, w = arrow_route(m, x, k)
    coeff = torch.zeros(x.shape[0], E).scatter_(1, idx, w)
    z = torch.einsum("tf,erf->ter", x, m["A"])
    y = torch.einsum("ter,eor->teo", z, m["B"])
    return torch.einsum("te,teo->to", coeff, y)


def arrow_dense(m, x, k):
    idx, w = arrow_route(m, x, k)
    coeff = torch.zeros(x.shape[0], E).scatter_(1, idx, w)
    z = x @ m["A"].reshape(E * R, -1).T
    z = (z.view(-1, E, R) * coeff[:, :, None]).view(-1, E * R)
    return z @ m["B"].permute(1, 0, 2).reshape(-1, E * R).T


def _sorted_pairs(idx, w):
    k = idx.shape[1]
    e = idx.reshape(-1)
    order = torch.argsort(e)
    return e, order, order // k, w.reshape(-1)[order]


def arrow_loop(m, x, k):
    idx, w = arrow_route(m, x, k)
    e, order, tok, ws = _sorted_pairs(idx, w)
    counts = torch.bincount(e, minlength=E).tolist()
    xs = x.index_select(0, tok)
    ys = x.new_empty(len(tok), m["B"].shape[1])
    start = 0
    for ex, c in enumerate(counts):
        if c:
            seg = slice(start, start + c)
            z = xs[seg] @ m["A"][ex].T
            z.mul_(ws[seg, None])
            torch.matmul(z, m["B"][ex].T, out=ys[seg])
            start += c
    out = x.new_zeros(x.shape[0], ys.shape[1])
    return out.index_add_(0, tok, ys)


def arrow_grouped(m, x, k):
    idx, w = arrow_route(m, x, k)
    e, order, tok, ws = _sorted_pairs(idx, w)
    es = e[order]
    counts = torch.bincount(e, minlength=E)
    used = counts.nonzero().squeeze(1)
    cu = counts[used]
    C = int(cu.max())
    U = len(used)
    starts = torch.cumsum(cu, 0) - cu
    gid = torch.cumsum(counts > 0, 0) - 1
    g = gid[es]
    slot = g * C + (torch.arange(len(es)) - starts[g])
    xs = x.new_zeros(U * C, x.shape[1])
    xs[slot] = x.index_select(0, tok)
    A = m["A"] if U == E else m["A"][used]
    B = m["B"] if U == E else m["B"][used]
    z = torch.bmm(xs.view(U, C, -1), A.transpose(1, 2)).view(U * C, R)
    wp = x.new_zeros(U * C)
    wp[slot] = ws
    z.mul_(wp[:, None])
    ys = torch.bmm(z.view(U, C, R), B.transpose(1, 2)).view(U * C, -1)
    out = x.new_zeros(x.shape[0], ys.shape[1])
    return out.index_add_(0, tok, ys.index_select(0, slot))


def arrow_pairgather(m, x, k):
    idx, w = arrow_route(m, x, k)
    n = x.shape[0]
    A = m["A"][idx].reshape(n, k * R, -1)
    B = (m["B"][idx] * w[:, :, None, None]).permute(0, 2, 1, 3).reshape(n, -1, k * R)
    z = torch.bmm(A, x.unsqueeze(2))
    return torch.bmm(B, z).squeeze(2)


# ---------------------------------------------------------------------------------------------


def _lib_arrow(kernel):
    """The library's Arrow path (routing + mixed_delta) with its kernel forced."""
    from modulora.routing import arrow as A

    spec = A.Arrow(top_k=4)

    def run(m, x, k):
        idx, w = A.route_tokens(x, m["P"], spec)
        if kernel == "used":
            used = torch.bincount(idx.reshape(-1), minlength=m["A"].shape[0]).nonzero().squeeze(1)
            return A._used_delta(x, m["A"], m["Bt"], idx, w, used, False)
        counts = torch.bincount(idx.reshape(-1), minlength=m["A"].shape[0]).tolist()
        return A._sorted_delta(x, m["A"], m["Bt"], idx, w, counts, False)
    return run


def with_bt(mods):
    for m in mods:
        m["Bt"] = m["B"].transpose(1, 2).contiguous()
    return mods


def main():
    global E
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--phase", choices=["prefill", "decode", "both"], default="both")
    ap.add_argument("--what", choices=["seq", "arrow", "both"], default="both")
    ap.add_argument("--experts", type=int, nargs="+", default=[16, 64], help="E values for Arrow")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"SmolLM2 shapes: {LAYERS} layers x {len(SHAPES)} modules, rank {R}, {args.threads} thread(s), "
          f"median of {args.reps}; time of the LoRA part summed over all modules, and its share of the "
          f"base Linears' time", flush=True)

    def show(name, sec, base):
        print(f"  {name:34s} {sec * 1e3:8.1f} ms  {sec / base * 100:6.1f}%", flush=True)

    with torch.inference_mode():
        phases = {"prefill 16x128": (16, 128), "decode 16x1": (16, 1)}
        for phase, (b, t) in phases.items():
            if args.phase != "both" and not phase.startswith(args.phase):
                continue
            E = 16
            mods = with_bt(make_modules(gen))
            xs = inputs(mods, b, t, gen)
            base = timeit(lambda: [F.linear(xs[m["W"].shape[1]], m["W"]) for m in mods], args.reps)
            print(f"\n== {phase}: base Linears {base * 1e3:.1f} ms", flush=True)
            if args.what in ("seq", "both"):
                for k in (1, 4):
                    if k == 1:
                        idx = torch.randperm(E, generator=gen)[:b].unsqueeze(1)  # every row its own expert
                    else:
                        idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(b)])
                    w = torch.softmax(torch.randn(b, k, generator=gen), -1)
                    preps = [seq_prepare(m, idx, w) for m in mods]
                    gp = group_plan(idx, w)
                    gpreps = [seq_group_prepare(m, gp) for m in mods]
                    t_prep = timeit(lambda: [seq_prepare(m, idx, w) for m in mods], 1)
                    ys = {m["W"].shape[0]: torch.zeros(b, t, m["W"].shape[0]) for m in mods}
                    print(f" sequence routes, top-{k} of {E} (E*R={E * R}; a pregather costs {t_prep * 1e3:.0f} ms "
                          "once per generate)", flush=True)
                    show("gather per call (rowwise)", timeit(
                        lambda: [seq_gather(m, xs[m["W"].shape[1]], idx, w) for m in mods], args.reps), base)
                    show("pregathered (rowwise)", timeit(
                        lambda: [seq_pregather(p, xs[m["W"].shape[1]]) for m, p in zip(mods, preps)], args.reps), base)
                    show("grouped by expert", timeit(
                        lambda: [seq_grouped(p, gp, xs[m["W"].shape[1]], ys[m["W"].shape[0]])
                                 for m, p in zip(mods, gpreps)], args.reps), base)
            if args.what in ("arrow", "both"):
                n = b * t
                for E in args.experts:
                    emods = mods if E == 16 else with_bt(make_modules(gen))
                    flat = {inn: x.reshape(n, inn) for inn, x in xs.items()}
                    print(f" Arrow top-4 of {E}, per token", flush=True)
                    cands = {"used experts, one product (lib)": _lib_arrow("used"),
                             "sorted pairs, loop (lib)": _lib_arrow("sorted"),
                             "sorted pairs, padded bmm": arrow_grouped}
                    if t == 1:
                        cands["per-pair gather"] = arrow_pairgather
                    for name, fn in cands.items():
                        show(name, timeit(lambda: [fn(m, flat[m["W"].shape[1]], 4) for m in emods], args.reps), base)
                    if E == 16:
                        # PEFT's computation on one layer's modules, times the number of layers
                        one = emods[:len(SHAPES)]
                        sec = timeit(lambda: [arrow_peft(m, flat[m["W"].shape[1]], 4) for m in one], 1) * LAYERS
                        show("PEFT 0.21 (1 layer x 30)", sec, base)
                    show("routing scores+top-k alone", timeit(
                        lambda: [arrow_route(m, flat[m["W"].shape[1]], 4) for m in emods], args.reps), base)
                E = 16

        # the candidates agree (one module)
        E = 16
        m = with_bt(make_modules(gen)[4:5])[0]
        x = torch.randn(37, m["W"].shape[1], generator=gen)
        ref = arrow_dense(m, x, 4)
        for name, fn in {"loop": arrow_loop, "grouped": arrow_grouped, "peft": arrow_peft,
                         "pairgather": arrow_pairgather, "lib used": _lib_arrow("used"),
                         "lib sorted": _lib_arrow("sorted")}.items():
            assert torch.allclose(fn(m, x, 4), ref, atol=1e-5), name
        idx = torch.tensor([[3, 5], [5, 1], [3, 0]])
        w = torch.softmax(torch.randn(3, 2, generator=gen), -1)
        x3 = torch.randn(3, 2, m["W"].shape[1], generator=gen)
        ref = seq_gather(m, x3, idx, w)
        y = torch.zeros_like(ref)
        gp = group_plan(idx, w)
        seq_grouped(seq_group_prepare(m, gp), gp, x3, y)
        assert torch.allclose(y, ref, atol=1e-5)
        print("\ncandidates agree")


if __name__ == "__main__":
    main()
