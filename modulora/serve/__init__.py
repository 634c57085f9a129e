"""An OpenAI-compatible HTTP server over one base and one adapter library.

    modulora serve --library PATH --host 127.0.0.1 --port 8000 [--api-key KEY] [--base B]
                   [--max-resident-experts N] [--request-timeout S] [--log-format json|text]
                   [--allowed-adapter-dir DIR ...] [--max-tokens N] [--max-prompts N] [--max-messages N]
                   [--max-body-mb MB] [--body-timeout S] [--results DIR]

Endpoints: `GET /health`, `GET /metrics`, `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/completions`,
`POST /v1/chat/completions`, `POST /v1/adapters`, `GET /v1/adapters/{name}`, `DELETE /v1/adapters/{name}`,
vLLM's `POST /tokenize`, `POST /detokenize`, `POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter`;
and for the web page at `GET /` (`web`): `GET /v1/adapters` (the library with details), `GET /v1/clustering`,
`GET /v1/results`, `GET /v1/results/{name}` (with `--results DIR`) and `GET /v1/info`.
The package, laid out as vLLM's server is: `protocol` (request bodies, answer helpers), `scheduler`
(the worker thread and its queue), `serving` (the completions and chat handlers' logic), `app`
(the FastAPI app, its routes and `modulora serve`), `upload` (uploads and their safety checks),
`metrics` (the Prometheus text), `request_log` (the per-request log), `errors` (OpenAI's error shape),
`web` (the page: static files in `static/`, no build step, nothing fetched from elsewhere).

API key (`--api-key`): GET endpoints are open (models, adapter info, health, metrics); every other
method under /v1/ needs `Authorization: Bearer KEY`: adapter uploads and deletes, and completions
(they spend the server's compute). An uploaded adapter is routable on the next request (the router
keys its caches by object ids); `DELETE /v1/adapters/{name}` removes all versions.

Loading from the server's disk (vLLM's `load_lora_adapter {lora_name, lora_path}`) is off unless
the operator names directories with `--allowed-adapter-dir` (off: 403 `adapter_loading_disabled`);
the path is resolved (symlinks, `..`) before it must lie inside one of them (else 403
`path_not_allowed`), then checked and stored as an upload is (422 when refused, the library
unchanged). A name already loaded is refused (400 `adapter_exists`), as vLLM does;
`unload_lora_adapter {lora_name}` removes all versions, as DELETE does. Model entries carry
`root` (the base's name), `parent` (the base; null for `base` itself) and `max_model_len`.

Requests:
- Which fields are implemented, refused (400 naming them) or accepted as no-ops, and how the
  old routing `top_k` is still read: `protocol`'s docstring.
- `model` is the route text (see `modulora.routing.api`): an adapter name, `a,b`, `a:0.7,b:0.3`,
  `arrow`, `retrieval`, `learned`, `uniform` or `base`. Extension fields: `route_top_k`
  (policies), `mode` (`mixture` | `average`), `adapter_weights` ({name: weight}, which becomes
  the route `a:0.7,b:0.3` and takes precedence over `model`), `timeout` (seconds, see below),
  `ignore_eos`, `stop_token_ids`, `fallback`, `token_routing`, `arrow` (Arrow's settings:
  {temperature, normalize, prototypes, modules}). Which OpenAI fields are honoured and which are refused: `protocol`.
- `/v1/completions` is a raw completion: text or token ids (one or a batch), no template.
  `/v1/chat/completions` renders the whole message list (system, user, assistant turns, text
  parts) through the tokenizer's chat template. Retrieval and learned routing read the prompt
  text (chat: the last user message).
- Sampling per request, also in mixed batches (`modulora.routing.sampling`): temperature (omitted:
  0, greedy), top_p, top_k, seed (the same text alone or in any batch), stop strings (the text is
  cut before the stop; finish_reason "stop"), max_tokens / max_completion_tokens, n (samples
  share one prefill), presence / frequency penalties. logprobs / top_logprobs (chat),
  logprobs + echo (completions: prompt log-probabilities, as lm-eval's loglikelihood asks).
- Every response carries `usage` (prompt tokens of the rendered prompt, completion tokens as
  generated, without the end token) and an extension field `routing`: one entry per choice,
  `{"index", "experts": {name: weight}}` ({} for the base alone).
- Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: unknown model or
  adapter -> 404, malformed JSON and other bad input -> 400, full queue -> 429 with Retry-After,
  missing or wrong API key (when one is set) -> 401, past the timeout -> 504 (below).
- Bounds, checked before any model work (400 naming both numbers): `--max-tokens` (default 4096)
  for max_tokens / max_completion_tokens (an omitted one gets the smaller of its default and this),
  `--max-prompts` (64) prompts per completions request (and never more than `--queue-size`),
  `--max-messages` (512) messages per chat; `--max-body-mb` (8) bounds a JSON body (413).
  A request body (JSON or upload) must arrive whole within `--body-timeout` seconds (30; 0: no
  limit), else 408 `body_timeout` and the connection is closed.
- Text that is not valid Unicode (a lone surrogate such as JSON's "\\ud800") and route weights that
  are not finite or underflow (`a:1e-320,b:1`) are 400 naming them.

Scheduling (continuous batching, `modulora.routing.engine`): one worker thread owns the model.
Each prompt is one item in a bounded queue (full -> 429). Between two decode steps the worker
takes what waits (when nothing runs it first waits `batch_wait_ms` for more to come together),
resolves the routes, makes sure the LoRA experts they need are resident, prefills them in one
pass and merges them into the running batch; every row leaves the batch the step it ends, so a
short answer never waits for a long one. Rows keep their own route, top_k, mode and max_tokens.
Routes naming series, parallel or prefix adapters join the same running batch. An item whose
route cannot be resolved fails alone (400).

Resident experts (`--max-resident-experts N`, `modulora.routing.resident`): at most N LoRA
experts in memory, least recently used evicted; a request whose experts do not fit beside the
ones running requests use waits (in order) until they finish. Arrow and `uniform` choose among
the whole library, so with more LoRA adapters than N they are refused (400); fixed routes and
retrieval / learned (which pick before generating) serve from a library of any size.

Streaming (`stream: true`): server-sent events in OpenAI's chunk shape, one as each token is
generated (text is held back only while it ends in an incomplete character or whitespace, so
the chunks join to exactly the non-streamed answer), then a final chunk with `finish_reason`,
`usage` and `routing`, then `data: [DONE]`. Errors found before the first token get their HTTP
status; a stream that fails later ends with one event holding the error object.

Stopping work: a client that disconnects (a stream closed early, or a plain request dropped; the
latter is noticed within 0.25 s) has its rows dropped at the next decode step. A request may run
at most `--request-timeout` seconds (server default, 300; 0: no limit) or its own `timeout` field
if smaller, queueing included; then its rows are dropped the same way and the answer is 504
`request_timeout` (504 rather than 408: the request arrived whole, it is the server that did not
finish in time). /metrics counts both (`modulora_requests_stopped_total{reason=...}`).
"""

from __future__ import annotations


from __future__ import annotations

from .app import add_serve_command, cmd_serve, create_app, keep_freed_memory
from .errors import APIError
from .metrics import Metrics
from .scheduler import Scheduler, _Item

__all__ = ["create_app", "add_serve_command", "cmd_serve", "keep_freed_memory", "Scheduler", "Metrics", "APIError",
           "_Item"]
