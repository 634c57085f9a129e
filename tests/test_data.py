import json

import pytest

from modulora.data import IGNORE, DataError, Example, collate, encode, load_task, render_prompt, split
from modulora.tasks import make_task, write_jsonl


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_reader_and_split_are_deterministic(tmp_path):
    f = write_jsonl(make_task("add", n=50), tmp_path / "add.jsonl")
    task = load_task(f)
    assert task.name == "add" and len(task.examples) == 50 and task.format == "jsonl"
    a_train, a_val = split(task.examples, holdout=10, seed=3)
    b_train, b_val = split(task.examples, holdout=10, seed=3)
    assert [e.input for e in a_val] == [e.input for e in b_val] and len(a_train) == 40
    _, c_val = split(task.examples, holdout=10, seed=4)
    assert [e.input for e in c_val] != [e.input for e in a_val]
    assert set(map(id, a_val)).isdisjoint(map(id, a_train))


def test_llm_adapters_sni_gsm8k_hellaswag(tmp_path):
    la = write(tmp_path / "la.json", json.dumps(
        [{"instruction": "Is water wet? Answer true or false.", "input": "", "output": "the answer is true",
          "answer": "true"}]))
    t = load_task(la)
    assert t.format == "llm-adapters" and t.examples[0].references == ["true"]
    sni = write(tmp_path / "task1_caps.json", json.dumps({
        "Definition": ["Return the capital."], "Positive Examples": [{"input": "Peru", "output": "Lima"}],
        "Instances": [{"id": "a", "input": "France", "output": ["Paris", "paris"]}]}))
    t = load_task(sni, positive_examples=1)
    assert t.format == "sni" and t.name == "task1_caps" and t.description == "Return the capital."
    assert t.examples[0].references == ["Paris", "paris"] and "Example input: Peru" in t.examples[0].instruction
    g = write(tmp_path / "gsm.jsonl", json.dumps({"question": "1+1?", "answer": "1 and 1 make <<1+1=2>>2\n#### 2"}) + "\n")
    t = load_task(g)
    assert t.format == "gsm8k" and t.examples[0].references == ["2"]
    assert t.examples[0].output == "1 and 1 make 2\nThe answer is 2."  # the calculator annotation dropped
    h = write(tmp_path / "hs.txt", "A man walks\n2\nsits\nruns\nwalks on\nflies\n")
    t = load_task(h)
    assert t.examples[0].references == ["ending3"]


@pytest.mark.parametrize("content,needle", [
    ("", "no examples"),
    ('{"instruction": "x", "output": "y"}\n{"instruction": oops}\n', "line 2 is not valid JSON"),
    ('{"instruction": "x"}\n', "missing field(s) ['output']"),
])
def test_bad_jsonl_names_the_problem(tmp_path, content, needle):
    with pytest.raises(DataError, match=None) as err:
        load_task(write(tmp_path / "bad.jsonl", content))
    assert needle in str(err.value) and "bad.jsonl" in str(err.value)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_task(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="unknown data format"):
        load_task(write(tmp_path / "x.csv", "a,b\n"))


def test_encode_puts_loss_on_answer_only_and_truncates(tiny):
    tok = tiny.tokenizer
    ex = Example("Add the numbers.", "12 + 30", "42")
    ids, labels = encode(tok, ex, max_length=256)
    prompt = tok(render_prompt(tok, ex), add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt)] == prompt and all(x == IGNORE for x in labels[: len(prompt)])
    assert labels[len(prompt):] == ids[len(prompt):] and ids[-1] == tok.eos_token_id
    assert "<|im_start|>assistant" in render_prompt(tok, ex)
    long = Example("word " * 300, "end of input", "answer " * 100)
    ids, labels = encode(tok, long, max_length=64)
    assert len(ids) == 64 and sum(x != IGNORE for x in labels) >= 16
    batch = collate([encode(tok, ex, 256), encode(tok, long, 64)], tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert int(batch["attention_mask"][0].sum()) == len(encode(tok, ex, 256)[0])
