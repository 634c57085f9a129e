"""Where a base model runs and in what precision: one answer for every command.

    compute = resolve("auto", "auto")   # CUDA -> bf16 weights (fp16 where bf16 is missing);
                                        # Apple MPS -> fp16; a CPU -> fp32
    with compute.autocast():            # what evaluation and the engine run under
        ...

On a GPU the weights themselves are bf16/fp16 (half the memory, the tensor cores' native types).
On a CPU it depends on what the base is for:

- training (`training=True`): fp32 weights, and `auto` / `bf16` train under bf16 autocast where
  the CPU has native bf16 (AVX512-BF16 or AMX): 1.4x faster steps, the residual stream in fp32;
- serving (`serving=True`: a base that only generates, as `modulora serve`, `generate` and `eval`
  load it): `auto` means bf16 weights on CPUs with AMX, `bf16` means bf16 weights anywhere. AMX
  multiplies bf16 matrices 3-5x faster than fp32 ones from a dozen rows on (bench/results/precision.md);
  autocast would re-cast the fp32 weights in every forward, which made serving slower (0.45x);
- both (the default: a base that trains and then evaluates, as the experiments use it): fp32,
  `bf16` meaning autocast, so its evaluation matches what it was trained in.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = ("auto", "bf16", "fp16", "fp32")
_TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_NAMES = {v: k for k, v in _TORCH.items()}


class ComputeError(ValueError):
    """A device or precision that this machine or this torch cannot give."""


@dataclass(frozen=True)
class Compute:
    """A device, the dtype of the base's weights there, and the dtype autocast computes in
    (None: no autocast)."""

    device: torch.device
    weights: torch.dtype = torch.float32
    autocast_dtype: torch.dtype | None = None

    def autocast(self):
        """The context the model's forwards run in (a no-op without autocast)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        """`cpu fp32 (bf16 autocast)`, `cuda:0 bf16`: for logs and result files."""
        text = f"{self.device} {_NAMES.get(self.weights, str(self.weights))}"
        return text + (f" ({_NAMES[self.autocast_dtype]} autocast)" if self.autocast_dtype is not None else "")


CPU_FP32 = Compute(torch.device("cpu"))


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls (AVX512-BF16 or AMX) make autocast faster; without them it is slower."""
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def cpu_has_amx() -> bool:
    """AMX tiles (Intel Xeon from Sapphire Rapids on): bf16 matrix products several times faster
    than fp32 ones; only AMX was measured to pay off for bf16 weights in generation."""
    return "amx_bf16" in _cpu_flags()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` (CUDA, else MPS, else the CPU), `cpu`, `cuda`, `cuda:N` or `mps`, checked against
    what this torch and machine have."""
    text = str(device)
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise ComputeError(f"unknown device {text!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ComputeError(f"device {text!r}: no CUDA GPU is available (this torch {torch.__version__} is "
                               f"{build}); use --device cpu")
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ComputeError(f"device {text!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        return torch.device("cuda", index)
    if dev.type == "mps" and not _mps_available():
        raise ComputeError(f"device {text!r}: Apple's MPS backend is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ComputeError(f"device {text!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return dev


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve(device: str | torch.device = "auto", dtype: str | torch.dtype = "auto", training: bool = False,
            serving: bool = False) -> Compute:
    """The Compute for a device and a precision (`auto`, `bf16`, `fp16`, `fp32`, or a torch dtype);
    on a CPU, `training` / `serving` say what the base is for (see the module's docstring)."""
    dev = resolve_device(device)
    name = _NAMES.get(dtype, dtype) if isinstance(dtype, torch.dtype) else {"float32": "fp32", "bfloat16": "bf16",
                                                                           "float16": "fp16"}.get(dtype, dtype)
    if name not in DTYPES:
        raise ComputeError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if dev.type == "cpu":
        if name == "fp16":
            raise ComputeError("fp16 is for GPUs; on a CPU use bf16 (autocast) or fp32")
        if serving and not training:
            bf16 = name == "bf16" or (name == "auto" and cpu_has_amx())
            return Compute(dev, torch.bfloat16 if bf16 else torch.float32, None)
        use_bf16 = name == "bf16" or (name == "auto" and training and cpu_has_bf16())
        return Compute(dev, torch.float32, torch.bfloat16 if use_bf16 else None)
    if name == "auto":
        bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
        name = "bf16" if bf16 else "fp16"
    return Compute(dev, _TORCH[name], None)


__all__ = ["Compute", "ComputeError", "CPU_FP32", "DTYPES", "cpu_has_amx", "cpu_has_bf16", "resolve", "resolve_device"]
