"""Make the web page's screenshots in the README (docs/web-*.png) from a library.

    python docs/screenshots.py --library ~/.modulora/demo/library          # the `make demo` library
    python docs/screenshots.py --library DIR --base tiny --out /tmp/shots    # a quick try

It copies the library to a temporary folder (the original is never written to), stores an MBC
clustering in the copy when it has none (the library's own LoRAs clustered as `modulora build
--mode mbc` clusters its short adapters: `modulora.build.cluster_tasks`, no training), starts
`modulora serve` on 127.0.0.1 with this interpreter, waits for /health, and drives Debian's
Chromium through Playwright (as tests/test_web.py does) to save, at 1280 px wide:

    web-library.png     the adapter list and the clustering
    web-adapter.png     one adapter's page (--adapter)
    web-playground.png  an Arrow answer to --prompt, each token coloured, one token's per-layer table
    web-upload.png      an adapter refused (a copy of one with lora_alpha -8) and its error
    web-results.png     one report of the --results folder
    web-server.png      the live figures after a few requests

and web-phone.png, the library at 390 px. A PNG over --max-kb is re-saved with a 256-colour
palette. The server is stopped at the end, whatever happened.
"""

from __future__ import annotations

import argparse
import json
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

import httpx

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Rewrite the text in capital letters.\n\nocean dragon market mirror"
WIDTH, HEIGHT, PHONE = 1280, 860, (390, 844)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--library", required=True, help="library folder (copied; never written to)")
    default_results = REPO / "experiments" / "results" / "zeroshot"
    p.add_argument("--results", default=str(default_results) if default_results.is_dir() else None,
                   help="results folder for the Results view (default experiments/results/zeroshot if it exists)")
    p.add_argument("--base", default=None, help="base model (default: the bundled SmolLM2; `tiny` for a quick try)")
    p.add_argument("--out", default=str(REPO / "docs"), help="where the PNGs go (default docs/)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--clusters", type=int, default=2, help="clusters of the MBC clustering made when the library has none")
    p.add_argument("--adapter", default=None, help="adapter whose page is shown (default capital, else the first)")
    p.add_argument("--prompt", default=PROMPT, help="the playground's prompt (route arrow)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-kb", type=int, default=300, help="a PNG larger than this is re-saved with a palette")
    p.add_argument("--chromium", default=os.environ.get("MODULORA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium")
    p.add_argument("--timeout", type=float, default=900, help="seconds the server may take to come up")
    return p.parse_args(argv)


# -- the library copy and its clustering -------------------------------------------------------------

def ensure_clustering(lib_dir: Path, base_name, k: int, device: str, dtype: str) -> str:
    """Store an MBC clustering of the library's LoRAs in the library at lib_dir unless it has one;
    says what it did."""
    import numpy as np

    from modulora.adapters import read_adapter
    from modulora.build import cluster_tasks, load_clustering, store_clustering
    from modulora.library import Library

    lib = Library(lib_dir)
    if load_clustering(lib) is not None:
        return "the library has a clustering: kept"
    records = [r for r in lib.list() if r.type == "lora"]
    if len(records) < 2:
        return f"{len(records)} LoRA(s) in the library: no clustering to show"
    k = max(1, min(k, len(records)))
    configs = [read_adapter(r.path)[0] for r in records]
    if any(c.modules != configs[0].modules for c in configs):
        return "the library's LoRAs differ in shape: no clustering (an MBC build needs one configuration)"
    # The start the LoRAs were trained from: `modulora train` records its seed and adapter settings
    # in the card, and `cluster_tasks` subtracts that seeded start as an MBC build does. (The
    # config read back from the files lists the modules one by one, which seeds another start.)
    trains = [(r.card or {}).get("train_config") or {} for r in records]
    names = [r.name for r in records]
    if all(t.get("adapter") and t.get("adapter") == trains[0]["adapter"] and t.get("seed") == trains[0].get("seed")
           for t in trains):
        from modulora.adapters import AdapterConfig
        from modulora.base import load_base

        adapter, seed = AdapterConfig(**trains[0]["adapter"]), int(trains[0].get("seed", 0))
        base = load_base(base_name, device=device, dtype=dtype)
        labels, sim = cluster_tasks(base, [r.path for r in records], k, adapter, seed, keep=0.1, dims=256,
                                    reduce="svd")
        del base
        start = "flattened A (minus its seeded start) and B"
    else:  # no training settings in the cards: the start is unknown, so the parameters as they are
        from modulora.build import cosine_matrix, kmeans, reduce_vectors, sparse_vectors

        seed = 0
        vectors, length = sparse_vectors([r.path for r in records], None, 0.1)
        emb = reduce_vectors(vectors, length, 256, "svd", seed)
        sim = cosine_matrix(emb)
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        raw, _ = kmeans(emb / np.where(norms > 0, norms, 1), k, seed)
        first: dict[int, int] = {}
        labels = [first.setdefault(int(lab), len(first)) for lab in raw]
        start = "flattened A and B as saved (no training seed in the cards)"
    clusters = {f"cluster-{c}": [n for n, lab in zip(names, labels) if lab == c] for c in range(k)}
    store_clustering(lib, {
        "tasks": names, "assignment": {n: f"cluster-{lab}" for n, lab in zip(names, labels)},
        "clusters": clusters, "similarity": np.round(sim, 6).tolist(),
        "settings": {"clusters": k, "keep": 0.1, "dims": 256, "reduce": "svd", "seed": seed,
                     "parameters": f"the library's LoRAs (not short MBC adapters), {start}, all modules; "
                                   "stored by docs/screenshots.py"},
    })
    off = sim[~np.eye(len(names), dtype=bool)]
    return (f"stored an MBC clustering of the library's {len(names)} LoRAs ({start}): {clusters}, "
            f"cosine similarities between tasks {off.min():.3f} to {off.max():.3f}")


def bad_adapter(lib_dir: Path, name: str, out: Path) -> Path:
    """A copy of `name`'s files with lora_alpha -8 (the server must refuse it)."""
    from modulora.library import Library

    src = Library(lib_dir).get(name).path
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": -8}))
    return out


# -- the server ----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, lib_dir: Path, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "import sys; from modulora.cli import main; sys.exit(main())",
           "serve", "--library", str(lib_dir), "--host", "127.0.0.1", "--port", str(port),
           "--device", args.device, "--dtype", args.dtype]
    if args.base:
        cmd += ["--base", args.base]
    if args.results:
        cmd += ["--results", str(Path(args.results).expanduser())]
    print("server:", " ".join(cmd[3:]), flush=True)
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).json().get("status") == "ok":
                print(f"server up in {time.time() - t0:.0f} s", flush=True)
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    raise SystemExit(f"the server did not answer /health in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and nothing else
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass
    print("server stopped", flush=True)


# -- the screenshots -----------------------------------------------------------------------------------

def save(page, out: Path, name: str, max_kb: int, max_height: int = HEIGHT) -> Path:
    """The page from its top to the end of the view's content (at most max_height px)."""
    path = out / f"web-{name}.png"
    bottom = page.evaluate("""() => Math.ceil(window.scrollY + Math.max(0, ...Array.from(
        document.querySelectorAll('main .view *'), (e) => e.getBoundingClientRect().bottom)))""")
    height = max(200, min(max_height, bottom + 16))
    page.screenshot(path=str(path), full_page=True,
                    clip={"x": 0, "y": 0, "width": page.viewport_size["width"], "height": height})
    if path.stat().st_size > max_kb * 1024:
        from PIL import Image

        Image.open(path).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"{path}: {path.stat().st_size // 1024} KB, {page.viewport_size['width']}x{height}", flush=True)
    return path


def wait_done(page) -> None:
    page.wait_for_function("() => ['done', 'error'].includes(document.getElementById('pg-output').dataset.state)")


def traffic(url: str, routes: list[str], stop: threading.Event, counter: list[int]) -> None:
    """Requests, one after another, until stopped: the server view's figures."""
    i = 0
    while not stop.is_set():
        route = routes[i % len(routes)]
        try:
            httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
                "model": route, "max_tokens": 8, "messages": [{"role": "user", "content": f"Add {i} and {i + 3}."}]})
            counter[0] += 1
        except httpx.HTTPError:
            pass
        i += 1


def shoot(args, url: str, out: Path, bad: Path) -> list[str]:
    from playwright.sync_api import sync_playwright

    names = [a["name"] for a in httpx.get(f"{url}/v1/adapters").json()["data"]]
    adapter = args.adapter or ("capital" if "capital" in names else names[0])
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            ctx = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})
            pg = ctx.new_page()
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.set_default_timeout(300_000)

            pg.goto(f"{url}/#/library")
            pg.wait_for_selector("tr[data-adapter]")
            pg.wait_for_timeout(1000)  # the clustering's map and heatmap
            save(pg, out, "library", args.max_kb, max_height=1400)

            pg.goto(f"{url}/#/adapter/{adapter}")
            pg.wait_for_selector("text=Versions")
            pg.wait_for_timeout(300)
            save(pg, out, "adapter", args.max_kb)

            pg.goto(f"{url}/#/playground?route=arrow")
            pg.wait_for_selector("#pg-prompt")
            pg.fill("#pg-prompt", args.prompt)
            pg.fill("#pg-max-tokens", str(args.max_tokens))
            pg.click("#pg-run")
            wait_done(pg)
            status = pg.inner_text("#pg-status")
            print("playground:", status, "|", pg.inner_text("#pg-output").strip(), flush=True)
            if pg.get_attribute("#pg-output", "data-state") != "done":
                errors.append(f"playground: {status}")
            layered = pg.locator("#pg-output .tok[data-layers]")
            if layered.count():
                layered.nth(min(1, layered.count() - 1)).click()
                pg.wait_for_selector("#pg-token table.layers")
            else:
                errors.append("playground: no token has per-layer weights")
            pg.mouse.move(0, 0)
            save(pg, out, "playground", args.max_kb, max_height=1600)

            pg.goto(f"{url}/#/upload")
            pg.wait_for_selector("#up-files")
            pg.fill("#up-name", f"{adapter}-broken")
            pg.set_input_files("#up-files", [str(f) for f in sorted(bad.iterdir())])
            pg.click("#up-submit")
            print("upload:", pg.wait_for_selector("#up-error").inner_text().splitlines()[0], flush=True)
            save(pg, out, "upload", args.max_kb)

            pg.goto(f"{url}/#/results")
            pg.wait_for_selector("main .view > *")
            reports = httpx.get(f"{url}/v1/results").json().get("data", []) if args.results else []
            if reports:
                pg.goto(f"{url}/#/results/{reports[0]['name']}")
                pg.wait_for_selector("text=Score by method and task")
                pg.wait_for_timeout(300)
            save(pg, out, "results", args.max_kb)

            stop, count = threading.Event(), [0]
            routes = ["arrow", "retrieval"] + names[:2]
            threads = [threading.Thread(target=traffic, args=(url, routes[i:] + routes[:i], stop, count), daemon=True)
                       for i in range(3)]
            pg.goto(f"{url}/#/server")
            for t in threads:
                t.start()
            try:
                pg.wait_for_function("() => document.querySelector('[data-figure=rps] .value').textContent !== '–'")
                t0 = time.time()
                while time.time() - t0 < 60 and count[0] < 12:
                    pg.wait_for_timeout(1000)
                pg.wait_for_timeout(4000)  # a few more points on the lines
                save(pg, out, "server", args.max_kb)
            finally:
                stop.set()
            print(f"server view after {count[0]} requests", flush=True)
            for t in threads:
                t.join(300)
            ctx.close()

            phone = browser.new_context(viewport={"width": PHONE[0], "height": PHONE[1]}, is_mobile=True,
                                        device_scale_factor=1)
            pp = phone.new_page()
            pp.on("pageerror", lambda e: errors.append(str(e)))
            pp.set_default_timeout(120_000)
            pp.goto(f"{url}/#/library")
            pp.wait_for_selector("tr[data-adapter]")
            pp.wait_for_timeout(1000)
            save(pp, out, "phone", args.max_kb, max_height=1600)
            phone.close()
        finally:
            browser.close()
    return errors


def main(argv=None) -> int:
    args = parse_args(argv)
    library = Path(args.library).expanduser()
    if not (library / "catalog.sqlite").is_file():
        raise SystemExit(f"{library} is not a library (no catalog.sqlite)")
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below stops the server
    with tempfile.TemporaryDirectory(prefix="modulora-shots-") as tmp:
        work = Path(tmp)
        lib_dir = work / "library"
        shutil.copytree(library, lib_dir, ignore=shutil.ignore_patterns("lock", "tmp", "staging"))
        print(ensure_clustering(lib_dir, args.base, args.clusters, args.device, args.dtype), flush=True)
        from modulora.library import Library

        names = [r.name for r in Library(lib_dir).list()]
        bad = bad_adapter(lib_dir, "capital" if "capital" in names else names[0], work / "bad")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = work / "serve.log"
        proc = start_server(args, lib_dir, port, log)
        try:
            wait_healthy(proc, url, log, args.timeout)
            errors = shoot(args, url, out, bad)
        finally:
            stop_server(proc)
    if errors:
        print("page errors:", *errors, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
