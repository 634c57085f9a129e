"""Answer scoring shared by the demo, `modulora eval` and the experiments."""

from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD/SNI convention)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: list[str]) -> float:
    """1.0 when the prediction equals any reference after normalisation."""
    pred = normalize(prediction)
    return float(any(pred == normalize(r) for r in references))


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
