"""Serving benchmark: `modulora serve` as a real process on SmolLM2, clients over HTTP on 127.0.0.1.

1. Throughput and latency with 1, 4 and 16 concurrent clients, each client asking for a different
   adapter of the library (cycled), chat completions with short demo-task prompts, max_tokens 16;
   each client sends requests in a loop for `--seconds` per level.
2. Soak: 16 clients for `--soak-seconds` while an adapter (exported from the library) is uploaded
   under rotating names and older copies are deleted, plus a few deliberately bad requests (counted
   apart); then failed requests, the server's peak RSS and the library's integrity.

3. Sampling (where the server samples: `--extras`, on by default): 16 clients as in 1, once with
   temperature 0.7, top_p 0.9 and once with that and n=4 (four samples per request); requests/s,
   completions/s and generated tokens/s next to the greedy run's.

Every level is measured on a quiet machine (the CpuWatch of bench/routing.py, with the server's CPU
time counted as ours): it waits until other processes use under `--quiet-threshold` cores and
measures a level again when they used more meanwhile.

The server is started as `python -m modulora.cli` with this interpreter, from a temporary working
directory, so that PYTHONPATH decides which modulora runs (bench/before_after.py runs this script
on the code before the engine too). Every request is a chat completion with one user message: the
same token sequence on both servers (the old one rendered the last user message through the chat
template, the new one renders the message list).

The server works on a COPY of the library (the original is untouched). Writes bench/results/serve.md.

    python bench/serve.py [--library /tmp/mh/demo/library] [--seconds 40] [--soak-seconds 300] [--quick]
    python bench/serve.py --levels 1,16 --seconds 20 --soak-seconds 0 --no-extras --json F   # before/after
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version as pkg_version
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from routing import CpuWatch  # noqa: E402  (bench/routing.py: the quiet-machine wait)

from modulora.library import Library
from modulora.report import table
from modulora.tasks import make_task
from modulora.data import user_text

TASK_OF = {"capital": "capital", "capital2": "capital", "add": "add", "upper": "upper", "acronym": "acronym"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(lib_path: Path, cwd: Path, log_path: Path,
                 extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str, float]:
    """`modulora serve` on a free port of 127.0.0.1 as a subprocess of this interpreter, run from
    `cwd` (so that PYTHONPATH decides which modulora runs), its output in `log_path`; returns once
    /health answers 200: (process, URL, seconds to start). Exits when the server dies first."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cli = [sys.executable, "-m", "modulora.cli"]
    t_start = time.perf_counter()
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        server = subprocess.Popen(cli + ["--library", str(lib_path), "serve", "--port", str(port),
                                         "--log-level", "warning", *extra],
                                  stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    while True:
        if server.poll() is not None:
            raise SystemExit(f"server exited: {Path(log_path).read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    startup = time.perf_counter() - t_start
    print(f"server up in {startup:.1f} s (pid {server.pid}, port {port})", flush=True)
    return server, url, startup


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM (uvicorn's graceful stop), then SIGKILL after 60 s."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def prompts_for(name: str, task: str | None) -> list[str]:
    t = make_task(task or "capital", n=40, seed=1)
    return [user_text(ex) for ex in t.examples]


def proc_status(pid: int, key: str) -> int:
    """A /proc/PID/status field in KiB (0 once the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out = {}
    for key in ("modulora_batch_size_sum", "modulora_batch_size_count", "modulora_generated_tokens_total",
                "modulora_batches_total", "modulora_decode_batch_size_sum", "modulora_decode_batch_size_count"):
        m = re.search(rf"^{key} (\S+)$", text, re.M)
        out[key] = float(m.group(1)) if m else 0.0
    return out


def delta_mean(before: dict, after: dict, name: str) -> float:
    """The mean of histogram `name` over the observations between two /metrics reads."""
    n = after[f"{name}_count"] - before[f"{name}_count"]
    return (after[f"{name}_sum"] - before[f"{name}_sum"]) / n if n else 0.0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


class Client(threading.Thread):
    """Chat completions in a loop until `stop_at`, cycling through the adapters from `first` (so
    that every level sends the same mix of adapters and prompts, whatever its number of clients);
    records latency, tokens, failures."""

    def __init__(self, url: str, names: list[str], prompts: dict[str, list[str]], first: int, stop_at: float,
                 max_tokens: int, extra: dict | None = None):
        super().__init__(daemon=True)
        self.url, self.names, self.prompts, self.first = url, names, prompts, first
        self.stop_at, self.max_tokens = stop_at, max_tokens
        self.used: set[str] = set()
        self.extra = extra or {}
        self.latencies: list[float] = []
        self.tokens = 0
        self.completions = 0  # choices received (n per request)
        self.failures: list[str] = []

    def run(self) -> None:
        i = 0
        with httpx.Client(base_url=self.url, timeout=300) as c:
            while time.perf_counter() < self.stop_at:
                model = self.names[(self.first + i) % len(self.names)]
                prompts = self.prompts[model]
                body = {"model": model, "max_tokens": self.max_tokens,
                        "messages": [{"role": "user", "content": prompts[(i // len(self.names)) % len(prompts)]}],
                        **self.extra}
                i += 1
                self.used.add(model)
                t = time.perf_counter()
                try:
                    r = c.post("/v1/chat/completions", json=body)
                except Exception as e:  # noqa: BLE001 - any transport error is a failure
                    self.failures.append(f"{type(e).__name__}: {e}")
                    continue
                dt = time.perf_counter() - t
                if r.status_code != 200:
                    self.failures.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                self.latencies.append(dt)
                out = r.json()
                self.tokens += out["usage"]["completion_tokens"]
                self.completions += len(out["choices"])


class ServerWatch(CpuWatch):
    """CpuWatch with the server process's CPU time counted as this process's own."""

    def __init__(self, pid: int, *args):
        super().__init__(*args)
        self.pid = pid

    def snap(self) -> tuple[float, float, float]:
        busy, own, t = super().snap()
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            own += (int(fields[11]) + int(fields[12])) / self.hz  # utime, stime
        except OSError:
            pass
        return busy, own, t


def run_clients(url, names, prompts, n, seconds, max_tokens, extra=None):
    stop_at = time.perf_counter() + seconds
    clients = [Client(url, names, prompts, i, stop_at, max_tokens, extra) for i in range(n)]
    t0 = time.perf_counter()
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    return clients, time.perf_counter() - t0


def throughput(url, names, prompts, levels, seconds, max_tokens, watch, extra=None, figures=None):
    rows, rps, tps = [], {}, {}
    for n in levels:
        def level():
            before = metrics(url)
            clients, wall = run_clients(url, names, prompts, n, seconds, max_tokens, extra)
            return before, metrics(url), clients, wall

        (before, after, clients, wall), load = watch.measure(f"{n} clients {extra or ''}", level)
        lat = [x for c in clients for x in c.latencies]
        fails = sum(len(c.failures) for c in clients)
        tokens = sum(c.tokens for c in clients)
        mean_rows = delta_mean(before, after, "modulora_decode_batch_size")
        mean_join = delta_mean(before, after, "modulora_batch_size")
        rps[n] = len(lat) / wall
        tps[n] = tokens / wall
        rows.append([str(n), ", ".join(sorted(set().union(*(c.used for c in clients)))), str(len(lat)), str(fails),
                     f"{wall:.1f}", f"{len(lat) / wall:.2f}", f"{tokens / wall:.1f}", f"{pct(lat, 0.5):.2f}",
                     f"{pct(lat, 0.95):.2f}", f"{mean_rows:.2f}", f"{mean_join:.2f}",
                     f"{tokens / max(1, len(lat)):.1f}"])
        if figures is not None:
            figures[n] = {"requests": len(lat), "failed": fails, "wall": wall, "rps": len(lat) / wall,
                          "tps": tokens / wall, "cps": sum(c.completions for c in clients) / wall,
                          "p50": pct(lat, 0.5), "p95": pct(lat, 0.95), "rows_step": mean_rows,
                          "joined": mean_join, "tokens_per_request": tokens / max(1, len(lat)), "others_load": load}
        print(rows[-1], flush=True)
        for c in clients:
            for f in c.failures[:3]:
                print("  failure:", f, flush=True)
    return rows, rps, tps


def soak(url, names, prompts, seconds, max_tokens, export_dir: Path, pid: int, lib_path: Path):
    files = {f.name: f.read_bytes() for f in export_dir.iterdir() if f.is_file()}
    stop_at = time.perf_counter() + seconds
    state = {"uploads": 0, "upload_fail": [], "deletes": 0, "delete_fail": [], "probe": 0, "probe_fail": [],
             "bad": 0, "bad_unexpected": [], "rss_peak_polled": 0, "live": []}

    def churn():
        i = 0
        with httpx.Client(base_url=url, timeout=300) as c:
            while time.perf_counter() < stop_at:
                name = f"soak-{i}"
                try:
                    r = c.post("/v1/adapters", data={"name": name},
                               files=[(f, (f, data)) for f, data in files.items()])
                    if r.status_code == 201:
                        state["uploads"] += 1
                        state["live"].append(name)
                        # the new adapter answers at once
                        p = c.post("/v1/chat/completions", json={
                            "model": name, "max_tokens": max_tokens,
                            "messages": [{"role": "user", "content": prompts[names[0]][i % 40]}]})
                        state["probe"] += 1
                        if p.status_code != 200:
                            state["probe_fail"].append(f"{p.status_code}: {p.text[:200]}")
                    else:
                        state["upload_fail"].append(f"{r.status_code}: {r.text[:200]}")
                except Exception as e:  # noqa: BLE001
                    state["upload_fail"].append(f"{type(e).__name__}: {e}")
                while len(state["live"]) > 2:  # keep the two newest copies
                    old = state["live"].pop(0)
                    try:
                        r = c.delete(f"/v1/adapters/{old}")
                        if r.status_code == 200:
                            state["deletes"] += 1
                        else:
                            state["delete_fail"].append(f"{r.status_code}: {r.text[:200]}")
                    except Exception as e:  # noqa: BLE001
                        state["delete_fail"].append(f"{type(e).__name__}: {e}")
                i += 1
                time.sleep(3)

    def bad():
        cases = [  # (description, call, expected status)
            ("unknown model", lambda c: c.post("/v1/chat/completions", json={
                "model": "no-such-adapter", "messages": [{"role": "user", "content": "hi"}]}), 404),
            ("malformed JSON", lambda c: c.post("/v1/completions", content=b"{not json",
                                                headers={"content-type": "application/json"}), 400),
            ("upload without files", lambda c: c.post("/v1/adapters", data={"name": "bad-upload"},
                                                      files=[("x", ("x.txt", b"nope"))]), 422),
            ("upload, not multipart", lambda c: c.post("/v1/adapters", json={"name": "x"}), 400),
            ("delete unknown adapter", lambda c: c.delete("/v1/adapters/never-was"), 404),
            ("reserved name", lambda c: c.post("/v1/adapters", data={"name": "arrow"},
                                               files=[(f, (f, d)) for f, d in files.items()]), 400),
        ]
        i = 0
        with httpx.Client(base_url=url, timeout=300) as c:
            time.sleep(1.0)
            while time.perf_counter() < stop_at:
                what, call, want = cases[i % len(cases)]
                try:
                    r = call(c)
                    state["bad"] += 1
                    if r.status_code != want:
                        state["bad_unexpected"].append(f"{what}: {r.status_code} (expected {want}) {r.text[:120]}")
                except Exception as e:  # noqa: BLE001
                    state["bad_unexpected"].append(f"{what}: {type(e).__name__}: {e}")
                i += 1
                time.sleep(5)

    def poll_rss():
        while time.perf_counter() < stop_at + 1:
            state["rss_peak_polled"] = max(state["rss_peak_polled"], proc_status(pid, "VmRSS"))
            time.sleep(0.5)

    rss_start = proc_status(pid, "VmRSS")
    side = [threading.Thread(target=f, daemon=True) for f in (churn, bad, poll_rss)]
    for t in side:
        t.start()
    clients, wall = run_clients(url, names, prompts, 16, seconds, max_tokens)
    for t in side:
        t.join()
    rss_end = proc_status(pid, "VmRSS")
    hwm = proc_status(pid, "VmHWM")
    lat = [x for c in clients for x in c.latencies]
    fails = [f for c in clients for f in c.failures]
    for f in (fails + state["upload_fail"] + state["delete_fail"] + state["probe_fail"] + state["bad_unexpected"])[:10]:
        print("  soak problem:", f, flush=True)
    return dict(wall=wall, requests=len(lat) + len(fails), ok=len(lat), fails=fails, lat=lat,
                tokens=sum(c.tokens for c in clients), rss_start=rss_start, rss_end=rss_end, hwm=hwm, **state)


def library_whole(lib_path: Path, expect_live: list[str], originals: list[str]) -> tuple[bool, list[str]]:
    lib = Library(lib_path)
    notes = []
    ic = lib.integrity_check()
    notes.append(f"`Library.integrity_check()` (SQLite `PRAGMA integrity_check`): {ic}")
    ok = ic == "ok"
    names = [r.name for r in lib.list()]
    want = sorted(set(originals) | set(expect_live))
    if sorted(names) != want:
        ok = False
        notes.append(f"listed adapters {sorted(names)} != expected {want}")
    else:
        notes.append(f"listed adapters are exactly the {len(originals)} originals plus the "
                     f"{len(expect_live)} soak uploads not yet deleted ({', '.join(expect_live) or 'none'})")
    missing = []
    for n in names:
        info = lib.show(n)
        rec = lib.get(n)
        for fname, meta in info["files"].items():
            p = Path(rec.path) / fname
            if not p.is_file() or p.stat().st_size != meta["size"]:
                missing.append(f"{n}/{fname}")
        if not info["present"]:
            missing.append(f"{n} (object missing)")
    if missing:
        ok = False
        notes.append(f"missing or wrong-size files: {missing}")
    else:
        notes.append(f"every listed adapter's files are present with their catalogued sizes ({len(names)} adapters)")
    return ok, notes


def serving_precision() -> str:
    """What `modulora serve --dtype auto` runs the base in on this machine (modulora.compute)."""
    from modulora.compute import resolve

    return resolve("auto", "auto", serving=True).describe()


def versions() -> str:
    out = []
    for p in ("torch", "transformers", "peft", "fastapi", "uvicorn", "httpx"):
        try:
            out.append(f"{p} {pkg_version(p)}")
        except Exception:  # noqa: BLE001
            pass
    return ", ".join(out) + f", Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser()
    home = Path(os.environ.get("MODULORA_HOME") or Path.home() / ".modulora")
    ap.add_argument("--library", default=str(home / "demo" / "library"))
    ap.add_argument("--seconds", type=float, default=40, help="per concurrency level")
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--soak-seconds", type=float, default=300)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="5 s per level, 15 s soak (development)")
    ap.add_argument("--no-extras", action="store_true", help="leave out the sampling and n=4 runs")
    ap.add_argument("--temperature", type=float, default=0.7, help="the sampling runs' temperature")
    ap.add_argument("--top-p", type=float, default=0.9, help="the sampling runs' top_p")
    ap.add_argument("--n", type=int, default=4, help="samples per request in the n run")
    ap.add_argument("--quiet-threshold", type=float, default=0.3,
                    help="measure a level again when other processes used more cores than this meanwhile")
    ap.add_argument("--max-tries", type=int, default=4)
    ap.add_argument("--max-wait", type=float, default=300.0, help="seconds to wait for a quiet machine each time")
    ap.add_argument("--json", default=None, help="also write the raw figures here (bench/before_after.py)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.md"))
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.soak_seconds = 5, 15
    cmd_line = ("python bench/serve.py " + " ".join(sys.argv[1:])).strip()
    levels = [int(x) for x in args.levels.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="modulora-bench-serve-"))
    lib_path = tmp / "library"
    shutil.copytree(args.library, lib_path, ignore=shutil.ignore_patterns("lock"))
    originals = [r.name for r in Library(lib_path).list()]
    names = [n for n in originals]  # every client a different adapter, cycled
    prompts = {n: prompts_for(n, TASK_OF.get(n)) for n in names}
    export_dir = tmp / "export"
    cli = [sys.executable, "-m", "modulora.cli"]  # this interpreter; PYTHONPATH decides which modulora
    subprocess.run(cli + ["--library", str(lib_path), "library", "export", names[0], str(export_dir)],
                   check=True, cwd=tmp)

    load1 = os.getloadavg()[0]
    server, url, startup = start_server(lib_path, tmp, tmp / "server.log")
    try:
        run_clients(url, names, prompts, len(names), 2, args.max_tokens)  # warm-up, not counted

        watch = ServerWatch(server.pid, args.quiet_threshold, args.max_wait, args.max_tries)
        figures: dict = {"greedy": {}}
        rows, rps, tps = throughput(url, names, prompts, levels, args.seconds, args.max_tokens, watch,
                                    figures=figures["greedy"])
        ratio = rps[levels[-1]] / rps[levels[0]] if rps.get(levels[0]) else float("nan")
        tratio = tps[levels[-1]] / tps[levels[0]] if tps.get(levels[0]) else float("nan")
        extras = {}
        if not args.no_extras:
            sampling = {"temperature": args.temperature, "top_p": args.top_p}
            for label, extra in ((f"temperature {args.temperature}, top_p {args.top_p}", sampling),
                                 (f"temperature {args.temperature}, top_p {args.top_p}, n={args.n}",
                                  {**sampling, "n": args.n})):
                figures[label] = {}
                throughput(url, names, prompts, [16], args.seconds, args.max_tokens, watch, extra, figures[label])
                extras[label] = figures[label][16]
        s = (soak(url, names, prompts, args.soak_seconds, args.max_tokens, export_dir, server.pid, lib_path)
             if args.soak_seconds > 0 else None)
        final_metrics = httpx.get(f"{url}/metrics", timeout=30).text
        health = httpx.get(f"{url}/health", timeout=10).json()
    finally:
        stop_server(server)
    load2 = os.getloadavg()[0]
    server_errors = [ln for ln in (tmp / "server.log").read_text().splitlines() if "Traceback" in ln or "ERROR" in ln]
    whole, notes = library_whole(lib_path, s["live"] if s else [], originals)
    five = sum(int(m.group(1)) for m in re.finditer(r'status="5\d\d"\} (\d+)', final_metrics))

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mb = lambda kib: f"{kib / 1024:.0f} MiB"  # noqa: E731
    met = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    goals = [[f"{levels[-1]}-client vs {levels[0]}-client throughput", ">= 4x", f"{ratio:.2f}x", met(ratio >= 4)]]
    soak_text = ""
    if s is not None:
        soak_fail = len(s["fails"]) + len(s["upload_fail"]) + len(s["delete_fail"]) + len(s["probe_fail"])
        soak_rows = [
            ["duration", f"{s['wall']:.0f} s (asked {args.soak_seconds:.0f} s)"],
            ["completion requests (16 clients)", f"{s['requests']} ({s['ok'] / s['wall']:.2f} req/s, "
                                                 f"{s['tokens'] / s['wall']:.1f} gen tokens/s)"],
            ["latency p50 / p95", f"{pct(s['lat'], 0.5):.2f} / {pct(s['lat'], 0.95):.2f} s"],
            ["failed completion requests", str(len(s["fails"]))],
            ["adapter uploads (201) / failed", f"{s['uploads']} / {len(s['upload_fail'])}"],
            ["requests to a just-uploaded adapter / failed", f"{s['probe']} / {len(s['probe_fail'])}"],
            ["adapter deletes (200) / failed", f"{s['deletes']} / {len(s['delete_fail'])}"],
            ["deliberately bad requests / answered with another status than expected",
             f"{s['bad']} / {len(s['bad_unexpected'])}"],
            ["5xx answers over the whole run (/metrics)", str(five)],
            ["server RSS at soak start / end", f"{mb(s['rss_start'])} / {mb(s['rss_end'])}"],
            ["server peak RSS (VmHWM, whole run incl. throughput part)", mb(s["hwm"])],
            ["server peak RSS polled during soak (every 0.5 s)", mb(s["rss_peak_polled"])],
            ["/health after the soak", str(health)],
            ["library whole afterwards", "yes" if whole else "**no**"],
        ]
        goals += [
            ["failed requests in the soak (other than the deliberate bad ones)", "0", str(soak_fail),
             met(soak_fail == 0)],
            ["library whole after the soak", "yes", "yes" if whole else "no", met(whole)],
        ]
        soak_text = (
            "## Soak\n\n"
            f"16 clients as above for {s['wall']:.0f} s. Meanwhile one thread uploads `{names[0]}` (exported with "
            "`modulora library export`, sent as multipart files) under the names `soak-0`, `soak-1`, ... "
            "every ~3 s, sends one completion to each new name at once, and deletes all but the two newest; "
            "another sends a deliberately bad request every 5 s (unknown model -> 404, malformed JSON -> 400, "
            "a non-adapter file -> 422, not multipart -> 400, delete of an unknown name -> 404, a reserved "
            "name -> 400), counted apart.\n\n"
            + table(["what", "measured"], soak_rows)
            + "\n\nLibrary afterwards (server stopped first):\n\n" + "\n".join(f"- {n}" for n in notes)
            + (f"\n- server log lines with Traceback/ERROR: {len(server_errors)}\n\n"))
    extras_text = ""
    if extras:
        g = figures["greedy"].get(16)
        erows = ([["greedy", f"{g['requests']}", f"{g['failed']}", f"{g['rps']:.2f}", f"{g['cps']:.2f}",
                   f"{g['tps']:.1f}", f"{g['p50']:.2f}", f"{g['p95']:.2f}", f"{g['tokens_per_request']:.1f}"]]
                 if g else [])
        erows += [[label, f"{f['requests']}", f"{f['failed']}", f"{f['rps']:.2f}", f"{f['cps']:.2f}", f"{f['tps']:.1f}",
                   f"{f['p50']:.2f}", f"{f['p95']:.2f}", f"{f['tokens_per_request']:.1f}"]
                  for label, f in extras.items()]
        extras_text = (
            "## Sampling\n\n"
            f"16 clients as above, {args.seconds:.0f} s each, the same prompts and max_tokens {args.max_tokens}, "
            "with sampling fields in the body (per request a seed-less sampler); n asks for that many samples "
            "per request (one prefill, the prompt's KV cache row copied per sample; completions/s counts "
            "choices). Generated tokens count every choice's tokens (`usage.completion_tokens`). Sampled "
            "answers differ in length from greedy ones, so compare tokens/s rather than requests/s.\n\n"
            + table(["16 clients", "requests", "failed", "requests/s", "completions/s", "gen tokens/s",
                     "p50 s", "p95 s", "gen tokens/request"], erows) + "\n\n")
    busy = f"; kept although busy: {', '.join(watch.flagged)}" if watch.flagged else ""
    text = (
        "# Serving, SmolLM2-135M-Instruct\n\n"
        f"Command: `MODULORA_HOME=/tmp/mh {cmd_line}`\n\n"
        f"Hardware: {cpu}, {os.cpu_count()} cores, shared by the server and the clients (same machine, "
        f"traffic on 127.0.0.1 only); load average over 1 minute {load1:.2f} at the start, {load2:.2f} at "
        f"the end. Each level waited for a quiet machine and was measured again when other processes used over "
        f"{args.quiet_threshold} cores meanwhile ({watch.retries} retaken, {watch.waited_s:.0f} s waiting; "
        f"other processes' load during the kept levels: max {max(watch.accepted, default=0):.2f} cores{busy}). "
        f"{versions()}.\n\n"
        f"Server: `modulora --library COPY serve --port P --log-level warning` as a subprocess (defaults: "
        f"max batch 16, batch wait 10 ms, queue 64, --dtype auto: {serving_precision()}), on a copy of `{args.library}` "
        f"({len(originals)} LoRA adapters: {', '.join(originals)}); up in {startup:.0f} s. "
        f"Clients: threads with one `httpx.Client` each, `POST /v1/chat/completions`, max_tokens "
        f"{args.max_tokens}, greedy, short prompts of the demo tasks (the adapter's own task); client i asks "
        f"for adapters i, i+1, ... (mod {len(names)}) in turn, so every level sends the same mix, and loops for {args.seconds:.0f} s per level (requests in flight at "
        f"the end are awaited and counted; rates are over that wall time). One {len(names)}-client warm-up of "
        f"2 s first, not counted. The server batches continuously (requests join the running batch between "
        f"decode steps): rows/step is the mean of `modulora_decode_batch_size` and joined/prefill the mean of "
        f"`modulora_batch_size` (requests prefilled together) on /metrics over the level.\n\n"
        "## Throughput and latency\n\n"
        + table(["clients", "adapters", "requests", "failed", "wall s", "requests/s", "gen tokens/s",
                 "p50 s", "p95 s", "rows/step", "joined/prefill", "gen tokens/request"], rows)
        + f"\n\n{levels[-1]} clients vs {levels[0]}: {ratio:.2f}x the requests/s, {tratio:.2f}x the generated "
        "tokens/s.\n\n"
        + extras_text + soak_text
        + "## Goals\n\n"
        + table(["goal", "needed", "measured", "result"], goals) + "\n"
    )
    if args.json:
        import modulora
        Path(args.json).write_text(json.dumps({
            "modulora": modulora.__file__, "cpu": cpu, "versions": versions(), "startup_s": startup,
            "figures": figures, "retries": watch.retries, "waited_s": watch.waited_s, "flagged": watch.flagged,
            "server_errors": len(server_errors)}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
