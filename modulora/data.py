"""Task data: readers for the common formats, prompt rendering, tokenisation with loss on the
answer only, and a deterministic train/validation split.

Truncation rule (stated once, used everywhere): a prompt longer than the budget loses tokens from
its start (the instance input sits at the end and matters most); the answer is cut at its end, and
at least a quarter of `max_length` is kept for it.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

IGNORE = -100
ALPACA = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


class DataError(ValueError):
    """A data file cannot be read; the message names the file and the problem."""


@dataclass
class Example:
    instruction: str
    input: str
    output: str                      # the training target
    references: list[str] = field(default_factory=list)  # acceptable answers, for scoring
    id: str = ""

    def __post_init__(self):
        if not self.references:
            self.references = [self.output]


@dataclass
class Task:
    name: str
    description: str
    examples: list[Example]
    format: str = ""


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def detect_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".txt.bz2") or name.endswith(".txt"):
        return "hellaswag"
    if name.endswith(".tsv"):
        return "flan-cot"
    if name.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        try:
            keys = set(json.loads(first)) if first else set()
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line 1 is not valid JSON ({e.msg})") from None
        return "gsm8k" if {"question", "answer"} <= keys and "instruction" not in keys else "jsonl"
    if name.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
        if head.startswith("{"):
            return "sni"
        if head.startswith("["):
            return "llm-adapters"
    raise DataError(f"{path}: unknown data format (expected .jsonl, LLM-Adapters .json, "
                    "Super-NaturalInstructions task .json, GSM8K .jsonl, FLAN CoT .tsv or HellaSwag .txt)")


def _jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {n} is not a JSON object")
            rows.append(row)
    return rows


def _need(row: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}")


def read_jsonl(path: Path) -> list[Example]:
    out = []
    for n, row in enumerate(_jsonl(path), 1):
        _need(row, ("instruction", "output"), f"{path}: record {n}")
        refs = row.get("references") or [str(row["output"])]
        out.append(Example(str(row["instruction"]), str(row.get("input") or ""), str(row["output"]),
                           [str(r) for r in refs], str(row.get("id", n))))
    return out


def read_llm_adapters(path: Path) -> list[Example]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    out = []
    for n, row in enumerate(rows, 1):
        _need(row, ("instruction",), f"{path}: record {n}")
        answer = str(row.get("answer", row.get("output", "")))
        target = str(row.get("output") or answer)
        out.append(Example(str(row["instruction"]), str(row.get("input") or ""), target, [answer], str(n)))
    return out


def read_sni(path: Path, positive_examples: int = 0) -> tuple[list[Example], str]:
    try:
        task = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    _need(task, ("Definition", "Instances"), str(path))
    definition = " ".join(task["Definition"]) if isinstance(task["Definition"], list) else str(task["Definition"])
    instruction = definition.strip()
    for ex in (task.get("Positive Examples") or [])[:positive_examples]:
        instruction += f"\n\nExample input: {ex['input']}\nExample output: {ex['output']}"
    out = []
    for n, inst in enumerate(task["Instances"], 1):
        _need(inst, ("input", "output"), f"{path}: instance {n}")
        refs = inst["output"] if isinstance(inst["output"], list) else [inst["output"]]
        if not refs:
            raise DataError(f"{path}: instance {n} has no reference output")
        out.append(Example(instruction, str(inst["input"]), str(refs[0]), [str(r) for r in refs],
                           str(inst.get("id", n))))
    return out, definition


def read_gsm8k(path: Path) -> list[Example]:
    """GSM8K's calculator annotations (`<<48/2=24>>`) are dropped from the rationale: they are
    calls to a tool the model does not have, about a third of the tokens, and nothing to learn."""
    out = []
    for n, row in enumerate(_jsonl(path), 1):
        _need(row, ("question", "answer"), f"{path}: record {n}")
        final = str(row["answer"]).split("####")[-1].strip().replace(",", "")
        rationale = re.sub(r"<<[^<>]*>>", "", str(row["answer"]).split("####")[0]).strip()
        target = f"{rationale}\nThe answer is {final}."
        out.append(Example("Solve the math word problem. End with 'The answer is N.'", str(row["question"]),
                           target, [final], str(n)))
    return out


def read_flan_cot(path: Path) -> list[Example]:
    """FLAN chain-of-thought TSV: question, answer, rationale (newlines written as \\n)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            cols = line.rstrip("\n").split("\t")
            if len(cols) != 3:
                raise DataError(f"{path}: line {n} has {len(cols)} tab-separated fields, expected 3 "
                                "(question, answer, rationale)")
            question, answer, rationale = (c.replace("\\n", "\n").strip() for c in cols)
            out.append(Example(question, "", f"{rationale}\nThe answer is {answer}.", [answer.strip("()")], str(n)))
    return out


def read_hellaswag(path: Path) -> list[Example]:
    opener = bz2.open if path.name.endswith(".bz2") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    if len(lines) % 6:
        raise DataError(f"{path}: expected items of 6 lines (context, label, 4 endings), got {len(lines)} lines")
    out = []
    for i in range(0, len(lines), 6):
        ctx, label, endings = lines[i], lines[i + 1], lines[i + 2:i + 6]
        if not label.strip().isdigit():
            raise DataError(f"{path}: item {i // 6 + 1} has a non-numeric label {label!r}")
        options = "\n".join(f"Ending{j + 1}: {e}" for j, e in enumerate(endings))
        answer = f"ending{int(label) + 1}"
        out.append(Example("Please choose the correct ending to complete the given sentence. "
                           "Answer with ending1, ending2, ending3 or ending4.",
                           f"{ctx}\n{options}", answer, [answer], str(i // 6 + 1)))
    return out


def load_task(path: str | Path, positive_examples: int = 0) -> Task:
    """Read one data file in any supported format into a Task (name from the file name)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    fmt = detect_format(path)
    description = ""
    if fmt == "jsonl":
        examples = read_jsonl(path)
    elif fmt == "llm-adapters":
        examples = read_llm_adapters(path)
    elif fmt == "sni":
        examples, description = read_sni(path, positive_examples)
    elif fmt == "gsm8k":
        examples = read_gsm8k(path)
    elif fmt == "flan-cot":
        examples = read_flan_cot(path)
    else:
        examples = read_hellaswag(path)
    if not examples:
        raise DataError(f"{path}: no examples in file")
    name = path.name.split(".")[0]
    if fmt == "llm-adapters" and name in ("train", "test"):
        name = path.parent.name
    if not description and examples:
        description = examples[0].instruction[:300]
    return Task(name=name, description=description, examples=examples, format=fmt)


def split(examples: list[Example], holdout: int | float = 0.1, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Deterministic split: a seeded shuffle, the last `holdout` examples (a count, or a fraction) held out."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n = int(round(holdout * len(examples))) if isinstance(holdout, float) and holdout < 1 else int(holdout)
    if n >= len(examples):
        raise DataError(f"cannot hold out {n} of {len(examples)} examples")
    keep, held = order[: len(order) - n], order[len(order) - n:]
    return [examples[i] for i in keep], [examples[i] for i in held]


def sample(examples: list[Example], n: int | None, seed: int = 0) -> list[Example]:
    """A seeded subsample of at most `n` examples (all of them, in order, when n is None or larger)."""
    if n is None or n >= len(examples):
        return list(examples)
    idx = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in idx]


def mixture(tasks: list[Task], per_task: int | None, name: str, seed: int = 0) -> Task:
    """One task from several: a seeded sample of at most `per_task` examples of each, shuffled together."""
    examples = [ex for t in tasks for ex in sample(t.examples, per_task, seed)]
    random.Random(seed).shuffle(examples)
    return Task(name=name, description="Mixture of " + ", ".join(t.name for t in tasks), examples=examples,
                format="mixed")


def user_text(ex: Example) -> str:
    """What the user says in the chat prompt: the instruction, then the input."""
    user = ex.instruction.strip()
    if ex.input.strip():
        user = f"{user}\n\n{ex.input.strip()}" if user else ex.input.strip()
    return user


def render_prompt(tokenizer, ex: Example) -> str:
    """The prompt text: the base's chat template when it has one, else the Alpaca layout."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user_text(ex)}],
                                             add_generation_prompt=True, tokenize=False)
    return ALPACA.format(instruction=ex.instruction.strip(), input=ex.input.strip())


def encode(tokenizer, ex: Example, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE on the prompt) for one example, truncated by the stated rule."""
    prompt = tokenizer(render_prompt(tokenizer, ex), add_special_tokens=False)["input_ids"]
    answer = tokenizer(ex.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    answer = answer[: max(max_length - len(prompt), max_length // 4)]
    prompt = prompt[max(0, len(prompt) - (max_length - len(answer))):]
    return prompt + answer, [IGNORE] * len(prompt) + answer


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a training batch; padded labels are IGNORE."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
