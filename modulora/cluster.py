"""Running the units of a build or an evaluation as Ray tasks (`--ray ADDRESS`).

The library catalog is a single-writer SQLite, so workers only compute: a unit sends back an
adapter's files (bytes) or a chunk's predictions through Ray's object store, and the driver
writes them, once, where a local run would. Ray places each unit by the resources it asks for
(num_cpus, num_gpus), reruns a unit whose worker process or node died (max_retries; a unit's own
error is not retried) and spreads the units over the nodes. `ray` is an optional extra
(`pip install 'modulora[ray]'`), imported here only, and only when a run asks for a cluster.

Every node needs modulora and the base model (the bundled SmolLM2, `tiny`, or a path that is
the same on every node); an evaluation that routes over a library also needs the library folder
at the same path on every node (workers open it read-only).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

EXTRA = "pip install 'modulora[ray]'"
# When set in the nodes' environment (before `ray start`), each unit touches <dir>/<unit>.<pid> as
# its work starts: where each unit runs, and a handle to kill one (the fault-tolerance test does).
PID_DIR_ENV = "MODULORA_RAY_PID_DIR"


class ClusterError(ValueError):
    """A run on a Ray cluster cannot start or did not finish; the message says why."""


@dataclass(frozen=True)
class RayOptions:
    """Where a build's or an evaluation's units run, and what each unit reserves there."""

    address: str = "auto"   # a running cluster: auto, HOST:PORT, or ray://HOST:10001 (Ray Client)
    num_cpus: float = 1.0   # Ray resources per unit; num_cpus is also the unit's torch threads
    num_gpus: float = 0.0   # > 0: a unit runs on the GPU Ray gives it; 0: on the CPU
    max_retries: int = 3    # reruns of a unit whose worker or node died (never of its own errors)

    def validate(self) -> None:
        if not isinstance(self.address, str) or not self.address.strip():
            raise ClusterError("--ray needs the address of a running Ray cluster (HOST:PORT, or auto)")
        for flag, value in (("--ray-cpus", self.num_cpus), ("--ray-gpus", self.num_gpus)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ClusterError(f"{flag} must be a number >= 0, got {value!r}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ClusterError(f"max_retries must be an integer >= 0, got {self.max_retries!r}")


@dataclass(frozen=True)
class WorkerBase:
    """How a unit loads the driver's base: by name, on the device its resources give it, checked
    against the driver's fingerprint (every node must hold the same model)."""

    name: str
    device: str
    dtype: str
    threads: int
    fingerprint: str
    serving: bool = False  # loaded as the driver's was (`load_base(serving=...)`)


def worker_base(base, device: str, dtype: str, options: RayOptions) -> WorkerBase:
    """The WorkerBase for a driver's loaded `base` and the device / dtype the user asked for."""
    from .base import BUNDLED
    from .tiny import tiny_family

    name = base.name
    if name != BUNDLED and tiny_family(name) is None and Path(name).exists():
        name = str(Path(name).resolve())  # a model folder or file: workers start in another directory
    return WorkerBase(name=name, device=unit_device(device, options), dtype=dtype,
                      threads=max(1, int(options.num_cpus)), fingerprint=base.fingerprint["id"],
                      serving=base.serving)


def unit_device(device: str, options: RayOptions) -> str:
    """A unit runs where its reservation is: on its GPU(s) when it reserved some, else on the CPU
    (a GPU the unit did not reserve belongs to another unit)."""
    device = str(device)
    if options.num_gpus > 0:
        return "cuda" if device == "auto" or device.startswith("cuda") else device
    if device.startswith("cuda"):
        raise ClusterError(f"--device {device} on a Ray cluster needs a GPU per unit: add --ray-gpus 1")
    return "cpu" if device == "auto" else device


def precision_of(compute) -> str:
    """The dtype name (bf16, fp16, fp32) a loaded base computes in, for units that load it again."""
    import torch

    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    return names.get(compute.autocast_dtype or compute.weights, "auto")


# -- on the workers --------------------------------------------------------------------------------

_BASES: dict[tuple, Any] = {}    # one loaded base per worker process, kept between its units
_ROUTERS: dict[str, Any] = {}    # library folder -> Router over that base


def load_worker_base(spec: WorkerBase):
    """The base a unit runs on, loaded once per worker process (Ray reuses workers)."""
    import torch

    torch.set_num_threads(spec.threads)  # as many threads as the unit reserved CPUs
    key = (spec.name, spec.device, spec.dtype, spec.serving)
    if key not in _BASES:
        from .base import load_base

        _BASES.clear()
        _ROUTERS.clear()
        _BASES[key] = load_base(spec.name, device=spec.device, dtype=spec.dtype, serving=spec.serving)
    base = _BASES[key]
    if base.fingerprint["id"] != spec.fingerprint:
        raise ClusterError(f"base {spec.name!r} on this node has fingerprint {base.fingerprint['id']}, the "
                           f"driver's has {spec.fingerprint}: every node must hold the same model files")
    return base


def _announce(unit: str) -> None:
    folder = os.environ.get(PID_DIR_ENV)
    if folder:
        Path(folder, f"{unit.replace(os.sep, '_')}.{os.getpid()}").touch()


def train_unit(spec: WorkerBase, task, adapter, cfg, name: str, data_hash: str) -> tuple[dict, dict[str, bytes]]:
    """Train one adapter on a worker with the function a local build uses; return its metrics and
    its files, which the driver writes. The unit works in a folder of the node's modulora home
    named for what it trains, so its checkpoints outlive a killed worker or driver: the same unit
    sent again (a retry, a rerun of the build) resumes from them; the folder goes once it is done."""
    from .train import train_adapter

    base = load_worker_base(spec)
    work = unit_folder(spec, task, adapter, cfg, name, data_hash)
    out = work / name  # the card records out.name: the same name as a local build's
    _announce(name)
    metrics = train_adapter(base, task, adapter, cfg, out, data_hash=data_hash, progress=False)
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}
    shutil.rmtree(work, ignore_errors=True)
    return metrics, files


def unit_folder(spec: WorkerBase, task, adapter, cfg, name: str, data_hash: str) -> Path:
    """<modulora home>/units/<digest of the unit's base, task, data and settings>."""
    from .base import home

    what = json.dumps([spec.fingerprint, spec.dtype, task.name, name, data_hash, asdict(adapter), cfg.settings()],
                      sort_keys=True, default=str)
    return home() / "units" / hashlib.sha256(what.encode()).hexdigest()[:20]


def eval_unit(spec: WorkerBase, library: str, method, task, rows: list[int], batch_size: int) -> list[dict]:
    """Score one chunk of a task's examples by one method, as a local evaluation's chunk."""
    from .evaluate import _run_chunk

    base = load_worker_base(spec)
    _announce(f"{method.name}.{task.name}.{rows[0]}")
    if library not in _ROUTERS:
        from .evaluate import _EmptyLibrary
        from .library import Library
        from .routing.api import Router

        _ROUTERS[library] = Router(base, Library(library, read_only=True) if library else _EmptyLibrary())
    return _run_chunk(_ROUTERS[library], method, task, rows, batch_size)


# -- on the driver ---------------------------------------------------------------------------------

def write_files_atomic(out: Path, files: dict[str, bytes]) -> Path:
    """Write a unit's adapter files as one directory, renamed into place like a local build's
    save (a crash leaves the old adapter or the new one, never half of one)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, data in files.items():
            if Path(name).name != name:
                raise ClusterError(f"a unit sent back a file with a path in its name: {name!r}")
            (tmp / name).write_bytes(data)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def import_ray():
    try:
        import ray
    except ImportError:
        raise ClusterError(f"--ray needs Ray, an optional extra: {EXTRA}") from None
    return ray


def check(options: RayOptions) -> None:
    """Every error --ray can meet before a model loads or a file is written: bad options, no ray
    installed, nothing listening at the address."""
    options.validate()
    import_ray()
    _check_reachable(options.address)


@contextlib.contextmanager
def connected(options: RayOptions):
    """Ray, connected to the cluster for the duration (an existing connection is kept as is)."""
    options.validate()
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    _check_reachable(options.address)
    try:
        ray.init(address=options.address, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as e:  # ConnectionError, or whatever a wrong address gives
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ClusterError(f"cannot connect to the Ray cluster at {options.address}: {first}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """ray.init retries an address where nothing listens for ever; a HOST:PORT gets one TCP try."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return  # auto, or a Ray Client address: Ray reports those itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}); start it with "
                           f"`ray start --head --port {port}` or give the address `ray start --head` printed") from None


def _warn_if_unplaceable(ray, options: RayOptions) -> None:
    """A unit no node can hold waits forever (or until an autoscaler adds a node): say so."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not any(r.get("CPU", 0) >= options.num_cpus and r.get("GPU", 0) >= options.num_gpus for r in nodes):
        print(f"warning: no node of the Ray cluster has {options.num_cpus:g} CPU(s) and {options.num_gpus:g} "
              "GPU(s) for a unit now; units wait until one joins", file=sys.stderr)


def _why(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def run_units(options: RayOptions, fn: Callable, units: list[tuple[Any, tuple, int]],
              on_result: Callable[[Any, Any], None], bar) -> dict[Any, str]:
    """Run fn(*args) for each (key, args, size) as a Ray task and call on_result(key, result) in
    the driver as each finishes, so the driver stays the only writer; `bar` advances by size.
    Arguments that several units share (an evaluation task's examples) go to the object store
    once. Returns {key: why} for the units that failed (after Ray's retries)."""
    if not units:
        return {}
    with connected(options) as ray:
        _warn_if_unplaceable(ray, options)
        remote = ray.remote(fn).options(num_cpus=options.num_cpus, num_gpus=options.num_gpus,
                                        max_retries=options.max_retries, retry_exceptions=False)
        shared_ids = {i for i, n in Counter(id(a) for _, args, _ in units for a in args).items() if n > 1}
        stored: dict[int, Any] = {}

        def arg(a):
            if id(a) not in shared_ids or isinstance(a, (str, int, float, bool, type(None))):
                return a
            if id(a) not in stored:
                stored[id(a)] = ray.put(a)
            return stored[id(a)]

        refs = {remote.remote(*map(arg, args)): (key, size) for key, args, size in units}
        failed: dict[Any, str] = {}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                key, size = refs[ref]
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as e:
                    failed[key] = _why(e)
                else:
                    on_result(key, result)
                bar.update(size)
        return failed


def train_on_cluster(options: RayOptions, spec: WorkerBase, jobs: list, adapter, bar) -> tuple[dict, dict]:
    """Train each job (name, task, cfg, path, data_hash) as a Ray task; the driver writes each
    adapter into its path as it arrives. Returns ({path: metrics}, {path: why it failed})."""
    done: dict[Path, dict] = {}

    def save(path: Path, result) -> None:
        metrics, files = result
        write_files_atomic(path, files)
        done[path] = metrics

    units = [(path, (spec, task, adapter, cfg, path.name, data_hash), 1) for _, task, cfg, path, data_hash in jobs]
    failed = run_units(options, train_unit, units, save, bar)
    return done, failed


__all__ = ["ClusterError", "PID_DIR_ENV", "RayOptions", "WorkerBase", "check", "connected", "eval_unit", "import_ray",
           "precision_of", "run_units", "train_on_cluster", "train_unit", "unit_device", "worker_base",
           "write_files_atomic"]
