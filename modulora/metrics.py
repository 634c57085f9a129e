"""Answer scoring shared by the demo, `modulora eval` and the experiments.

Each metric maps (prediction, references) to a score in [0, 1]:
- `em`: exact match after normalisation (SQuAD/SNI convention), best over the references;
- `rougeL`: ROUGE-L F-measure on normalised words (longest common subsequence), best reference;
- `number`: the last number in the prediction equals the reference within 0.001 (LLM-Adapters
  arithmetic);
- `choice`: the first option word (answer1, solution2, option1, ending3, true, false, ...) in the
  prediction equals the reference (LLM-Adapters multiple choice);
- `letter`: the option letter A-E the prediction settles on (AQuA, MathQA).
"""

from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_CHOICE = re.compile(r"\b(answer[1-5]|solution[12]|option[12]|ending[1-4]|true|false)\b")
_LETTER_STATED = re.compile(r"(?:answer is|answer:)\s*\(?([A-E])\b|\(([A-E])\)")
_LETTER_ALONE = re.compile(r"\b([A-E])\b")


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD/SNI convention)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: list[str]) -> float:
    """1.0 when the prediction equals any reference after normalisation."""
    pred = normalize(prediction)
    return float(any(pred == normalize(r) for r in references))


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, references: list[str]) -> float:
    """ROUGE-L F1 on normalised words, best over the references (no stemming)."""
    pred = normalize(prediction).split()
    best = 0.0
    for ref in references:
        r = normalize(ref).split()
        if not pred or not r:
            best = max(best, float(pred == r))
            continue
        lcs = _lcs(pred, r)
        if lcs:
            p, q = lcs / len(pred), lcs / len(r)
            best = max(best, 2 * p * q / (p + q))
    return best


def parse_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def last_number(text: str) -> float | None:
    """The last number written in a text (commas as thousands separators), or None."""
    found = _NUMBER.findall(text)
    return parse_number(found[-1]) if found else None


def number_match(prediction: str, references: list[str]) -> float:
    pred = last_number(prediction)
    if pred is None:
        return 0.0
    return float(any((ref := parse_number(r.strip())) is not None and abs(pred - ref) < 1e-3 for r in references))


def first_choice(text: str) -> str | None:
    found = _CHOICE.search(text.lower())
    return found.group(1) if found else None


def choice_match(prediction: str, references: list[str]) -> float:
    pred = first_choice(prediction)
    return float(pred is not None and any(pred == r.strip().lower() for r in references))


def option_letter(text: str) -> str | None:
    """The letter a text settles on: the last stated one ("answer is C", "(C)"), else the first lone A-E."""
    stated = _LETTER_STATED.findall(text)
    if stated:
        a, b = stated[-1]
        return a or b
    alone = _LETTER_ALONE.search(text)
    return alone.group(1) if alone else None


def letter_match(prediction: str, references: list[str]) -> float:
    pred = option_letter(prediction)
    return float(pred is not None and any(pred == r.strip().upper().strip("()") for r in references))


METRICS = {"em": exact_match, "rougeL": rouge_l, "number": number_match, "choice": choice_match,
           "letter": letter_match}


def fits(metric: str, references: list[str]) -> bool:
    """Whether a metric can score a task whose references look like these (checked before any compute)."""
    if metric == "number":
        return all(parse_number(r.strip()) is not None for r in references)
    if metric == "choice":
        return all(_CHOICE.fullmatch(r.strip().lower()) for r in references)
    if metric == "letter":
        return all(re.fullmatch(r"\(?[A-E]\)?", r.strip(), re.IGNORECASE) for r in references)
    return metric in METRICS


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
