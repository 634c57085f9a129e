"""Building and evaluating on a real local Ray cluster: a head node and a second node joining it,
both on 127.0.0.1, each with one CPU. Tiny models only.

The cluster runs from a temp dir of its own under /tmp (short: Ray's socket paths must fit), on
free ports, each node in its own process group; the finalizer kills those groups (by id: `ray
stop` would stop every Ray cluster of this user on the machine).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from modulora.adapters import AdapterConfig, read_adapter
from modulora.build import build_library
from modulora.cluster import PID_DIR_ENV, ClusterError, RayOptions
from modulora.library import Library
from modulora.tasks import make_task, write_jsonl
from modulora.train import TrainConfig

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="ray is not installed (pip install 'modulora[ray]')")

TRAIN = TrainConfig(batch_size=4, max_length=48, lr=1e-2, dtype="fp32", holdout=4)
ADAPTER = AdapterConfig(type="lora", r=2, alpha=4.0, target_modules=("q_proj", "v_proj"))
STEPS = 150  # about 1.5 s of training per unit here: long enough to be killed in the middle
TASKS = {"upper_a": ("upper", 0), "upper_b": ("upper", 1), "add_a": ("add", 0), "add_b": ("add", 1),
         "capital": ("capital", 0), "acronym": ("acronym", 0)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_thread():
    """Local runs use the threads a unit with one CPU uses, so the float sums happen in one order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster():
    """(address, pid dir): a head node and a second node on 127.0.0.1, one CPU each."""
    root = Path(tempfile.mkdtemp(prefix="mray", dir="/tmp"))
    pids = root / "pids"
    pids.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({PID_DIR_ENV: str(pids), "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(root),
                "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    ray_cli = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0",
              "--object-store-memory", str(100 << 20), "--disable-usage-stats"]
    head = [ray_cli, "start", "--head", "--port", str(port), "--temp-dir", str(root), "--include-dashboard=false",
            "--dashboard-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port())] + common
    worker = [ray_cli, "start", "--address", address, "--dashboard-agent-listen-port", str(_free_port())] + common
    groups = []
    try:
        for cmd in (head, worker):
            proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            groups.append(proc.pid)  # `ray start` leads its own group; the daemons it starts stay in it
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, out[-3000:]
        _wait_for_nodes(address, 2)
        yield address, pids
    finally:
        for pgid in groups:
            _kill_group(pgid)
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_nodes(address: str, n: int, timeout: float = 60) -> None:
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    try:
        deadline = time.time() + timeout
        while sum(1 for node in ray.nodes() if node.get("Alive")) < n:
            assert time.time() < deadline, f"the Ray cluster at {address} has not {n} nodes after {timeout} s"
            time.sleep(0.2)
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray-tasks")
    for name, (kind, seed) in TASKS.items():
        write_jsonl(make_task(kind, n=24, seed=seed), d / f"{name}.jsonl")
    return d


def _same_adapters(a: Path, b: Path) -> None:
    _, ta, _ = read_adapter(a)
    _, tb, _ = read_adapter(b)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert torch.equal(ta[key], tb[key]), f"{a.name}: {key} differs by {(ta[key] - tb[key]).abs().max()}"


class KillFirstUnit(threading.Thread):
    """SIGKILLs the worker of the first unit that starts training (its pid file appears)."""

    def __init__(self, pids: Path):
        super().__init__(daemon=True)
        self.pids, self.killed, self.stop = pids, None, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.killed is None:
            for f in sorted(self.pids.iterdir()):
                unit, pid = f.name.rsplit(".", 1)
                os.kill(int(pid), signal.SIGKILL)
                self.killed = (unit, int(pid))
                return
            time.sleep(0.01)


@needs_ray
@pytest.mark.slow
def test_build_on_ray_survives_a_killed_worker_and_equals_a_local_build(tiny, cluster, task_dir, tmp_path):
    address, pids = cluster
    with one_thread():
        local = build_library(tiny, task_dir, tmp_path / "local", Library(tmp_path / "local-lib"), steps=STEPS,
                              adapter=ADAPTER, train=TRAIN, progress=False)
    killer = KillFirstUnit(pids)
    killer.start()
    lib = Library(tmp_path / "lib")
    options = RayOptions(address=address, num_cpus=1, max_retries=3)
    try:
        s = build_library("tiny", task_dir, tmp_path / "out", lib, steps=STEPS, adapter=ADAPTER, train=TRAIN,
                          progress=False, ray=options)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None, "no unit started"
    unit, pid = killer.killed
    runs = sorted(int(f.name.rsplit(".", 1)[1]) for f in pids.iterdir() if f.name.rsplit(".", 1)[0] == unit)
    assert pid in runs and len(runs) >= 2, f"unit {unit} was not run again after its worker was killed: {runs}"
    names = sorted(TASKS)
    assert sorted(s["trained"]) == names and s["reused"] == []
    assert [a["name"] for a in s["adapters"]] == [a["name"] for a in local["adapters"]]  # task order, as locally
    assert [r.name for r in lib.list()] == names and all(r.version == 1 for r in lib.list())
    for name in names:
        _same_adapters(Library(tmp_path / "local-lib").get(name).path, lib.get(name).path)
        assert lib.get(name).card["train_config"] == Library(tmp_path / "local-lib").get(name).card["train_config"]
    assert not list((tmp_path / "out" / "adapters").glob(".*"))  # no temp dirs left behind

    # resumable: a rerun finds every adapter in the build folder and submits nothing
    started = len(list(pids.iterdir()))
    again = build_library("tiny", task_dir, tmp_path / "out", lib, steps=STEPS, adapter=ADAPTER, train=TRAIN,
                          progress=False, ray=options)
    assert again["trained"] == [] and sorted(again["reused"]) == names and len(list(pids.iterdir())) == started
    assert all(r.version == 1 for r in lib.list())


def test_a_unit_sent_again_after_a_crash_resumes_from_its_checkpoints(tiny, tmp_path, monkeypatch, crash_training_at):
    """A training unit keeps its checkpoints in the node's modulora home: sent again after it died
    (Ray's retry, or a rerun of the build once the driver was killed) it resumes, and gives the
    adapter an uninterrupted unit gives; its folder goes once it is done. No cluster is needed:
    this is the function each Ray task runs."""
    from safetensors.torch import load

    from modulora import cluster

    monkeypatch.setenv("MODULORA_HOME", str(tmp_path / "home"))
    spec = cluster.WorkerBase(name="tiny", device="cpu", dtype="fp32", threads=1, fingerprint=tiny.fingerprint["id"])
    task = make_task("add", n=48)
    cfg = TrainConfig(steps=8, batch_size=4, max_length=48, lr=1e-3, dtype="fp32", holdout=0, checkpoint_every=3)
    adapter = AdapterConfig(type="lora", r=4, alpha=8, dropout=0.1)
    folder = cluster.unit_folder(spec, task, adapter, cfg, "add", "h")
    with one_thread():
        _, whole = cluster.train_unit(spec, task, adapter, cfg, "add", "h")
        assert not folder.exists()
        with crash_training_at(7), pytest.raises(RuntimeError):
            cluster.train_unit(spec, task, adapter, cfg, "add", "h")
        assert json.loads((folder / "add.ckpt" / "state.json").read_text())["step"] == 6
        metrics, files = cluster.train_unit(spec, task, adapter, cfg, "add", "h")
    assert metrics["resumed_from"] == 6 and not folder.exists()
    assert files.keys() == whole.keys()
    a, b = load(whole["adapter_model.safetensors"]), load(files["adapter_model.safetensors"])
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    other = cluster.unit_folder(spec, task, adapter, dataclasses.replace(cfg, steps=9), "add", "h")
    assert other != folder  # other settings: another folder, never a checkpoint of this one


@needs_ray
@pytest.mark.slow
def test_mbc_on_ray_equals_a_local_mbc_build(tiny, cluster, task_dir, tmp_path):
    address, _ = cluster
    kw = dict(mode="mbc", clusters=3, steps=6, mbc_steps=6, adapter=ADAPTER, train=TRAIN, progress=False)
    with one_thread():
        local = build_library(tiny, task_dir, tmp_path / "local", Library(tmp_path / "local-lib"), **kw)
    lib = Library(tmp_path / "lib")
    s = build_library("tiny", task_dir, tmp_path / "out", lib, ray=RayOptions(address=address), **kw)
    assert s["clusters"] == local["clusters"] and len(s["trained"]) == len(TASKS) + 3
    for task in TASKS:
        _same_adapters(tmp_path / "local" / "mbc" / task, tmp_path / "out" / "mbc" / task)
    for cname in local["clusters"]:
        _same_adapters(Library(tmp_path / "local-lib").get(cname).path, lib.get(cname).path)
        assert lib.get(cname).card["cluster_tasks"] == local["clusters"][cname]


@needs_ray
@pytest.mark.slow
def test_eval_on_ray_equals_a_local_eval(tiny, cluster, task_dir, tmp_path):
    from modulora.evaluate import Method, evaluate, prepare_task

    address, _ = cluster
    lib = Library(tmp_path / "lib")
    build_library(tiny, task_dir, tmp_path / "build", lib, steps=20, adapter=ADAPTER, train=TRAIN, progress=False)
    tasks = [prepare_task(task_dir / f"{n}.jsonl", n=6, max_new_tokens=4) for n in ("upper_a", "add_a")]
    methods = [Method("base"), Method("upper_a", "upper_a"), Method("arrow", "arrow", top_k=2)]
    with one_thread():
        local = evaluate(tiny, tasks, methods, tmp_path / "local", library=str(lib.root), batch_size=4,
                         progress=False, plots=False)
    remote = evaluate(tiny, tasks, methods, tmp_path / "ray", library=str(lib.root), batch_size=4, progress=False,
                      plots=False, ray=RayOptions(address=address))
    assert remote.scores == local.scores and remote.routing == local.routing
    key = lambda r: (r["method"], r["task"], r["id"])  # noqa: E731
    assert sorted(remote.predictions, key=key) == sorted(local.predictions, key=key)
    lines = (tmp_path / "ray" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 12  # each prediction written once, by the driver


def test_without_ray_the_flag_names_the_extra(tmp_path, task_dir, monkeypatch, capsys):
    """Without ray installed, --ray is one clear error naming the extra, before any model loads;
    the default commands never import ray."""
    from modulora import cli

    r = subprocess.run([sys.executable, "-c", "import sys, modulora.cli, modulora.build, modulora.evaluate, "
                        "modulora.cluster; print('ray' in sys.modules)"], capture_output=True, text=True)
    assert r.stdout.strip() == "False", r.stderr
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ClusterError, match=r"pip install 'modulora\[ray\]'"):
        build_library("no-such-base", task_dir, tmp_path / "out", steps=1, progress=False,
                      ray=RayOptions(address="127.0.0.1:1"))
    code = cli.main(["--library", str(tmp_path / "lib"), "build", "--data", str(task_dir), "--out",
                     str(tmp_path / "out"), "--base", "no-such-base", "--ray", "127.0.0.1:1"])
    assert code == 2 and "modulora[ray]" in capsys.readouterr().err
    with pytest.raises(ClusterError, match="--ray-gpus"):
        RayOptions(num_gpus=-1).validate()


def test_a_read_only_library_reads_but_never_writes(tmp_path, tiny, random_lora):
    """What eval workers open: records and files readable, derived data refused (so routers
    compute it again rather than cache it), and no folder created where there is no library."""
    from modulora.library import LibraryError
    from modulora.routing.experts import cache_derived

    lib = Library(tmp_path / "lib")
    lib.add("a", random_lora(tiny.model, tmp_path / "a", 0, tiny.fingerprint), tiny.fingerprint)
    before = sorted(p.name for p in (tmp_path / "lib").iterdir())
    ro = Library(tmp_path / "lib", read_only=True)
    assert ro.read_only and [r.name for r in ro.list()] == ["a"] and ro.get("a").path.is_dir()
    oid = ro.get("a").object_id
    with pytest.raises(LibraryError, match="read-only"):
        ro.put_derived(oid, "x", b"1")
    cache_derived(ro, oid, "x", b"1")  # a router's cache write: skipped, not an error
    assert lib.get_derived(oid, "x") is None
    assert sorted(p.name for p in (tmp_path / "lib").iterdir()) == before
    with pytest.raises(LibraryError, match="no library"):
        Library(tmp_path / "none", read_only=True)
    assert not (tmp_path / "none").exists()


@needs_ray
@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixed", "zeroshot"])
def test_an_experiment_on_ray_equals_the_local_one(cluster, tmp_path, name):
    """`modulora experiment NAME --quick --ray`: the libraries built (zeroshot: MBC, the oracles and
    the general LoRA too) and the methods scored on the cluster give a local run's numbers."""
    from test_experiments import DATA

    from modulora.cli import main

    if not (DATA / "sni").is_dir():
        pytest.skip(f"shared data folder not found at {DATA}")
    scores = {}
    for where, extra in (("local", []), ("ray", ["--ray", cluster[0]])):
        with one_thread():
            assert main(["experiment", name, "--quick", "--data", str(DATA), "--work", str(tmp_path / where),
                         "--no-progress", *extra]) == 0
        scores[where] = json.loads((tmp_path / where / "quick" / "results" / name / "results.json").read_text())
    assert scores["ray"]["scores"] == scores["local"]["scores"]
    assert scores["ray"]["routing"] == scores["local"]["routing"]
