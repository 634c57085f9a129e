"""The GPU check: routed outputs in bf16 on CUDA against the fp32 CPU reference, then the speed of
64 requests with 64 different rank-16 experts against the base alone and PEFT's mixed batch.

    python bench/gpu_check.py                        # on a CUDA GPU: both parts, a few minutes
    python bench/gpu_check.py --out results.md       # write the report elsewhere
    python bench/gpu_check.py --device cpu --small   # a dry run of every step on the CPU (<1 min)

Self-contained: the models are randomly initialised Llamas built from a config (no download, no
library, no network), the experts random LoRAs built in memory (the correctness part saves them
as adapter folders in a temp directory and reads them back, as bench/routing.py does).

1. Correctness. A small Llama (4 layers, width 256, initializer_range 0.05, the tiny byte-level
   tokenizer of 384 tokens) and 4 random rank-16 experts on all linear layers. One mixed batch
   through `Engine`: the base alone, each expert alone, a 4-expert output mixture, a 2-expert
   parameter average and Arrow top-2; prompts of different lengths (left padding); 16 greedy
   tokens with logprobs. The same batch in fp32 on the CPU (the reference) and with bf16 weights
   on the device. Checks: greedy tokens equal for the first --strict-steps steps (a divergence
   where the reference's top two tokens are within a near tie counts as bf16 rounding); logprobs
   equal within --tol before each row's first divergence; the device scoring the reference's
   whole sequences (prompt logprobs, teacher forced) within --tol at every generated position;
   Arrow rows within --arrow-tol (bf16 rounding can flip a token's top-k choice of experts); the
   experts change the answers.
2. Speed. A ~1.1B Llama (TinyLlama-1.1B's shape: hidden 2048, 22 layers, intermediate 5632, 32
   heads / 4 KV heads, vocab 32000) initialised at random directly on the GPU in bf16; 64 random
   rank-16 experts on q/k/v/o (`--targets all` adds gate/up/down); 64 requests of 128 random
   prompt tokens and exactly 64 greedy new tokens, request i routed to expert i. Settings, each
   warmed up once at full size, then --repeats interleaved repeats, medians:
     base               the model alone, a hand-written batched greedy loop with a KV cache
     engine, no route   `Engine(base)` with the experts loaded, every route None (its overhead)
     engine, 64 experts the engine, request i -> {expert_i: 1.0} (`EngineRequest`, add + step)
     PEFT mixed         `PeftModel` with the 64 adapters, `adapter_names=[...]` on every forward
                        of the same greedy loop as the base
   Prefill: from the batch's prompts to its first tokens (one forward of 64 x 128 tokens; the
   engine's prefill chunk is set to the whole batch); decode: the remaining 63 steps, per step.
   torch.cuda.synchronize() around every timed region. Also checked (untimed): the prefill logits
   of ours and PEFT's mixed batch agree much better than either agrees with the base.

Writes bench/results/gpu_check.md (on a CUDA device without --small; otherwise a file in the temp
directory unless --out says), with the GPU's name and the torch / transformers / peft versions.
No further speed repeat starts after --time-limit seconds (390: the whole run stays under 8
minutes on one H100 even if PEFT is slower than expected). Exits 1 if a check failed, 2 when no
CUDA GPU is available and --device cpu was not given.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project, also where it is not installed
sys.path.insert(0, str(Path(__file__).resolve().parent))

from routing import MixedBatch, cpu_model, log, make_experts

from modulora.base import Base, fingerprint
from modulora.compute import CPU_FP32, Compute
from modulora.forward import forward
from modulora.generate import last_position
from modulora.report import table
from modulora.routing.arrow import Arrow
from modulora.routing.engine import Engine
from modulora.routing.experts import LoraExpert, load_experts_from_dirs
from modulora.routing.layer import RoutingPlan, routing
from modulora.routing.requests import EngineRequest, SamplingParams
from modulora.tiny import tiny_tokenizer

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")

# the speed model: TinyLlama-1.1B's shape
FULL = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
        "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048}
# the correctness model, and the speed model of --small
SMALL = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 4, "max_position_embeddings": 1024}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def llama(shape: dict, tok, device: torch.device, dtype: torch.dtype, seed: int, init: float = 0.02):
    """A randomly initialised LlamaForCausalLM of `shape`, built directly on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = {"vocab_size": len(tok), **shape}
    cfg = LlamaConfig(**shape, initializer_range=init, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.config.name_or_path = f"random-llama-{shape['hidden_size']}x{shape['num_hidden_layers']}"
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def as_base(model, tok, compute: Compute) -> Base:
    return Base(model=model, tokenizer=tok, name=model.config.name_or_path, fingerprint=fingerprint(model),
                compute=compute)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def millions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


# ---------------------------------------------------------------------------------------------
# 1. correctness: the engine in bf16 on the device against fp32 on the CPU


def run_engine(engine: Engine, prompts, routes, modes, n_new: int, **params) -> list:
    reqs = [EngineRequest(list(p), r, mode=m, params=SamplingParams(max_tokens=n_new, ignore_eos=True, **params))
            for p, r, m in zip(prompts, routes, modes)]
    return engine.run(reqs, max_batch=len(reqs))


def first_diff(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def correctness(args, device: torch.device, tmp: Path) -> dict:
    tok = tiny_tokenizer()
    cpu_model_ = llama(SMALL, tok, torch.device("cpu"), torch.float32, seed=1, init=args.small_init)
    log(f"correctness: a {millions(n_params(cpu_model_))}-parameter Llama, 4 random rank-16 experts")
    dirs = make_experts(cpu_model_, tmp / "experts", 4, 16, args.check_b_std)  # as bench/routing.py does
    experts = load_experts_from_dirs(dirs)
    names = [e.name for e in experts]
    dev_model = copy.deepcopy(cpu_model_).to(device=device, dtype=torch.bfloat16)

    labels = ["base"] + [f"{n} alone" for n in names] + ["mixture of 4 (0.4/0.3/0.2/0.1)",
                                                         "average of 2 (0.5/0.5)", "Arrow top-2"]
    routes = [None] + [{n: 1.0} for n in names] + [dict(zip(names, (0.4, 0.3, 0.2, 0.1))),
                                                   {names[0]: 0.5, names[1]: 0.5}, Arrow(top_k=2, temperature=1.0)]
    modes = ["mixture"] * (len(routes) - 2) + ["average", "mixture"]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, len(tok), (8 + 5 * i,), generator=gen).tolist() for i in range(len(routes))]
    n_new = args.check_tokens

    ref_engine = Engine(as_base(cpu_model_, tok, CPU_FP32))
    ref_engine.use_experts(experts)
    ref = run_engine(ref_engine, prompts, routes, modes, n_new, logprobs=2)
    plain = run_engine(ref_engine, prompts, [None] * len(routes), modes, n_new)
    dev_engine = Engine(as_base(dev_model, tok, Compute(device, torch.bfloat16)))
    dev_engine.use_experts(experts)
    got = run_engine(dev_engine, prompts, routes, modes, n_new, logprobs=2)
    # teacher forced: the device scores the reference's whole sequences
    forced = run_engine(dev_engine, [p + a.token_ids for p, a in zip(prompts, ref)], routes, modes, 0,
                        prompt_logprobs=True)

    rows, bad_div = [], []
    worst = {(kind, arrow): 0.0 for kind in ("prefix", "forced") for arrow in (False, True)}
    for i, (label, a, b, f) in enumerate(zip(labels, ref, got, forced)):
        ra, rb = a.samples[0], b.samples[0]
        d = first_diff(ra.token_ids, rb.token_ids)
        upto = n_new if d is None else d
        pre = max((abs(x.logprob - y.logprob) for x, y in zip(ra.logprobs[:upto], rb.logprobs[:upto])), default=0.0)
        fl = [e.logprob for e in f.prompt_logprobs[-n_new:]]
        tf = max(abs(x.logprob - y) for x, y in zip(ra.logprobs, fl))
        arrow = isinstance(routes[i], Arrow)
        worst["prefix", arrow] = max(worst["prefix", arrow], pre)
        worst["forced", arrow] = max(worst["forced", arrow], tf)
        gap = None
        if d is not None:
            top = ra.logprobs[d].top
            gap = top[0][1] - top[1][1] if len(top) > 1 else float("inf")
            if d < args.strict_steps and gap >= 2 * (args.arrow_tol if arrow else args.tol):
                bad_div.append(label)
        rows.append([label, len(prompts[i]), "none" if d is None else str(d),
                     "-" if gap is None else f"{gap:.3f}", f"{pre:.4f}", f"{tf:.4f}",
                     "yes" if i and ra.token_ids != plain[i].token_ids else ("-" if not i else "no")])
    changed = sum(a.token_ids != p.token_ids for a, p in zip(ref[1:], plain[1:]))
    checks = [
        [(f"greedy tokens equal for the first {args.strict_steps} steps (a near tie, the reference's top-2 gap "
          f"< {2 * args.tol:g}, Arrow < {2 * args.arrow_tol:g}, excused)"), "diverged early: " + ", ".join(bad_div) if bad_div else "every row",
         not bad_div],
        [(f"logprobs before each row's first divergence, max abs(device - cpu) <= {args.tol:g} (Arrow <= "
          f"{args.arrow_tol:g})"), f"{worst['prefix', False]:.4f} (Arrow {worst['prefix', True]:.4f})",
         worst["prefix", False] <= args.tol and worst["prefix", True] <= args.arrow_tol],
        [(f"teacher-forced logprobs of the reference's {n_new} tokens, max abs(device - cpu) <= {args.tol:g} "
          f"(Arrow <= {args.arrow_tol:g})"), f"{worst['forced', False]:.4f} (Arrow {worst['forced', True]:.4f})",
         worst["forced", False] <= args.tol and worst["forced", True] <= args.arrow_tol],
        [f"the experts change the answers (routed rows unlike the base's, fp32 CPU) >= {(len(ref) - 1) // 2}",
         f"{changed} of {len(ref) - 1}", changed >= (len(ref) - 1) // 2],
    ]
    ref_engine.release()
    dev_engine.release()
    return {"rows": rows, "checks": checks, "n_new": n_new, "params": n_params(cpu_model_)}


# ---------------------------------------------------------------------------------------------
# 2. speed: the base alone, the engine, PEFT's mixed batch


def random_experts(model, n: int, r: int, targets: tuple[str, ...], b_std: float, device) -> list[LoraExpert]:
    """n random rank-r LoRA experts on every Linear named in `targets`, built on `device`:
    A ~ N(0, 1/in) per entry (rows of about unit norm), B ~ N(0, b_std), scaling 1."""
    mods = [(name, m) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    experts = []
    for i in range(n):
        gen = torch.Generator(device).manual_seed(5000 + i)
        A = {name: torch.randn(r, m.in_features, generator=gen, device=device) / math.sqrt(m.in_features)
             for name, m in mods}
        B = {name: torch.randn(m.out_features, r, generator=gen, device=device) * b_std for name, m in mods}
        experts.append(LoraExpert(name=f"expert{i:02d}", object_id=None, r=r, A=A, B=B))
    return experts


def peft_with(model, experts: list[LoraExpert], targets: tuple[str, ...]):
    """A PeftModel over `model` holding every expert as a LoRA adapter of the same name and weights."""
    from peft import LoraConfig, get_peft_model

    r = experts[0].r
    cfg = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=list(targets), bias="none")
    pm = get_peft_model(model, cfg, adapter_name=experts[0].name)
    for e in experts[1:]:
        pm.add_adapter(e.name, cfg)
    inner = pm.get_base_model()
    with torch.no_grad():
        for e in experts:
            for m, a in e.A.items():
                layer = inner.get_submodule(m)
                layer.lora_A[e.name].weight.copy_(a)
                layer.lora_B[e.name].weight.copy_(e.B[m] / layer.scaling[e.name])
    pm.eval()
    return pm


@torch.inference_mode()
def greedy_loop(model, ids: torch.Tensor, n_new: int) -> tuple[list[list[int]], float, float]:
    """Batched greedy generation with a KV cache (no padding: every prompt the same length):
    (tokens per row, prefill seconds, decode seconds). The next tokens go to the host every step,
    as modulora.generate.generate_ids does (and the engine, and transformers' generate)."""
    dev = ids.device
    mask = torch.ones_like(ids)
    sync(dev)
    t0 = time.perf_counter()
    logits, cache = forward(model, ids, mask, logits_to_keep=last_position(ids))
    nxt = logits[:, -1, :].float().argmax(-1)
    out = [nxt.tolist()]
    sync(dev)
    t1 = time.perf_counter()
    for _ in range(n_new - 1):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits, cache = forward(model, nxt.unsqueeze(1), mask, cache)
        nxt = logits[:, -1, :].float().argmax(-1)
        out.append(nxt.tolist())
    sync(dev)
    t2 = time.perf_counter()
    return [list(col) for col in zip(*out)], t1 - t0, t2 - t1


def engine_gen(engine: Engine, prompts: list[list[int]], routes: list, n_new: int):
    """The engine as a server drives it: add (prefill, first tokens), then step until done."""
    reqs = [EngineRequest(p, r, params=SamplingParams(max_tokens=n_new, ignore_eos=True))
            for p, r in zip(prompts, routes)]
    dev = engine.device
    sync(dev)
    t0 = time.perf_counter()
    done = engine.add(reqs)
    sync(dev)
    t1 = time.perf_counter()
    while engine.busy:
        done += engine.step()
    sync(dev)
    t2 = time.perf_counter()
    by = {id(r): a for r, a in done}
    return [by[id(r)].token_ids for r in reqs], t1 - t0, t2 - t1


@torch.inference_mode()
def logits_check(plain, engine: Engine, peft_model, experts, ids: torch.Tensor) -> dict:
    """Last-position prefill logits of the base, ours (the engine's layers) and PEFT's mixed batch."""
    names = [e.name for e in experts]
    mask = torch.ones_like(ids)
    keep = last_position(ids)
    lb, _ = forward(plain, ids, mask, logits_to_keep=keep)
    plan = RoutingPlan(engine.experts.slots, [{n: 1.0} for n in names], "mixture")
    with engine.compute.autocast(), routing(engine.model, plan):
        lo, _ = forward(engine.model, ids, mask, logits_to_keep=keep)
    lp, _ = forward(MixedBatch(peft_model, names), ids, mask, logits_to_keep=keep)
    lb, lo, lp = (x[:, -1].float() for x in (lb, lo, lp))
    d_peft = (lo - lp).abs().amax(-1)
    d_base = (lo - lb).abs().amax(-1)
    ratio = d_peft / d_base.clamp(min=1e-6)
    return {"d_peft_max": float(d_peft.max()), "d_base_median": float(d_base.median()),
            "ratio_median": float(ratio.median()), "ratio_max": float(ratio.max()),
            "argmax_peft": float((lo.argmax(-1) == lp.argmax(-1)).float().mean()),
            "argmax_base": float((lo.argmax(-1) == lb.argmax(-1)).float().mean()),
            "scale": float(lo.abs().max())}


def speed(args, device: torch.device) -> dict:
    tok = tiny_tokenizer()  # the engine needs one (eos, pad, template); prompts are token ids
    shape = dict(SMALL, vocab_size=2048) if args.small else FULL
    t0 = time.perf_counter()
    plain = llama(shape, tok, device, torch.bfloat16, seed=0)
    targets = ATTN + (MLP if args.targets == "all" else ())
    log(f"speed: a {millions(n_params(plain))}-parameter Llama in bf16 on {device} "
        f"({time.perf_counter() - t0:.1f} s); {args.experts} random rank-{args.rank} experts on "
        f"{', '.join(targets)}")
    experts = random_experts(plain, args.experts, args.rank, targets, args.b_std, device)
    names = [e.name for e in experts]
    t1 = time.perf_counter()
    engine = Engine(as_base(copy.deepcopy(plain), tok, Compute(device, torch.bfloat16)),
                    prefill_chunk=max(512, args.requests * args.prompt_tokens))
    engine.use_experts(experts)
    log(f"  engine ready ({time.perf_counter() - t1:.1f} s)")
    t1 = time.perf_counter()
    peft_model = peft_with(copy.deepcopy(plain), experts, targets)
    peft_dtype = str(peft_model.get_base_model().get_submodule(next(iter(experts[0].A))).lora_A[names[0]]
                     .weight.dtype).replace("torch.", "")
    log(f"  PEFT model with {len(experts)} adapters ready ({time.perf_counter() - t1:.1f} s; adapter weights "
        f"in {peft_dtype})")
    setup_s = time.perf_counter() - t0

    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, shape["vocab_size"], (args.requests, args.prompt_tokens), generator=gen)
    ids = prompts.to(device)
    plist = prompts.tolist()
    routes = [{names[i % len(names)]: 1.0} for i in range(args.requests)]
    row_names = [names[i % len(names)] for i in range(args.requests)]
    n = args.new_tokens
    mixed = MixedBatch(peft_model, row_names)
    methods = {
        "base (the model alone)": lambda: greedy_loop(plain, ids, n),
        "engine, no route": lambda: engine_gen(engine, plist, [None] * args.requests, n),
        f"engine, {args.experts} experts (top-1 each)": lambda: engine_gen(engine, plist, routes, n),
        "PEFT mixed batch (adapter_names)": lambda: greedy_loop(mixed, ids, n),
    }
    for name, fn in methods.items():  # warm-up at full size (kernels, allocator, autotuning)
        t1 = time.perf_counter()
        fn()
        log(f"  warm-up {name}: {time.perf_counter() - t1:.1f} s")
    split: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    outputs = {}
    for rep in range(args.repeats):
        if rep and time.perf_counter() > args.deadline:
            log(f"  stopping after {rep} repeat(s): the run is past its {args.time_limit:.0f} s budget for repeats")
            break
        for name, fn in methods.items():
            toks, pre, dec = fn()
            assert len(toks) == args.requests and all(len(t) == n for t in toks), f"{name}: not {n} tokens per row"
            split[name].append((pre, dec))
            outputs[name] = toks
            log(f"  repeat {rep + 1}/{args.repeats} {name:<40} prefill {1000 * pre:8.1f} ms  decode "
                f"{1000 * dec / max(1, n - 1):7.2f} ms/step")
    done = len(next(iter(split.values())))
    short = (f" ONLY {done} OF {args.repeats} REPEATS: the run reached its time budget (--time-limit)."
             if done < args.repeats else "")
    check = logits_check(plain, engine, peft_model, experts, ids)
    return {"split": split, "outputs": outputs, "check": check, "shape": shape, "params": n_params(plain),
            "targets": targets, "peft_dtype": peft_dtype, "setup_s": setup_s, "short": short,
            "expert_params": sum(a.numel() + experts[0].B[m].numel() for m, a in experts[0].A.items())}


# ---------------------------------------------------------------------------------------------
# report


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{torch.cuda.get_device_name(device)} ({p.total_memory / 2 ** 30:.0f} GiB, CUDA {torch.version.cuda})"
    return f"CPU: {cpu_model()} ({torch.get_num_threads()} threads)"


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    same = sum(x == y for x, y in zip(a, b))
    first = sum(x[0] == y[0] for x, y in zip(a, b))
    divs = [first_diff(x, y) for x, y in zip(a, b)]
    divs = [d for d in divs if d is not None]
    med = f", median first difference at step {statistics.median(divs):g}" if divs else ""
    return f"{same} of {len(a)} rows identical, first token equal in {first}{med}"


def report(args, device, corr, sp, total_s) -> tuple[str, bool]:
    import peft
    import transformers

    ok = True
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    dry = " (DRY RUN: --small on the CPU, not the GPU setting)" if device.type != "cuda" or args.small else ""
    text = f"""# GPU check: routed bf16 on the device against fp32 on the CPU, and speed{dry}

Command: `{cmd}`

Device: {device_name(device)}. torch {torch.__version__}, transformers {transformers.__version__}, peft
{peft.__version__}, Python {platform.python_version()}. Whole run {total_s:.0f} s.
"""
    if corr is not None:
        checks = [[c, m, "PASS" if p else "**FAIL**"] for c, m, p in corr["checks"]]
        ok &= all(p for _, _, p in corr["checks"])
        text += f"""
## 1. Correctness: the engine with bf16 weights on {device.type} against fp32 on the CPU

A random Llama of {millions(corr['params'])} parameters (4 layers, width 256, 8 heads / 4 KV heads), 4 random
rank-16 LoRA experts on all linear layers (saved as adapter folders and read back, lora_B ~ N(0,
{args.check_b_std})); one mixed batch of 8 requests through `Engine.run`, {corr['n_new']} greedy tokens each with
logprobs; the reference is the same on the CPU in fp32.

{table(["check", "measured", "result"], checks)}

{table(["row", "prompt tokens", "first divergence", "ref. top-2 gap there", "max abs dlogprob before it",
        "max abs dlogprob teacher forced", "unlike base"], corr['rows'])}
"""
    if sp is not None:
        split, outs, chk = sp["split"], sp["outputs"], sp["check"]
        names = list(split)
        n = args.new_tokens
        med = {m: (statistics.median(p for p, _ in v), statistics.median(d for _, d in v),
                   statistics.median(p + d for p, d in v)) for m, v in split.items()}
        bp, bd, bt = med[names[0]]
        rows = []
        for m, (p, d, t) in med.items():
            rows.append([m, f"{1000 * p:.1f}", f"{1000 * d / max(1, n - 1):.2f}", f"{t:.2f}",
                         f"{args.requests * n / t:.0f}", f"{p / bp:.2f}x", f"{d / bd:.2f}x", f"{t / bt:.2f}x"])
        routed, pm = names[2], names[3]
        ratio_ok = chk["ratio_median"] < 0.25
        ok &= ratio_ok
        s = sp["shape"]
        text += f"""
## 2. Speed: {args.requests} requests, each with a different one of {args.experts} rank-{args.rank} experts

A random Llama of {millions(sp['params'])} parameters (hidden {s['hidden_size']}, {s['num_hidden_layers']} layers, intermediate
{s['intermediate_size']}, {s['num_attention_heads']} heads / {s['num_key_value_heads']} KV heads, vocab {s['vocab_size']}), bf16 weights on {device.type}; {args.experts} random rank-{args.rank}
LoRA experts on {', '.join(sp['targets'])} ({sp['expert_params'] / 1e6:.1f}M parameters each; ours in fp32 slots, PEFT's
adapter weights in {sp['peft_dtype']}); {args.requests} requests of {args.prompt_tokens} random prompt tokens and exactly {n} greedy
new tokens, request i routed to expert i. Prefill: the batch's prompts to its first tokens (one forward);
decode: the other {n - 1} steps. Median of {len(next(iter(split.values())))} interleaved repeats after a full-size warm-up of each.
Set-up (model, experts, engine, PEFT with {args.experts} adapters) took {sp['setup_s']:.0f} s.{sp['short']}

{table(["setting", "prefill ms", "decode ms/step", "total s", "gen tokens/s", "prefill vs base",
        "decode vs base", "time vs base"], rows)}

- {routed} vs {pm}: {agreement(outs[routed], outs[pm])}.
- Prefill logits at the last prompt position, ours vs PEFT: max |difference| {chk['d_peft_max']:.3f}
  (largest |logit| {chk['scale']:.1f}; argmax equal in {chk['argmax_peft']:.0%} of rows); ours vs the base: median
  row max {chk['d_base_median']:.3f} (argmax equal in {chk['argmax_base']:.0%}). Per row, |ours - PEFT| / |ours - base|:
  median {chk['ratio_median']:.3f}, max {chk['ratio_max']:.3f}; check median < 0.25:
  {'PASS' if ratio_ok else '**FAIL**'}.
- {routed} vs the base: {agreement(outs[routed], outs[names[0]])} (the experts change the answers).
- {names[1]} vs the base: {agreement(outs[names[1]], outs[names[0]])}.
"""
    text += f"\nOverall: {'PASS' if ok else '**FAIL**'}.\n"
    return text, ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda; exits if there is none)")
    ap.add_argument("--small", action="store_true",
                    help="the speed part on a small model: 8 experts, 8 requests of 32 + 8 tokens, 2 repeats")
    ap.add_argument("--out", default=None, help="the report (default bench/results/gpu_check.md on a GPU)")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--targets", choices=("attn", "all"), default="attn",
                    help="the experts' modules in the speed part: q/k/v/o, or all linear layers")
    ap.add_argument("--b-std", type=float, default=0.02, help="std of lora_B in the speed part")
    ap.add_argument("--check-b-std", type=float, default=0.05, help="std of lora_B in the correctness part")
    ap.add_argument("--check-tokens", type=int, default=16)
    ap.add_argument("--small-init", type=float, default=0.05,
                    help="initializer_range of the correctness model (larger: fewer near ties)")
    ap.add_argument("--strict-steps", type=int, default=4)
    ap.add_argument("--tol", type=float, default=0.1, help="largest |logprob difference| allowed in bf16")
    ap.add_argument("--arrow-tol", type=float, default=0.25,
                    help="the same for Arrow rows: bf16 rounding can flip a token's top-k choice of experts")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    ap.add_argument("--time-limit", type=float, default=390,
                    help="seconds from the start after which no further speed repeat begins (the run stays "
                         "under 8 minutes)")
    args = ap.parse_args()
    if args.device is None:
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            print(f"gpu_check: no CUDA GPU is available (torch {torch.__version__} is {build}). This check is for a "
                  "machine with one; `python bench/gpu_check.py --device cpu --small` runs every step on the "
                  "CPU as a dry run.", file=sys.stderr)
            sys.exit(2)
        args.device = "cuda"
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit(f"gpu_check: --device {args.device}, but no CUDA GPU is available; use --device cpu --small")
        device = torch.device("cuda", device.index or 0)
        if not torch.cuda.is_bf16_supported():
            sys.exit(f"gpu_check: {torch.cuda.get_device_name(device)} has no bf16 support")
    elif device.type == "cpu":
        if not args.small and not args.skip_speed:
            sys.exit("gpu_check: the 1.1B speed setting would take hours on a CPU; add --small (or --skip-speed)")
    else:
        sys.exit(f"gpu_check: unsupported device {args.device!r}; use cuda, cuda:N or cpu")
    if args.small:
        args.experts, args.requests, args.prompt_tokens, args.new_tokens = 8, 8, 32, 8
        args.repeats = min(args.repeats, 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out:
        out = Path(args.out)
    elif device.type == "cuda" and not args.small:
        out = Path(__file__).resolve().parent / "results" / "gpu_check.md"
    else:  # a dry run must not overwrite the GPU's results
        out = Path(tempfile.gettempdir()) / "modulora-gpu-check-dry.md"
    log(f"gpu_check on {device_name(device)}")
    t0 = time.perf_counter()
    args.deadline = t0 + args.time_limit
    corr = sp = None
    if not args.skip_correctness:
        with tempfile.TemporaryDirectory(prefix="modulora-gpu-check-") as tmp:
            corr = correctness(args, device, Path(tmp))
        for c, m, p in corr["checks"]:
            log(f"  {'PASS' if p else 'FAIL'}  {c}: {m}")
        log(f"correctness done ({time.perf_counter() - t0:.0f} s)")
    if not args.skip_speed:
        sp = speed(args, device)
    text, ok = report(args, device, corr, sp, time.perf_counter() - t0)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"wrote {out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
