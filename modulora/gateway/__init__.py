"""`modulora gateway`: an OpenAI-compatible front door that keeps modulora's library and routing
and lets a vLLM-compatible server (vLLM, or `modulora serve`) do the generation.

    modulora gateway --upstream URL --library DIR --adapter-dir DIR [--max-loras N] [--port P] [--api-key KEY]

Per request (`POST /v1/completions`, `POST /v1/chat/completions`) it
- resolves the route (`model`: an adapter name, `a:0.7,b:0.3`, `retrieval`, `learned`, `uniform`,
  `base`; or `adapter_weights`) with modulora's router, without a base model (retrieval embeds
  with MiniLM);
- turns it into ONE LoRA (`derive`): an adapter as exported from the library, a mixture as the
  exact concatenated LoRA (cached in the library as derived data), written under `--adapter-dir`;
- makes sure the upstream has it loaded (`upstream`: vLLM's `/v1/load_lora_adapter`, at most
  `--max-loras` adapters, least recently used unloaded);
- forwards the request with `model` set to that adapter's name (streams passed through line by
  line) and adds `routing` (`{"index", "experts", "versions"}` per choice; when streaming, on
  each choice's chunk with its finish_reason).

`arrow` (per-token, per-layer routing, and its `arrow` settings), `mode: "average"` mixtures, `token_routing` and
series / parallel / prefix adapters need modulora's own engine: refused with 400 naming
`modulora serve`.
"""

from .app import add_gateway_command, create_gateway

__all__ = ["add_gateway_command", "create_gateway"]
