"""A tiny randomly initialised Llama and a small byte-level tokenizer, built locally.

Tests and `--quick` runs use it so that everything runs in seconds with no download. It has the
same module names as SmolLM2, a chat template of the same shape, and a fixed seed.
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


def tiny_model(seed: int = 0):
    """A 2-layer Llama of width 64 with random weights (deterministic for a seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.2,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.config.name_or_path = "tiny"
    return model.eval(), tok
