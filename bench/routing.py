"""Routing speed on SmolLM2-135M: modulora's multi-expert layer against the base model alone and
against PEFT, plus retrieval routing over a library of 1,000 adapters.

Setting (default): fp32 (`--dtype bf16`: every model with bf16 weights, as `modulora serve` loads
them on a CPU with AMX; results in routing_bf16.md), 2 threads, 16 random LoRA experts of rank 8 on all linear layers
(q, k, v, o, gate, up, down), a batch of 16 requests of exactly 128 prompt tokens (random token
ids) and exactly 32 greedy new tokens (EOS is ignored by every method, so every method does the
same work). Methods, run interleaved (each method once, then again, `--repeats` times), medians:

    base            the base model alone: modulora.generate.generate_ids, nothing installed
    ours top-1      every request its own expert ({expert_i: 1.0}), one batched generation
    PEFT switch     PeftModel with the 16 adapters, set_adapter + generate_ids one request at a time
    PEFT mixed      PeftModel, one batch, adapter_names=[...] (in the same generate_ids loop, and
                    through peft_model.generate)
    ours top-4      every request a mixture of 4 experts (weights 0.4, 0.3, 0.2, 0.1)
    ours Arrow      Arrow top-4 of 16 per token and layer (temperature 1)
    PEFT Arrow      peft 0.21 create_arrow_model from the 16 adapter directories, same top_k and
                    temperature, no general experts
    routed ...      the same routes through the public batch API, `routing.batch.generate_routed`
                    (text prompts: the random ids decoded, rendered through the chat template; no
                    end token): "routed base" (no route), "routed top-1", "routed top-4 mixture",
                    "routed Arrow top-4". Where the tree has the engine (`routing.engine.Engine`),
                    one engine is kept across calls (`engine=`, as a Router keeps one); in the tree
                    before it the expert set is installed on the model once. Either way this is what
                    `Router.answer` and the server run.

Every method but `peft_model.generate` runs the same greedy loop (generate_ids, eos_id=-1).
Prefill and decode time are told apart by timing each forward of the underlying transformers model.
Then retrieval: a real Library of 1,000 small adapters whose retrieval vectors are written straight
into the library's derived-data cache, `RetrievalRouter.route([text], top_k=4)` per single request
with 1 and 2 threads, and the cost of adding one more adapter (one embedding, no rebuild).

Writes bench/results/routing.md (the `--quick` run writes to the temp directory unless --out says).

    python bench/routing.py                 # the full benchmark (several minutes)
    python bench/routing.py --quick         # end to end in under a minute: 4 experts, 4 x (16 + 4)
    python bench/routing.py --skip-peft --skip-retrieval --json F   # ours only (bench/before_after.py)

The script runs on the code before the engine (commit 74ff831) as well as after it:
bench/before_after.py runs it under both, interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import inspect
from pathlib import Path

import torch

from modulora.adapters import AdapterConfig, attach, detach, save_adapter
from modulora.adapters.lora import LoraLinear
from modulora.base import load_base
from modulora.forward import forward
from modulora.generate import generate_ids
from modulora.library import Library
from modulora.report import table
from modulora.routing.arrow import Arrow, prototypes
from modulora.routing.experts import ExpertSet, load_experts_from_dirs
from modulora.routing.layer import RoutingPlan, install, routing
from modulora.routing.retrieval import KIND_PREFIX, RetrievalRouter, _encode_vector
from modulora.tasks import make_task

NO_EOS = -1  # generate_ids stops a row only at this id, which no token has: exactly max_new_tokens
TOP4_WEIGHTS = (0.4, 0.3, 0.2, 0.1)


def log(msg: str) -> None:
    print(msg, flush=True)


class CpuWatch:
    """How many cores other processes kept busy: the machine's busy time (/proc/stat, steal
    included) minus this process's own CPU time, over an interval. On a shared machine, 2 OpenMP
    threads next to another busy process are not slowed a little but many times over (every
    parallel region waits for a descheduled thread), so a measurement during which other processes
    used more than `threshold` cores is discarded and taken again once the machine is quiet."""

    def __init__(self, threshold: float, max_wait_s: float, max_tries: int):
        self.threshold, self.max_wait_s, self.max_tries = threshold, max_wait_s, max_tries
        self.hz = os.sysconf("SC_CLK_TCK")
        self.retries = 0
        self.waited_s = 0.0
        self.accepted: list[float] = []  # other processes' load during each kept measurement
        self.flagged: list[str] = []     # measurements kept although the machine was busy

    def snap(self) -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        busy = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / self.hz  # user nice system irq softirq steal
        t = os.times()
        return busy, t.user + t.system, time.perf_counter()

    @staticmethod
    def others(a, b) -> float:
        return max(0.0, (b[0] - a[0]) - (b[1] - a[1])) / max(b[2] - a[2], 1e-9)

    def wait_quiet(self) -> None:
        """Return once other processes used under `threshold` cores for two seconds in a row
        (or after max_wait_s)."""
        t0 = time.perf_counter()
        quiet, said = 0, False
        while quiet < 2 and time.perf_counter() - t0 < self.max_wait_s:
            a = self.snap()
            time.sleep(1.0)
            load = self.others(a, self.snap())
            quiet = quiet + 1 if load < self.threshold else 0
            if load >= self.threshold and not said:
                log(f"  waiting for the machine to be quiet (other processes use {load:.2f} cores)")
                said = True
        self.waited_s += time.perf_counter() - t0

    def measure(self, label: str, fn):
        """fn() on a quiet machine: (its result, other processes' load meanwhile)."""
        for attempt in range(self.max_tries):
            self.wait_quiet()
            a = self.snap()
            result = fn()
            load = self.others(a, self.snap())
            if load < self.threshold:
                self.accepted.append(load)
                return result, load
            self.retries += 1
            log(f"  {label}: other processes used {load:.2f} cores meanwhile; measuring again")
        self.accepted.append(load)
        self.flagged.append(f"{label} ({load:.2f} cores)")
        return result, load


# ---------------------------------------------------------------------------------------------
# setup


def make_experts(model, out: Path, n: int, r: int, b_std: float) -> list[Path]:
    """n random LoRAs (rank r, all linear layers): A as attach initialises it, B ~ N(0, b_std)."""
    dirs = []
    for i in range(n):
        attach(model, AdapterConfig(type="lora", r=r, alpha=2.0 * r), seed=1000 + i)
        gen = torch.Generator().manual_seed(2000 + i)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoraLinear):
                    m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * b_std)
        dirs.append(save_adapter(model, out / f"expert{i:02d}", card={"description": f"random expert {i}"}))
        detach(model)
    return dirs


class ForwardClock:
    """Times every forward of a transformers model: prefill (t > 1) and decode (t == 1) seconds."""

    def __init__(self, model):
        self.prefill = self.decode = 0.0
        self._t0 = 0.0
        self._t = 0
        self._handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True),
                         model.register_forward_hook(self._post, with_kwargs=True)]

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._t = 1 if ids is None else ids.shape[1]
        self._t0 = time.perf_counter()

    def _post(self, module, args, kwargs, out):
        dt = time.perf_counter() - self._t0
        if self._t > 1:
            self.prefill += dt
        else:
            self.decode += dt

    def reset(self) -> None:
        self.prefill = self.decode = 0.0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class NoEosTokenizer:
    """The base's tokenizer with no end token (eos_token_id -1, which no token has), everything
    else its own: `generate_routed` then generates exactly max_new_tokens, in either tree."""

    eos_token_id = NO_EOS

    def __init__(self, tok):
        self.__dict__["_tok"] = tok

    def __getattr__(self, name):
        return getattr(self.__dict__["_tok"], name)

    def __call__(self, *args, **kwargs):
        return self.__dict__["_tok"](*args, **kwargs)


class NoEosBase:
    """A base (model, name, fingerprint) whose tokenizer has no end token."""

    def __init__(self, base):
        self.model, self.name, self.fingerprint = base.model, base.name, base.fingerprint
        self.tokenizer = NoEosTokenizer(base.tokenizer)


PRECISION = {"dtype": "fp32"}  # --dtype: the precision every model of the generation benchmark runs in


def bench_base():
    """SmolLM2 as the generation benchmark runs it: fp32, or bf16 weights (`--dtype bf16`, what
    `modulora serve` loads on a CPU with AMX)."""
    return load_base(dtype=PRECISION["dtype"], serving=True)


def routed_methods(tok, dirs, names, arrow, k):
    """The same routes through `generate_routed`: name -> (callable, model to clock)."""
    from modulora.routing.batch import generate_routed

    try:  # before the engine: a Request of its own
        from modulora.routing.batch import Request

        def make(text, route, n):
            return Request(text, route, max_new_tokens=n)
    except ImportError:  # the engine's one request type
        from modulora.routing.requests import EngineRequest, SamplingParams

        def make(text, route, n):
            return EngineRequest(text, route, params=SamplingParams(max_tokens=n))

    E = len(names)
    base = NoEosBase(bench_base())
    expert_set = ExpertSet(load_experts_from_dirs(dirs))
    kwargs = {}
    if "engine" in inspect.signature(generate_routed).parameters:  # the engine's tree: keep one
        from modulora.routing.engine import Engine
        kwargs["engine"] = Engine(base)
    else:  # before the engine: installed once, so generate_routed does not install it per call
        install(base.model, expert_set)
    texts: dict[tuple, str] = {}

    def run(route_fn):
        def go(prompts, n):
            for p in prompts:
                if tuple(p) not in texts:
                    texts[tuple(p)] = tok.decode(p)
            reqs = [make(texts[tuple(p)], route_fn(i), n) for i, p in enumerate(prompts)]
            answers = generate_routed(base, expert_set, reqs, batch_size=len(reqs), **kwargs)
            return [a.token_ids for a in answers]
        return go

    return {
        "routed base": (run(lambda i: None), base.model),
        "routed top-1": (run(lambda i: {names[i % E]: 1.0}), base.model),
        f"routed top-{k} mixture": (run(lambda i: {names[(i + j) % E]: w for j, w in zip(range(k), TOP4_WEIGHTS)}),
                                    base.model),
        f"routed Arrow top-{k}": (run(lambda i: arrow), base.model),
    }


class MixedBatch:
    """A PeftModel seen by generate_ids with `adapter_names` added to every forward."""

    def __init__(self, peft_model, names: list[str]):
        self.peft_model, self.names, self.config = peft_model, names, peft_model.config

    def __call__(self, **kwargs):
        return self.peft_model(**kwargs, adapter_names=self.names)


# ---------------------------------------------------------------------------------------------
# the generation benchmark


def build_methods(args, tok, dirs, names):
    """name -> (callable(prompts, n_new) -> token ids, the transformers model to clock)."""
    from peft import PeftModel
    from peft.tuners.lora.config import ArrowConfig
    from peft.tuners.lora.arrow import create_arrow_model

    E = len(names)
    k = min(4, E)
    pad = tok.pad_token_id

    plain = bench_base().model
    ours = bench_base().model
    expert_set = ExpertSet(load_experts_from_dirs(dirs))
    install(ours, expert_set)
    prototypes(expert_set)  # Arrow prototypes: computed once per expert set, not per request

    if not args.skip_peft:
        peft_lora = PeftModel.from_pretrained(bench_base().model, str(dirs[0]), adapter_name=names[0])
        for d, n in zip(dirs[1:], names[1:]):
            peft_lora.load_adapter(str(d), adapter_name=n)
        peft_lora.eval()

        arrow_cfg = ArrowConfig(top_k=k, router_temperature=args.temperature, use_gks=False, rng_seed=0)
        peft_arrow = create_arrow_model(bench_base().model, [str(d) for d in dirs], arrow_cfg)
        peft_arrow.eval()
    else:
        peft_lora = peft_arrow = None

    def routes_top1(b):
        return [{names[i % E]: 1.0} for i in range(b)]

    def routes_top4(b):
        return [{names[(i + j) % E]: w for j, w in zip(range(k), TOP4_WEIGHTS)} for i in range(b)]

    def base_run(prompts, n):
        return generate_ids(plain, prompts, NO_EOS, pad, n)

    def ours_run(routes_fn):
        def run(prompts, n):
            plan = RoutingPlan(expert_set, routes_fn(len(prompts)), "mixture")
            with routing(ours, plan):
                return generate_ids(ours, prompts, NO_EOS, pad, n)
        return run

    def peft_switch(prompts, n):
        outs = []
        for i, p in enumerate(prompts):
            peft_lora.set_adapter(names[i % E])
            outs += generate_ids(peft_lora, [p], NO_EOS, pad, n)
        return outs

    def peft_mixed_loop(prompts, n):
        return generate_ids(MixedBatch(peft_lora, [names[i % E] for i in range(len(prompts))]), prompts,
                            NO_EOS, pad, n)

    @torch.inference_mode()
    def peft_mixed_generate(prompts, n):
        ids = torch.tensor(prompts)  # all prompts have the same length: no padding
        out = peft_lora.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 adapter_names=[names[i % E] for i in range(len(prompts))],
                                 max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)
        return out[:, ids.shape[1]:].tolist()

    def peft_arrow_run(prompts, n):
        return generate_ids(peft_arrow, prompts, NO_EOS, pad, n)

    arrow = Arrow(top_k=k, temperature=args.temperature)
    methods = {"base": (base_run, plain), "ours top-1": (ours_run(routes_top1), ours)}
    if peft_lora is not None:
        methods.update({
            "PEFT switch": (peft_switch, peft_lora.get_base_model()),
            "PEFT mixed (loop)": (peft_mixed_loop, peft_lora.get_base_model()),
            "PEFT mixed (generate)": (peft_mixed_generate, peft_lora.get_base_model()),
        })
    methods.update({
        f"ours top-{k} mixture": (ours_run(routes_top4), ours),
        f"ours Arrow top-{k}": (ours_run(lambda b: [arrow] * b), ours),
    })
    if peft_arrow is not None:
        methods[f"PEFT Arrow top-{k}"] = (peft_arrow_run, peft_arrow.get_base_model())
    if args.skip_generate_api:
        methods.pop("PEFT mixed (generate)", None)
    if not args.skip_routed:
        methods.update(routed_methods(tok, dirs, names, Arrow(top_k=k, temperature=args.temperature), k))
    extra = {"ours": ours, "expert_set": expert_set, "peft_arrow": peft_arrow, "arrow": arrow, "k": k}
    return methods, extra


def run_generation(args, tok, dirs, names, watch: CpuWatch):
    methods, extra = build_methods(args, tok, dirs, names)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 40000, (args.requests, args.prompt_tokens), generator=gen).tolist()
    warm = [p[:8] for p in prompts[:2]]
    for name, (fn, _) in methods.items():  # warm-up (and PEFT Arrow builds its prototypes)
        log(f"warm-up: {name}")
        fn(warm, 2)
    clocks = {name: ForwardClock(model) for name, (_, model) in methods.items()}
    times = {name: [] for name in methods}
    split = {name: [] for name in methods}
    outputs = {}
    for rep in range(args.repeats):
        for name, (fn, _) in methods.items():
            clock = clocks[name]

            def once():
                for c in clocks.values():
                    c.reset()
                t0 = time.perf_counter()
                outs = fn(prompts, args.new_tokens)
                return outs, time.perf_counter() - t0

            (outs, dt), _ = watch.measure(f"repeat {rep + 1} {name}", once)
            assert all(len(o) == args.new_tokens for o in outs), f"{name}: not exactly {args.new_tokens} new tokens"
            times[name].append(dt)
            split[name].append((clock.prefill, clock.decode))
            outputs[name] = outs
            log(f"repeat {rep + 1}/{args.repeats}  {name:<24} {dt:7.2f} s  (prefill {clock.prefill:.2f} s, "
                f"decode {clock.decode:.2f} s)")
    for c in clocks.values():
        c.remove()
    prof = None if args.skip_profile else where_time_goes(args, methods, extra, prompts, watch)
    check = (arrow_match(prompts, extra, outputs, tok.pad_token_id, args.new_tokens)
             if extra["peft_arrow"] is not None else None)
    return times, split, outputs, check, extra["k"], prof


class LayerClock:
    """Wall time inside the multi-expert layers' own work: `RoutingPlan.apply` (everything the
    layers add to the base Linears) and, within it, Arrow's routing (`arrow.route_tokens`: scores,
    top-k, softmax); prompt and decode forwards apart. Installed by wrapping the two functions
    (trees without them are not profiled), removed by `remove`."""

    def __init__(self):
        from modulora.routing import arrow as arrow_mod
        from modulora.routing import layer as layer_mod

        self.plan_cls, self.arrow_mod = layer_mod.RoutingPlan, arrow_mod
        self.real = (self.plan_cls.apply, arrow_mod.route_tokens)
        self.reset()
        # plain functions (not bound methods) so the plan still arrives as the first argument
        self.plan_cls.apply = lambda plan, layer, x, y: self._apply(plan, layer, x, y)
        arrow_mod.route_tokens = lambda *args, **kwargs: self._route(*args, **kwargs)

    def reset(self) -> None:
        self.t = {"apply": [0.0, 0.0], "route": [0.0, 0.0]}  # [prompt, decode] seconds
        self.phase = 0

    def _apply(self, plan, layer, x, y):
        self.phase = 0 if x.dim() == 3 and x.shape[1] > 1 else 1
        t0 = time.perf_counter()
        try:
            return self.real[0](plan, layer, x, y)
        finally:
            self.t["apply"][self.phase] += time.perf_counter() - t0

    def _route(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.real[1](*args, **kwargs)
        finally:
            self.t["route"][self.phase] += time.perf_counter() - t0

    def remove(self) -> None:
        self.plan_cls.apply, self.arrow_mod.route_tokens = self.real


def multiply_adds(expert_set, k: int, head: int) -> dict[str, float]:
    """Per token, the expert products' multiply-adds over the adapted base Linears' (from the
    shapes): one expert, k experts, and Arrow as computed (every expert, plus the scores) and at
    its least (k experts, plus the scores). "read": a decode step's reads of every expert's weights
    (each method here uses all of them in a batch) over the weights the base model's step reads
    (the adapted Linears and the `head` parameters of the vocabulary projection), same dtype."""
    base = lora = scores = 0
    for m in expert_set.modules:
        out, d_in = expert_set.shape(m)
        base += out * d_in
        lora += expert_set.rank * (out + d_in)
        scores += len(expert_set) * d_in
    E = len(expert_set)
    return {"top-1": lora / base, f"top-{k}": k * lora / base, "arrow": (E * lora + scores) / base,
            "arrow least": (k * lora + scores) / base, "read": E * lora / (base + head)}


def where_time_goes(args, methods: dict, extra: dict, prompts, watch: CpuWatch) -> dict | None:
    """One more generation per method with the layers' work timed (LayerClock) beside the model's
    prompt and decode forwards (ForwardClock)."""
    try:
        clock = LayerClock()
    except AttributeError:  # a tree without RoutingPlan.apply / arrow.route_tokens
        return None
    k = extra["k"]
    head = methods["base"][1].get_output_embeddings().weight.numel()
    out = {"macs": multiply_adds(extra["expert_set"], k, head)}
    try:
        for name in ("base", "ours top-1", f"ours top-{k} mixture", f"ours Arrow top-{k}"):
            fn, model = methods[name]
            fclock = ForwardClock(model)

            def once(fn=fn, fclock=fclock):
                fclock.reset()
                clock.reset()
                fn(prompts, args.new_tokens)

            try:
                watch.measure(f"profile {name}", once)
            finally:
                fclock.remove()
            out[name] = {"prefill": fclock.prefill, "decode": fclock.decode, "apply": list(clock.t["apply"]),
                         "route": list(clock.t["route"])}
            log(f"profile {name}: {out[name]}")
    finally:
        clock.remove()
    return out


@torch.inference_mode()
def arrow_match(prompts, extra, outputs, pad: int, new_tokens: int) -> dict:
    """Ours vs PEFT's Arrow: generated ids and prefill logits, first with PEFT's own prototypes,
    then with PEFT's prototype buffers overwritten by ours (which isolates the routing and mixing
    arithmetic from how the prototypes were computed); and the prototypes themselves."""
    k = extra["k"]
    ours, expert_set, arrow, peft_arrow = extra["ours"], extra["expert_set"], extra["arrow"], extra["peft_arrow"]
    ours_ids = outputs[f"ours Arrow top-{k}"]
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    plan = RoutingPlan(expert_set, [arrow] * len(prompts), "mixture")
    with routing(ours, plan):
        lo, _ = forward(ours, ids, mask)

    def compare(peft_ids) -> dict:
        lp, _ = forward(peft_arrow, ids, mask)
        diff = (lo - lp).abs()
        return {
            "same_seq": sum(a == b for a, b in zip(ours_ids, peft_ids)) / len(ours_ids),
            "same_tok": sum(x == y for a, b in zip(ours_ids, peft_ids) for x, y in zip(a, b))
            / sum(map(len, ours_ids)),
            "first_diff": [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                           for a, b in zip(ours_ids, peft_ids)],
            "logit_max_abs": float(diff.max()), "logit_mean_abs": float(diff.mean()),
            "argmax_agree": float((lo.argmax(-1) == lp.argmax(-1)).float().mean()),
        }

    own = compare(outputs[f"PEFT Arrow top-{k}"])
    # PEFT's prototypes come from 15 power iterations from a random start, ours from an exact SVD
    inner = peft_arrow.get_base_model()
    ours_p = prototypes(expert_set)
    cos = []
    for m in expert_set.modules:
        buf = inner.get_submodule(m).lora_arrow["arrow_router"].prototypes
        cos.append(torch.nn.functional.cosine_similarity(buf.float(), ours_p[m], dim=-1).abs())
        buf.copy_(ours_p[m].to(buf))
    cos = torch.cat(cos)
    log("Arrow check: PEFT Arrow again with modulora's prototypes")
    shared = compare(generate_ids(peft_arrow, prompts, NO_EOS, pad, new_tokens))
    return {"own": own, "shared": shared, "logit_scale": float(lo.abs().max()),
            "proto_cos_min": float(cos.min()), "proto_cos_median": float(cos.median()),
            "proto_below_0999": float((cos < 0.999).float().mean())}


# ---------------------------------------------------------------------------------------------
# retrieval over a large library


def build_library(root: Path, size: int, embedder) -> tuple[Library, Path]:
    """A real Library of `size` tiny adapters (one rank-1 q_proj LoRA file, reused; a distinct card
    makes each a distinct object) with random unit retrieval vectors written straight into the
    derived-data cache, so no card needs embedding."""
    base = load_base(dtype="fp32")
    attach(base.model, AdapterConfig(type="lora", r=1, alpha=1.0, target_modules=("q_proj",)))
    template = save_adapter(base.model, root / "tiny")
    detach(base.model)
    lib = Library(root / "library")
    kind = f"{KIND_PREFIX}{embedder.id}"
    gen = torch.Generator().manual_seed(0)
    work = root / "work"
    work.mkdir()
    t0 = time.perf_counter()
    for i in range(size):
        d = work / f"a{i:04d}"
        d.mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            os.link(template / f, d / f)
        (d / "card.json").write_text(f'{{"description": "synthetic adapter {i}"}}')
        rec = lib.add(f"adapter-{i:04d}", d)
        v = torch.nn.functional.normalize(torch.randn(embedder.dim, generator=gen), dim=0)
        lib.put_derived(rec.object_id, kind, _encode_vector(v, embedder.id, 1))
        if (i + 1) % max(1, size // 10) == 0:
            log(f"library: {i + 1}/{size} adapters ({time.perf_counter() - t0:.1f} s)")
    return lib, template


def request_texts(n: int) -> tuple[list[str], list[str]]:
    """Short requests (the generated tasks' instruction + input) and long ones (about 128 tokens)."""
    tasks = [make_task(t, n=n, seed=1) for t in ("capital", "add", "upper", "acronym")]
    short = [f"{ex.instruction}\n{ex.input}" for i in range(n) for ex in [tasks[i % 4].examples[i]]]
    filler = ("Please read the following notes carefully before you answer, and keep the answer short. "
              "The notes describe a small task that a helpful assistant should be able to solve. ") * 3
    long = [f"{filler}{s}" for s in short]
    return short, long


def time_routes(router, texts, top_k) -> list[float]:
    out = []
    for t in texts:
        t0 = time.perf_counter()
        router.route([t], top_k=top_k)
        out.append(time.perf_counter() - t0)
    return out


def run_retrieval(args, root: Path, watch: CpuWatch) -> dict:
    from modulora.routing.embed import default_embedder

    embedder = default_embedder()
    log(f"retrieval: building a library of {args.library_size} adapters (embedder {embedder.id})")
    t0 = time.perf_counter()
    lib, template = build_library(root, args.library_size, embedder)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    router = RetrievalRouter(lib, embedder=embedder)
    index_s = time.perf_counter() - t0
    assert len(router.names) == args.library_size, router.names[:5]
    short, long = request_texts(args.retrieval_requests)
    threads0 = torch.get_num_threads()
    per = {(th, kind): [] for th in (1, 2) for kind in ("short", "long")}
    enc = {(th, kind): [] for th in (1, 2) for kind in ("short", "long")}
    for th in (1, 2):  # warm-up
        torch.set_num_threads(th)
        time_routes(router, short[:3] + long[:3], 4)
    for rep in range(args.repeats):
        for th in (1, 2):
            torch.set_num_threads(th)
            for kind, texts in (("short", short), ("long", long)):
                def group():
                    routes = time_routes(router, texts, 4)
                    encs = []
                    for t in texts[:10]:
                        s = time.perf_counter()
                        embedder.encode([t])
                        encs.append(time.perf_counter() - s)
                    return routes, encs

                (routes, encs), _ = watch.measure(f"retrieval {kind} {th} thread(s)", group)
                per[(th, kind)] += routes
                enc[(th, kind)] += encs
                log(f"repeat {rep + 1}/{args.repeats}  retrieval {kind:<5} {th} thread(s): "
                    f"{1000 * statistics.median(per[(th, kind)]):.1f} ms per request")
    torch.set_num_threads(threads0)

    # one more adapter: stored, then picked up by the next route (one embedding, no rebuild)
    samples = ["Translate the sentence into French: the cat sleeps on the mat.",
               "Translate the sentence into French: we are going to the market tomorrow.",
               "Translate the sentence into French: the weather is nice today."]
    query = "Translate the sentence into French: my brother reads a book."
    attempt = iter(range(1000))

    def add_one():
        i = next(attempt)  # a retry adds another adapter (a distinct card, so a distinct object)
        d = root / "work" / f"new{i}"
        d.mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            os.link(template / f, d / f)
        card = {"description": f"English to French translation ({i})", "samples": samples}
        (d / "card.json").write_text(json.dumps(card))
        before = statistics.median(time_routes(router, short[:10], 4))
        t0 = time.perf_counter()
        lib.add(f"adapter-new{i}", d)
        add_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        first = router.route([query], top_k=4)[0]
        first_s = time.perf_counter() - t0
        after = statistics.median(time_routes(router, short[:10], 4))
        return before, add_s, first, first_s, after, f"adapter-new{i}"

    (before, add_s, first, first_s, after, new_name), _ = watch.measure("adding one adapter", add_one)
    return {
        "size": args.library_size, "build_s": build_s, "index_s": index_s,
        "ms": {key: 1000 * statistics.median(v) for key, v in per.items()},
        "enc_ms": {key: 1000 * statistics.median(v) for key, v in enc.items()},
        "n": {key: len(v) for key, v in per.items()},
        "add_ms": 1000 * add_s, "first_ms": 1000 * first_s, "before_ms": 1000 * before, "after_ms": 1000 * after,
        "new_top1": next(iter(first)) == new_name, "new_in_index": new_name in router.names,
        "short_tokens": statistics.median(len(embedder.tokenizer(t)["input_ids"]) for t in short)
        if hasattr(embedder, "tokenizer") else None,
        "long_tokens": statistics.median(len(embedder.tokenizer(t)["input_ids"]) for t in long)
        if hasattr(embedder, "tokenizer") else None,
    }


# ---------------------------------------------------------------------------------------------
# report


def cpu_model() -> str:
    return next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), platform.processor())


def profile_section(prof: dict | None, k: int, experts: int) -> str:
    """Markdown: where the time of prefill and decode goes, per method (see `where_time_goes`)."""
    if prof is None:
        return ""
    macs = prof["macs"]
    want = {"ours top-1": f"{macs['top-1']:.1%}", f"ours top-{k} mixture": f"{macs[f'top-{k}']:.1%}",
            f"ours Arrow top-{k}": f"{macs['arrow']:.1%} ({macs['arrow least']:.1%} at the least)"}
    rows = []
    base = prof["base"]
    for name, p in prof.items():
        if name == "macs":
            continue
        pre, dec = p["prefill"], p["decode"]
        apply_p, apply_d = p["apply"]
        route_p, route_d = p["route"]
        rows.append([name, f"{pre:.2f}", f"{pre - base['prefill']:+.2f}", f"{apply_p:.2f} ({apply_p / pre:.0%})",
                     f"{route_p:.2f}" if route_p else "-", f"{dec:.2f}", f"{dec - base['decode']:+.2f}",
                     f"{apply_d:.2f} ({apply_d / dec:.0%})", f"{route_d:.2f}" if route_d else "-",
                     want.get(name, "0"), f"{macs['read']:.0%}" if name in want else "0"])
    return f"""
## Where the time goes

One more generation per method after the timed repeats (same setting, quiet machine), with the time
inside the multi-expert layers' own work measured: `RoutingPlan.apply`, everything the layers add to
the base Linears (index work, the expert products, Arrow's routing), and within it Arrow's routing
alone (`arrow.route_tokens`: scores against the prototypes, top-{k}, softmax). The rest of a routed
forward is the base model's own work. "Expert multiply-adds" are the products' multiply-adds per
token against the adapted base Linears' (q, k, v, o, gate, up, down; from the shapes): a row with one
expert of rank 8 adds 2.3%, with {k} experts {k} times that; Arrow picks {k} of {experts} experts per token
and module, but on a CPU the only efficient form of that is one masked product over all {experts} (two
GEMMs of rank {experts}x8 per module, the experts a token did not pick weighted 0), {experts // k} times the
arithmetic of its {k} picks; per-token gathers of the picked experts copy {k} experts' weights per
token, and sorting the token-expert pairs by expert gathers and scatters the activations of every
module; both cost more than the masked product at this batch size (bench/routing_layer_micro.py).
"Expert weights read per step" are the bytes of the experts' A and B that each decode step reads
(all {experts}: a batch of 16 rows with their own experts, or top-{k} of {experts} per row or token,
uses every one) over the bytes of the weights the base model's step reads (the adapted Linears and
the vocabulary projection). A decode step of 16 rows reads each weight once for 16 multiply-adds,
so its Linears are bound by memory traffic, and reading the experts costs about that share of their
time, however the products are arranged: at rank 8 on a 135M model the experts are large next to
the base (16 rank-8 experts on all linear layers of a 7B Llama are about 5% of its weights).

{table(["method", "prefill s", "vs base s", "layers' work s", "Arrow routing s", "decode s", "vs base s",
        "layers' work s", "Arrow routing s", "expert multiply-adds vs base Linears",
        "expert weights read per step vs the base's"], rows)}
"""


def report(args, times, split, outputs, check, k, ret, watch: CpuWatch, prof: dict | None = None) -> str:
    import peft
    import transformers

    med = {n: statistics.median(v) for n, v in times.items()}
    base = med["base"]
    gen_tokens = args.requests * args.new_tokens
    rows = []
    for n, t in med.items():
        pre = statistics.median(p for p, _ in split[n])
        dec = statistics.median(d for _, d in split[n])
        pre_ratio = pre / statistics.median(p for p, _ in split["base"])
        rows.append([n, f"{t:.2f}", f"{pre:.2f}", f"{dec:.2f}", f"{gen_tokens / t:.1f}",
                     f"{t / base:.2f}x", f"{base / t:.2f}x", f"{pre_ratio:.2f}x",
                     " ".join(f"{x:.2f}" for x in times[n])])
    top1, sw = med["ours top-1"], med.get("PEFT switch")
    top4 = med[f"ours top-{k} mixture"]
    oa, pa = med[f"ours Arrow top-{k}"], med.get(f"PEFT Arrow top-{k}")

    def met(ok):
        return "met" if ok else "**not met**"

    targets = [["ours top-1 (every request its own expert) time vs base", "<= 1.10x", f"{top1 / base:.2f}x",
                met(top1 / base <= 1.10)],
               [f"ours top-{k} mixture time vs base", "<= 1.20x", f"{top4 / base:.2f}x", met(top4 / base <= 1.20)],
               [f"ours Arrow top-{k} of {args.experts} time vs base", "<= 1.30x", f"{oa / base:.2f}x",
                met(oa / base <= 1.30)],
               ["ours top-1 throughput vs base", ">= 0.80x", f"{base / top1:.2f}x", met(base / top1 >= 0.8)]]
    if sw is not None:
        targets.append(["ours top-1 vs PEFT switching, throughput", ">= 3x", f"{sw / top1:.2f}x", met(sw / top1 >= 3)])
    targets.append([f"ours top-{k} mixture time vs ours top-1", "<= 1.5x", f"{top4 / top1:.2f}x",
                    met(top4 / top1 <= 1.5)])
    if pa is not None:
        targets.append([f"ours Arrow vs PEFT Arrow (top-{k} of {args.experts}), speed", ">= 2x", f"{pa / oa:.2f}x",
                        met(pa / oa >= 2)])
    if ret is not None:
        ms = ret["ms"]
        targets += [[f"retrieval over {ret['size']} adapters, per request, {th} thread{'s' if th > 1 else ''} "
                     "(short / long requests)", "< 20 ms", f"{ms[(th, 'short')]:.1f} / {ms[(th, 'long')]:.1f} ms",
                     met(max(ms[(th, 'short')], ms[(th, 'long')]) < 20)] for th in (1, 2)]
    diff_base = sum(x != y for a, b in zip(outputs["base"], outputs["ours top-1"]) for x, y in zip(a, b))
    same = {other: sum(a == b for a, b in zip(outputs["ours top-1"], outputs[other])) / args.requests
            for other in ("PEFT switch", "PEFT mixed (loop)", "PEFT mixed (generate)") if other in outputs}
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])
    def arrow_line(c):
        first = " ".join(str(i) if i is not None else "-" for i in c["first_diff"])
        return (f"{c['same_seq']:.0%} of the {args.requests} generated sequences identical, {c['same_tok']:.1%} of "
                f"the generated tokens (first differing position per sequence: {first}); prefill logits over "
                f"{args.requests} x {args.prompt_tokens} positions: max abs difference {c['logit_max_abs']:.2e}, mean "
                f"{c['logit_mean_abs']:.2e} (largest |logit| {check['logit_scale']:.1f}), argmax agreement "
                f"{c['argmax_agree']:.2%}.")

    busy = f"; KEPT ALTHOUGH BUSY: {', '.join(watch.flagged)}" if watch.flagged else ""
    tiny = " (QUICK SMOKE RUN: not the benchmark setting)" if args.quick else ""
    ret_rows = [[f"{th}", kind, f"{ret['ms'][(th, kind)]:.1f}", f"{ret['enc_ms'][(th, kind)]:.1f}",
                 f"{ret['ms'][(th, kind)] - ret['enc_ms'][(th, kind)]:.1f}", ret["n"][(th, kind)]]
                for th in (1, 2) for kind in ("short", "long")] if ret is not None else []
    text = f"""# Routing speed, SmolLM2-135M-Instruct{tiny}

Command: `{cmd}`

Hardware: {cpu_model()}, {args.threads} threads (torch.set_num_threads), {"fp32" if PRECISION["dtype"] == "fp32" else "bf16 weights"}; {os.cpu_count()} cores visible,
shared with other jobs (load average over 1 minute {args.load[0][0]:.2f} at the start, {args.load[1][0]:.2f}
at the end). Every measurement was taken on a quiet machine: before each, the script waited until other
processes used under {args.quiet_threshold} cores, and it measured again whenever they used more meanwhile
({watch.retries} measurements retaken, {watch.waited_s:.0f} s spent waiting; other processes' load during the kept
measurements: median {statistics.median(watch.accepted):.3f}, max {max(watch.accepted):.3f} cores{busy}). torch {torch.__version__}, transformers {transformers.__version__},
peft {peft.__version__}, Python {platform.python_version()}.

Setting: {args.experts} random LoRA experts of rank 8 (alpha 16) on all linear layers (q, k, v, o, gate,
up, down; lora_B ~ N(0, {args.b_std}), lora_A as modulora initialises it), a batch of {args.requests}
requests of exactly {args.prompt_tokens} prompt tokens (random token ids, no padding) and exactly
{args.new_tokens} greedy new tokens each (EOS ignored by every method). Median of {args.repeats} interleaved
repeats (every method once per repeat, in the order of the table), after one small warm-up call each.

## Generation

| what the methods are | |
|---|---|
| base | the base model alone, `modulora.generate.generate_ids` (the reference) |
| ours top-1 | every request a different expert, fixed routes `{{expert_i: 1.0}}`, one batched generation |
| PEFT switch | `PeftModel` with all adapters loaded; per request `set_adapter` then `generate_ids` on it alone |
| PEFT mixed (loop) | `PeftModel`, the whole batch, `adapter_names=[...]` passed to every forward of the same loop |
| PEFT mixed (generate) | `peft_model.generate(..., adapter_names=[...])` (transformers' generate, `min_new_tokens` = `max_new_tokens`) |
| ours top-{k} mixture | every request {k} experts, weights {', '.join(map(str, TOP4_WEIGHTS[:k]))} (output mixture) |
| ours Arrow top-{k} | `Arrow(top_k={k}, temperature={args.temperature})` for every request, per token and layer |
| PEFT Arrow top-{k} | `create_arrow_model` over the same adapter directories, `ArrowConfig(top_k={k}, router_temperature={args.temperature}, use_gks=False)` |
| routed ... | the same routes through `routing.batch.generate_routed` (the prompts decoded to text and rendered through the chat template, so a little longer; no end token): the engine where the tree has it |

Generated tokens/s counts the {gen_tokens} new tokens only; "time vs base" is the median time over the base's
(as in DESIGN.md, where PEFT measured mixed 1.98x, switching 5.99x, Arrow 4.00x), "throughput vs base" its
inverse. Prefill and decode are the summed times of the model's forwards with more than one token and with one.

{table(["method", "median s", "prefill s", "decode s", "gen tokens/s", "time vs base", "throughput vs base",
        "prefill vs base", "all repeats s"], rows)}

## Targets

{table(["target", "needed", "measured", "result"], targets)}
"""
    text += profile_section(prof, k, args.experts)
    if check is not None:
        text += f"""
## Output checks

- Ours Arrow vs PEFT Arrow, as benchmarked (each with its own prototypes): {arrow_line(check['own'])}
- Arrow prototypes: PEFT computes them by 15 power iterations from a random start, modulora by an exact
  SVD (QR + SVD of the r x r core); |cosine| between the two over every module and expert: min
  {check['proto_cos_min']:.4f}, median {check['proto_cos_median']:.6f}, {check['proto_below_0999']:.1%} below 0.999.
  Where they differ, the two pick different top-{k} experts for some tokens.
- Ours Arrow vs PEFT Arrow with PEFT's prototype buffers overwritten by modulora's (same routing
  inputs, so this checks the routing and mixing arithmetic): {arrow_line(check['shared'])}
- Ours top-1 vs PEFT with the same adapter, identical sequences: {', '.join(f'{n} {v:.0%}' for n, v in same.items())}.
- The experts do change the output: {diff_base} of {gen_tokens} tokens generated by ours top-1 differ from the base's.
"""
    if ret is not None:
        text += f"""
## Retrieval over a library of {ret['size']} adapters

A real `Library` with {ret['size']} small adapters added through `Library.add` (one rank-1 q_proj LoRA file
reused, a distinct card each), their retrieval vectors (random unit vectors) written straight into the
derived-data cache under `{KIND_PREFIX}<embedder id>` with `put_derived` (built in {ret['build_s']:.1f} s; the
router's index then loaded in {ret['index_s'] * 1000:.0f} ms). Timed: `RetrievalRouter.route([text], top_k=4)`,
one request at a time, after the index is built; "embed" is `embedder.encode([text])` alone, "rest" the
difference (catalog check for new adapters, scores, top-k). Short requests are the generated tasks'
instruction + input (median {ret['short_tokens']} MiniLM tokens), long ones the same with a filler
paragraph (median {ret['long_tokens']} tokens).

{table(["threads", "requests", "route ms / request", "embed ms", "rest ms", "requests timed"], ret_rows)}

Adding one adapter (the {ret['size'] + 1}st, with 3 card samples): `Library.add` {ret['add_ms']:.1f} ms; the first
`route` after it (catalog change seen, one `encode` of its 3 samples, vector cached with `put_derived`,
matrix restacked) {ret['first_ms']:.1f} ms, against {ret['before_ms']:.1f} ms per route before and
{ret["after_ms"]:.1f} ms after ({args.threads} threads, short requests). The new adapter is in the index:
{ret['new_in_index']}; a request like its samples routes to it first: {ret['new_top1']}.
"""
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: every model with bf16 weights (what serve loads on a CPU with AMX); results "
                         "go to routing_bf16.md")
    ap.add_argument("--temperature", type=float, default=1.0, help="Arrow temperature (both implementations)")
    ap.add_argument("--b-std", type=float, default=0.02, help="std of the random lora_B values")
    ap.add_argument("--library-size", type=int, default=1000)
    ap.add_argument("--retrieval-requests", type=int, default=40, help="distinct request texts per setting")
    ap.add_argument("--skip-generate-api", action="store_true", help="leave out PEFT mixed via peft_model.generate")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 experts, 4 requests of 16 + 4 tokens, "
                                                          "1 repeat, a library of 50")
    ap.add_argument("--quiet-threshold", type=float, default=0.15,
                    help="redo a measurement during which other processes used more cores than this")
    ap.add_argument("--max-tries", type=int, default=6, help="tries per measurement before keeping a busy one")
    ap.add_argument("--max-wait", type=float, default=600.0, help="seconds to wait for a quiet machine each time")
    ap.add_argument("--skip-peft", action="store_true", help="leave out every PEFT method (and the Arrow output check)")
    ap.add_argument("--skip-routed", action="store_true", help="leave out the generate_routed methods")
    ap.add_argument("--skip-retrieval", action="store_true", help="leave out the retrieval part")
    ap.add_argument("--skip-profile", action="store_true", help="leave out where the time goes")
    ap.add_argument("--json", default=None, help="also write the raw figures here (bench/before_after.py reads them)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.experts, args.requests, args.prompt_tokens, args.new_tokens = 4, 4, 16, 4
        args.repeats, args.library_size, args.retrieval_requests = 1, 50, 5
    if args.out:
        out = Path(args.out)
    elif args.quick:  # a smoke run must not overwrite the benchmark's results
        out = Path(tempfile.gettempdir()) / "modulora-routing-quick.md"
    else:
        out = Path(__file__).parent / "results" / ("routing.md" if args.dtype == "fp32" else f"routing_{args.dtype}.md")
    PRECISION["dtype"] = args.dtype
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    base = load_base(dtype="fp32")
    with tempfile.TemporaryDirectory(prefix="modulora-bench-routing-") as tmp:
        tmp = Path(tmp)
        log(f"making {args.experts} random LoRA experts")
        dirs = make_experts(base.model, tmp / "experts", args.experts, 8, args.b_std)
        names = [d.name for d in dirs]
        watch = CpuWatch(args.quiet_threshold, args.max_wait, args.max_tries)
        times, split, outputs, check, k, prof = run_generation(args, base.tokenizer, dirs, names, watch)
        ret = None if args.skip_retrieval else run_retrieval(args, tmp / "retrieval", watch)
    args.load = (load_before, os.getloadavg())
    if args.json:
        import modulora
        Path(args.json).write_text(json.dumps({
            "modulora": modulora.__file__, "torch": torch.__version__, "cpu": cpu_model(),
            "times": times, "prefill": {n: [p for p, _ in v] for n, v in split.items()},
            "decode": {n: [d for _, d in v] for n, v in split.items()}, "outputs": outputs,
            "retries": watch.retries, "waited_s": watch.waited_s, "others_load": watch.accepted,
            "flagged": watch.flagged, "args": {k: v for k, v in vars(args).items() if k != "load"}, "profile": prof,
        }))
    text = report(args, times, split, outputs, check, k, ret, watch, prof)
    text += f"\nWhole run: {time.perf_counter() - t_start:.0f} s.\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
