"""The adapters loaded on the upstream: a least-recently-used set bounded like vLLM's --max-loras.

vLLM keeps every adapter loaded through `/v1/load_lora_adapter` until it is unloaded, so the
gateway bounds them itself: past `max_loras`, it unloads the least recently used adapter that no
request in flight is using, then loads the new one. Loads and unloads happen one at a time (under
one lock), so two requests for the same new route load it once.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, OrderedDict

import httpx

from .derive import PREFIX

_log = logging.getLogger("modulora.gateway")


class GatewayError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def upstream_message(resp: httpx.Response) -> str:
    """The upstream's own error message (OpenAI's shape, FastAPI's `detail`, or the text)."""
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:500] or resp.reason_phrase
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        for key in ("message", "detail", "error"):
            if data.get(key):
                return str(data[key])
    return resp.text[:500]


class UpstreamAdapters:
    """Which of the gateway's adapters the upstream holds, in least-recently-used order."""

    def __init__(self, client: httpx.AsyncClient, max_loras: int):
        if max_loras < 1:
            raise ValueError("max_loras must be at least 1")
        self.client, self.max_loras = client, max_loras
        self.loaded: OrderedDict[str, None] = OrderedDict()
        self.in_use: Counter[str] = Counter()
        self.loads = self.unloads = 0
        self._lock = asyncio.Lock()

    async def sync(self, listed: list[dict]) -> None:
        """Adopt the gateway-made adapters the upstream already lists (a restarted gateway)."""
        for m in listed:
            if str(m.get("id", "")).startswith(PREFIX):
                self.loaded[m["id"]] = None

    async def acquire(self, name: str, path: str) -> None:
        """Make sure `name` is loaded (from `path`, as the upstream sees it) and mark it in use
        until `release`; 503 when every slot is held by requests in flight."""
        async with self._lock:
            if name in self.loaded:
                self.loaded.move_to_end(name)
            else:
                while len(self.loaded) >= self.max_loras:
                    await self._unload(self._victim())
                await self._load(name, path)
                self.loaded[name] = None
            self.in_use[name] += 1

    def release(self, name: str) -> None:
        self.in_use[name] -= 1
        if self.in_use[name] <= 0:
            del self.in_use[name]

    def _victim(self) -> str:
        for name in self.loaded:  # oldest first
            if not self.in_use[name]:
                return name
        raise GatewayError(503, f"all {self.max_loras} upstream adapter slots (--max-loras) are in use by "
                                "requests in flight; retry shortly", code="adapter_slots_busy")

    async def _load(self, name: str, path: str) -> None:
        resp = await self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        message = upstream_message(resp) if resp.status_code != 200 else ""
        if resp.status_code == 400 and "already" in message.lower():
            return  # loaded before this gateway knew (another gateway, or a lost answer): fine
        if resp.status_code != 200:
            raise GatewayError(502, f"the upstream refused to load adapter {name} from {path} "
                                    f"(HTTP {resp.status_code}): {message}", code="upstream_load_failed")
        self.loads += 1
        _log.info("loaded %s on the upstream", name)

    async def _unload(self, name: str) -> None:
        resp = await self._post("/v1/unload_lora_adapter", {"lora_name": name})
        if resp.status_code not in (200, 404):  # 404: already gone, the slot is free anyway
            raise GatewayError(502, f"the upstream refused to unload adapter {name} "
                                    f"(HTTP {resp.status_code}): {upstream_message(resp)}",
                               code="upstream_unload_failed")
        del self.loaded[name]
        self.unloads += 1
        _log.info("unloaded %s from the upstream (least recently used)", name)

    async def _post(self, path: str, body: dict) -> httpx.Response:
        try:
            return await self.client.post(path, json=body)
        except httpx.HTTPError as e:
            raise GatewayError(502, f"the upstream did not answer {path}: {e!r}", code="upstream_unreachable") from None
