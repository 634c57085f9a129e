"""Devices and precisions: one resolution for every command (modulora.compute), refused clearly
where this machine cannot give them; the engine runs under the base's autocast."""

import pytest
import torch

from modulora.base import BaseModelError, load_base
from modulora.cli import main
from modulora.compute import ComputeError, cpu_has_amx, cpu_has_bf16, resolve
from modulora.routing.arrow import Arrow
from modulora.routing.engine import Engine
from modulora.routing.experts import load_experts
from modulora.routing.requests import EngineRequest, SamplingParams


def test_a_cpu_precision_follows_what_the_base_is_for():
    """On a CPU: training keeps fp32 weights under bf16 autocast where bf16 is native; a base that
    only serves gets bf16 weights under `auto` where the CPU has AMX; a base that does both (the
    default) stays fp32, `bf16` meaning autocast."""
    both = resolve("cpu", "auto")
    assert both.weights == torch.float32 and both.autocast_dtype is None
    train = resolve("cpu", "auto", training=True)
    assert train.weights == torch.float32
    assert train.autocast_dtype == (torch.bfloat16 if cpu_has_bf16() else None)
    serve = resolve("cpu", "auto", serving=True)
    assert serve.weights == (torch.bfloat16 if cpu_has_amx() else torch.float32) and serve.autocast_dtype is None
    assert resolve("cpu", "bf16", serving=True).describe() == "cpu bf16"
    assert resolve("cpu", "fp32", serving=True).describe() == "cpu fp32"
    assert resolve("cpu", "bf16", training=True, serving=True).describe() == "cpu fp32 (bf16 autocast)"
    assert load_base("tiny").compute.describe() == "cpu fp32"
    assert resolve("cpu", "bf16").autocast_dtype == torch.bfloat16
    assert resolve("cpu", "fp32").autocast_dtype is None and resolve("cpu", "fp32").describe() == "cpu fp32"
    assert resolve("cpu", "bf16").describe() == "cpu fp32 (bf16 autocast)"
    assert resolve("auto", "fp32").device.type == ("cuda" if torch.cuda.is_available() else
                                                    "mps" if torch.backends.mps.is_available() else "cpu")


def test_a_serving_base_in_bf16_answers_a_mixed_batch_as_each_request_alone(random_library, tmp_path):
    """bf16 weights on a CPU (what `modulora serve` loads on a CPU with AMX; prompts multiply their
    experts in bf16 too): fixed and mixed routes batched together give each request's own tokens;
    an Arrow row agrees until bf16 rounding, which differs with the batch's shape, tips a near tie
    of this random model; log-probabilities agree within bf16 rounding up to there; the forwards
    really ran with bf16 weights."""
    lib = random_library(tmp_path, ("a", "b", "c"))
    base = load_base("tiny", device="cpu", dtype="bf16", serving=True)
    assert base.serving and next(base.model.parameters()).dtype == torch.bfloat16
    eng = Engine(base)
    eng.use_experts(load_experts(lib, fingerprint=base.fingerprint))
    jobs = [("hello there", {"a": 1.0}), ("Peru", {"b": 1.0}), ("12 + 30", Arrow(top_k=2)), ("x y", None),
            ("apple", {"a": 0.5, "c": 0.5})]
    make = lambda p, r: EngineRequest(p, r, params=SamplingParams(max_tokens=8, logprobs=1))  # noqa: E731
    alone = [eng.run([make(p, r)])[0] for p, r in jobs]
    together = eng.run([make(p, r) for p, r in jobs])
    for (_, route), a, b in zip(jobs, alone, together):
        ta, tb = a.samples[0].token_ids, b.samples[0].token_ids
        if not isinstance(route, Arrow):
            assert ta == tb
        same = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta))
        assert same >= 1
        lps = zip(a.samples[0].logprobs[:same], b.samples[0].logprobs[:same])
        assert max(abs(x.logprob - y.logprob) for x, y in lps) < 0.3  # bf16, and these random LoRAs dominate
    assert len({tuple(a.samples[0].token_ids) for a in alone}) > 1  # the routes do answer differently
    eng.release()


@pytest.mark.parametrize("device,dtype,words", [
    ("cpu", "fp16", "fp16 is for GPUs"),
    ("cpu", "int8", "unknown dtype"),
    ("tpu", "auto", "unknown device"),
    ("cuda:7", "auto", "cuda"),
    ("mps", "auto", "MPS"),
])
def test_what_the_machine_cannot_give_is_refused_by_name(device, dtype, words):
    if device.startswith("cuda") and torch.cuda.device_count() > 7 or device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has that device")
    with pytest.raises(ComputeError, match=words):
        resolve(device, dtype)


def test_the_cli_refuses_a_missing_gpu_in_one_line(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    rc = main(["--library", str(tmp_path / "lib"), "generate", "--base", "tiny", "--base-only", "--prompt", "hi",
               "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "no CUDA GPU" in err[0]
    with pytest.raises(SystemExit):  # argparse names the choices
        main(["generate", "--base", "tiny", "--base-only", "--prompt", "hi", "--dtype", "fp8"])


def test_the_engine_runs_under_the_bases_autocast():
    """bf16 autocast on a CPU: the same greedy text as fp32 on the tiny model, log-probabilities
    close, and the forwards really ran in bf16."""
    exact, fast = load_base("tiny", dtype="fp32"), load_base("tiny", device="cpu", dtype="bf16")
    assert fast.compute.autocast_dtype == torch.bfloat16 and fast.fingerprint == exact.fingerprint
    seen = []
    hook = fast.model.lm_head.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    req = lambda: EngineRequest("Peru is", None, params=SamplingParams(max_tokens=6, logprobs=1))  # noqa: E731
    a, b = Engine(exact).run([req()])[0], Engine(fast).run([req()])[0]
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert len(a.token_ids) == len(b.token_ids)
    diffs = [abs(x.logprob - y.logprob) for x, y in zip(a.samples[0].logprobs, b.samples[0].logprobs)
             if x.token == y.token]
    assert diffs and max(diffs) < 0.1


def test_load_base_refuses_bad_precision_as_a_base_model_error():
    with pytest.raises(BaseModelError, match="fp16 is for GPUs"):
        load_base("tiny", device="cpu", dtype="fp16")
