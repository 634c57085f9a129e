"""The server's counters, gauges and histograms, rendered in Prometheus' text format.

Written here rather than taken from prometheus_client: the server needs a dozen series and one
lock, and keeping the text format in ~150 lines avoids a dependency and its global registry
(several apps in one test process would otherwise share one).
"""

from __future__ import annotations

import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/adapters",
             "/tokenize", "/detokenize", "/tokenizer_info", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")


def endpoint_of(path: str) -> str:
    """A bounded label for a request path (never the raw path: its values are unbounded)."""
    if path.startswith("/v1/adapters/"):
        return "/v1/adapters/{name}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return path if path in ENDPOINTS else "other"


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus expects them."""

    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = tuple(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        lab = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{lab} {self.sum:.6g}", f"{name}_count{lab} {self.count}"]


def _counter(name: str, help: str, value) -> list[str]:
    return [f"# HELP {name} {help}", f"# TYPE {name} counter", f"{name} {value}"]


def _gauge(name: str, help: str, value) -> list[str]:
    return [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {value}"]


class Metrics:
    """Everything /metrics shows; the worker thread and the handlers update it under one lock."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.prompt_tokens = self.completion_tokens = 0
        self.batches = 0  # prefill passes: requests that joined the running batch together
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.steps = 0  # decode steps
        self.step_rows = Histogram(BATCH_BUCKETS)
        self.uploads: dict[str, int] = {"created": 0, "rejected": 0}
        self.deletes = 0
        self.stopped: dict[str, int] = {"client_disconnect": 0, "timeout": 0}
        self.stopped_tokens = 0

    def request(self, method: str, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (method, endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch(self, size: int, prompt_tokens: int) -> None:
        """A prefill pass of `size` requests joining the running batch."""
        with self._lock:
            self.batches += 1
            self.batch_size.observe(size)
            self.prompt_tokens += prompt_tokens

    def step(self, rows: int) -> None:
        with self._lock:
            self.steps += 1
            self.step_rows.observe(rows)

    def finished(self, completion_tokens: int) -> None:
        with self._lock:
            self.completion_tokens += completion_tokens

    def stop(self, reason: str, tokens: int) -> None:
        """A request stopped before its end (`client_disconnect` or `timeout`) after `tokens` tokens."""
        with self._lock:
            self.stopped[reason] = self.stopped.get(reason, 0) + 1
            self.stopped_tokens += tokens
            self.completion_tokens += tokens

    def upload(self, created: bool) -> None:
        with self._lock:
            self.uploads["created" if created else "rejected"] += 1

    def delete(self) -> None:
        with self._lock:
            self.deletes += 1

    def render(self, queue_depth: int, running: int = 0, experts: dict | None = None,
               prefix: tuple[int, int] = (0, 0)) -> str:
        """The text format. `experts`: the resident-expert cache's stats (`ResidentExperts.stats`);
        `prefix`: (hits, misses) of the shared-template KV cache."""
        experts = experts or {}
        with self._lock:
            L = ["# HELP modulora_requests_total HTTP requests answered, by method, endpoint and status.",
                 "# TYPE modulora_requests_total counter"]
            L += [f'modulora_requests_total{{method="{m}",endpoint="{e}",status="{s}"}} {n}'
                  for (m, e, s), n in sorted(self.requests.items())]
            L += ["# HELP modulora_request_duration_seconds Time to the start of the response, by endpoint.",
                  "# TYPE modulora_request_duration_seconds histogram"]
            for e, h in sorted(self.latency.items()):
                L += h.lines("modulora_request_duration_seconds", f'endpoint="{e}"')
            L += _counter("modulora_generated_tokens_total", "Completion tokens generated.", self.completion_tokens)
            L += _counter("modulora_prompt_tokens_total", "Prompt tokens processed.", self.prompt_tokens)
            L += _counter("modulora_batches_total",
                          "Prefill passes (requests that joined the running batch together).", self.batches)
            L += ["# HELP modulora_batch_size Requests per prefill pass.", "# TYPE modulora_batch_size histogram"]
            L += self.batch_size.lines("modulora_batch_size")
            L += _counter("modulora_decode_steps_total", "Decode steps (one token for every running row).",
                          self.steps)
            L += ["# HELP modulora_decode_batch_size Rows per decode step.",
                  "# TYPE modulora_decode_batch_size histogram"]
            L += self.step_rows.lines("modulora_decode_batch_size")
            L += _gauge("modulora_queue_depth", "Prompts waiting for the worker.", queue_depth)
            L += _gauge("modulora_running_rows", "Prompts being generated now.", running)
            L += ["# HELP modulora_requests_stopped_total Prompts stopped before their end, by reason.",
                  "# TYPE modulora_requests_stopped_total counter"]
            L += [f'modulora_requests_stopped_total{{reason="{r}"}} {n}' for r, n in sorted(self.stopped.items())]
            L += _counter("modulora_stopped_tokens_total", "Tokens generated by prompts that were then stopped.",
                          self.stopped_tokens)
            L += ["# HELP modulora_prefix_cache_total Lookups of the shared chat-template KV per route.",
                  "# TYPE modulora_prefix_cache_total counter"]
            L += [f'modulora_prefix_cache_total{{result="hit"}} {prefix[0]}',
                  f'modulora_prefix_cache_total{{result="miss"}} {prefix[1]}']
            L += ["# HELP modulora_adapter_uploads_total Adapter uploads, by result.",
                  "# TYPE modulora_adapter_uploads_total counter"]
            L += [f'modulora_adapter_uploads_total{{result="{r}"}} {n}' for r, n in sorted(self.uploads.items())]
            L += _counter("modulora_adapter_deletes_total", "Adapters deleted (all versions of a name).", self.deletes)
        L += _counter("modulora_adapter_cache_hits_total", "Experts a prompt needed that were resident.",
                      experts.get("hits", 0))
        L += _counter("modulora_adapter_cache_misses_total", "Experts a prompt needed that were read from the library.",
                      experts.get("misses", 0))
        L += _counter("modulora_adapter_cache_evictions_total", "Resident experts evicted (least recently used).",
                      experts.get("evictions", 0))
        L += _gauge("modulora_adapter_cache_resident", "LoRA experts resident now.", experts.get("resident", 0))
        L += _gauge("modulora_adapter_cache_capacity", "Most LoRA experts resident at once (0: no bound).",
                    experts.get("capacity", 0))
        return "\n".join(L) + "\n"


__all__ = ["Metrics", "Histogram", "endpoint_of"]
