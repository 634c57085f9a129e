"""Devices and precisions: one resolution for every command (modulora.compute), refused clearly
where this machine cannot give them; the engine runs under the base's autocast."""

import pytest
import torch

from modulora.base import BaseModelError, load_base
from modulora.cli import main
from modulora.compute import ComputeError, cpu_has_bf16, resolve
from modulora.routing.engine import Engine
from modulora.routing.requests import EngineRequest, SamplingParams


def test_a_cpu_keeps_fp32_weights_and_autocasts_bf16_for_training_where_it_is_native():
    """`auto` on a CPU: generation in fp32 (autocast's per-forward weight cast makes decode steps
    slower), training under bf16 autocast where the CPU has native bf16."""
    auto = resolve("cpu", "auto")
    assert auto.weights == torch.float32 and auto.autocast_dtype is None
    train = resolve("cpu", "auto", training=True)
    assert train.weights == torch.float32
    assert train.autocast_dtype == (torch.bfloat16 if cpu_has_bf16() else None)
    assert load_base("tiny").compute.describe() == "cpu fp32"
    assert resolve("cpu", "bf16").autocast_dtype == torch.bfloat16
    assert resolve("cpu", "fp32").autocast_dtype is None and resolve("cpu", "fp32").describe() == "cpu fp32"
    assert resolve("cpu", "bf16").describe() == "cpu fp32 (bf16 autocast)"
    assert resolve("auto", "fp32").device.type == ("cuda" if torch.cuda.is_available() else
                                                    "mps" if torch.backends.mps.is_available() else "cpu")


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
