"""The web page at `/` and the read-only JSON it needs that the OpenAI-style API lacks.

The page is three static files in `static/` (plain JS, no build step, no CDN: the server may be
offline). It reads `GET /v1/adapters` (the library with details), `GET /v1/clustering` (MBC, when
`modulora build --mode mbc` stored one), `GET /v1/results[/{name}]` (the `results.json` files of
`modulora eval` and the experiments under `--results DIR`) and `GET /v1/info`; it writes only
through the existing endpoints (uploads, deletes, completions), which need the API key when one
is set.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from ..build import load_clustering
from ..library import LibraryError
from .errors import APIError, error_responses

STATIC = Path(__file__).with_name("static")
SAMPLES_LISTED = 3  # card samples per adapter in the listing (the adapter's page shows them all)
RESULT_KEYS = {"tasks", "methods", "scores"}  # what makes a JSON file a results.json of `modulora eval`


def add_web(app: FastAPI, library, results_dir: str | os.PathLike | None = None, base_name: str = "",
            api_key_required: bool = False) -> None:
    """Register the page, its static files and its JSON endpoints on `app`."""
    summaries = _Summaries()
    results = _Results(Path(results_dir)) if results_dir else None
    page = (STATIC / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/v1/info")
    async def info():
        """What the page shows in its header and which views it offers."""
        return {"base": base_name, "api_key_required": api_key_required, "results": results is not None}

    @app.get("/v1/adapters")
    async def list_adapters():
        """Every adapter (latest version first-class, all versions listed) with its card's task,
        samples and metrics; cards are parsed once per stored object and kept."""
        return {"object": "list", "data": await asyncio.to_thread(summaries.listing, library)}

    @app.get("/v1/clustering", responses=error_responses(404))
    async def clustering():
        found = await asyncio.to_thread(load_clustering, library)
        if found is None:
            raise APIError(404, "this library has no MBC clustering (modulora build --mode mbc stores one)",
                           code="clustering_not_found")
        return found

    def need_results() -> _Results:
        if results is None:
            raise APIError(404, "the server was started without a results folder (modulora serve --results DIR)",
                           code="results_not_configured")
        return results

    @app.get("/v1/results", responses=error_responses(404))
    async def list_results():
        return {"object": "list", "data": await asyncio.to_thread(need_results().listing)}

    @app.get("/v1/results/{name:path}", responses=error_responses(404))
    async def one_result(name: str):
        return await asyncio.to_thread(need_results().one, name)


class _Summaries:
    """What the listing shows of each stored object (card fields, size on disk), kept by object
    id: objects never change, so each card is parsed once however often the page polls."""

    LIMIT = 4096

    def __init__(self):
        self._by_object: dict[str, dict] = {}
        self._lock = threading.Lock()

    def listing(self, library) -> list[dict]:
        out = []
        for rec in library.list():
            versions = library.versions(rec.name)
            out.append({"name": rec.name, "type": rec.type, "version": rec.version, "created": rec.created,
                        "object_id": rec.object_id, "base_id": rec.base_id, "num_params": rec.num_params,
                        **self.summary(rec),
                        "versions": [{"version": v.version, "created": v.created, "object_id": v.object_id,
                                      "num_params": v.num_params, "type": v.type} for v in versions]})
        return out

    def summary(self, rec) -> dict:
        with self._lock:
            hit = self._by_object.get(rec.object_id)
        if hit is not None:
            return hit
        try:
            card = rec.card or {}
        except LibraryError:  # removed since listed: show what the catalog row had
            card = {}
        samples = card.get("samples") if isinstance(card.get("samples"), list) else []
        fp = card.get("base_fingerprint") if isinstance(card.get("base_fingerprint"), dict) else {}
        value = {"task": card.get("task"), "description": card.get("description"),
                 "base_name": fp.get("name"), "samples": [str(s)[:300] for s in samples[:SAMPLES_LISTED]],
                 "n_samples": len(samples), "metrics": card.get("metrics") if isinstance(card.get("metrics"), dict)
                 else {}, "cluster_tasks": card.get("cluster_tasks"), "size_bytes": _size(rec.path)}
        with self._lock:
            if len(self._by_object) >= self.LIMIT:
                self._by_object.clear()
            self._by_object[rec.object_id] = value
        return value


def _size(path: Path) -> int | None:
    try:
        return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())
    except OSError:
        return None


class _Results:
    """The `results.json` files under a folder (`modulora eval --out`, `modulora experiment`):
    every JSON file holding tasks, methods and scores, named by its path without `.json`.
    Parsed files are kept until their modification time changes (they run to megabytes)."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[Path, tuple[float, dict]] = {}
        self._lock = threading.Lock()

    def files(self) -> dict[str, Path]:
        if not self.root.is_dir():
            return {}
        found = {}
        for p in sorted(self.root.rglob("*.json")):
            if p.is_file() and (p.name == "results.json" or p.name.endswith("-results.json")):
                found[p.relative_to(self.root).with_suffix("").as_posix()] = p
        return found

    def load(self, path: Path) -> dict | None:
        """The file's contents, or None when it is not a results.json."""
        try:
            mtime = path.stat().st_mtime
            with self._lock:
                hit = self._cache.get(path)
            if hit is not None and hit[0] == mtime:
                return hit[1]
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or not RESULT_KEYS <= set(data):
            return None
        with self._lock:
            self._cache[path] = (mtime, data)
        return data

    def listing(self) -> list[dict]:
        out = []
        for name, path in self.files().items():
            data = self.load(path)
            if data is not None:
                out.append({"name": name, "tasks": data.get("tasks", []), "methods": data.get("methods", []),
                            "n": data.get("n", {}), "average": data.get("average", {}),
                            "modified": path.stat().st_mtime})
        return out

    def one(self, name: str) -> dict:
        path = self.files().get(name)
        data = self.load(path) if path is not None else None
        if data is None:
            raise APIError(404, f"no results named {name!r} under the results folder; GET /v1/results lists them",
                           code="results_not_found")
        preds = data.get("predictions") or []
        return {"name": name, **{k: v for k, v in data.items() if k != "predictions"},
                "n_predictions": len(preds), "examples": _examples(preds)}


def _examples(preds: list, per_cell: int = 2) -> list[dict]:
    """A few predictions per (method, task): enough to read what a score means, not megabytes."""
    seen: dict[tuple, int] = {}
    out = []
    for p in preds:
        if not isinstance(p, dict):
            continue
        key = (p.get("method"), p.get("task"))
        if seen.get(key, 0) < per_cell:
            seen[key] = seen.get(key, 0) + 1
            out.append({k: p.get(k) for k in ("method", "task", "prediction", "references", "scores", "experts")})
    return out


__all__ = ["add_web"]
