"""Tiny randomly initialised causal LMs and a small byte-level tokenizer, built locally.

Tests and `--quick` runs use them so that everything runs in seconds with no download. The default
Llama has the same module names as SmolLM2, a chat template of the same shape, and a fixed seed;
Mistral, Qwen2, Phi-3 and Gemma2 models of the same size check that adapters and routing work on
those families too.
"""

from __future__ import annotations

import functools
import string

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The capital of France is Paris. Answer the question. Reverse the word. Add the numbers.",
    "user assistant system instruction input output answer task example the of and to in is",
    string.ascii_lowercase, string.ascii_uppercase, string.digits, string.punctuation,
    "0 1 2 3 4 5 6 7 8 9 10 11 12 plus minus times equals yes no true false",
]


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A 384-token byte-level BPE tokenizer with `<|im_start|>`/`<|im_end|>` specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>", unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


FAMILIES = ("llama", "mistral", "qwen2", "phi3", "gemma2")


def _family_config(family: str, tok):
    """The transformers config and model class of a 2-layer, width-64 model of `family`.

    Each family keeps what sets it apart from Llama: Mistral's sliding-window cache layers,
    Qwen2's biased q/k/v, Phi-3's fused qkv_proj / gate_up_proj, Gemma2's head_dim that is not
    width / heads, its logit softcapping and alternating sliding / full attention layers.
    """
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; use one of {', '.join(FAMILIES)}")
    common = {
        "vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
        "initializer_range": 0.2, "tie_word_embeddings": True, "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
    }
    extra = {"gemma2": {"head_dim": 32, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                        "sliding_window": 512}}.get(family, {})
    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "phi3": "Phi3", "gemma2": "Gemma2"}[family]
    cfg = getattr(transformers, f"{names}Config")(**common, **extra)
    cfg.architectures = [f"{names}ForCausalLM"]
    return cfg, getattr(transformers, f"{names}ForCausalLM")


def tiny_model(seed: int = 0, family: str = "llama"):
    """A 2-layer model of width 64 with random weights (deterministic for a seed) of one of
    FAMILIES; the default Llama has the same module names as SmolLM2."""
    tok = tiny_tokenizer()
    cfg, cls = _family_config(family, tok)
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = cls(cfg)
    model.config.name_or_path = "tiny" if family == "llama" else f"tiny-{family}"
    return model.eval(), tok


def tiny_family(name: str) -> str | None:
    """The family a tiny base name asks for (`tiny` -> llama, `tiny-qwen2` -> qwen2), or None."""
    if name == "tiny":
        return "llama"
    family = name[len("tiny-"):] if name.startswith("tiny-") else None
    return family if family in FAMILIES else None
