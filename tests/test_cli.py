"""The `modulora` command end to end on the tiny model (in process, real files, real SQLite)."""

import json
import pickle

import pytest

from modulora.cli import main
from modulora.tasks import make_task, write_jsonl


@pytest.fixture()
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("MODULORA_HOME", str(tmp_path / "home"))
    data = write_jsonl(make_task("upper", n=40), tmp_path / "upper.jsonl")
    return tmp_path, data


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_add_list_generate_show_export_remove(env, capsys):
    tmp, data = env
    code, out, _ = run(capsys, "train", "--base", "tiny", "--data", str(data), "--type", "lora", "--steps", "3",
                       "--out", str(tmp / "a"), "--add", "upper", "--dtype", "fp32")
    assert code == 0 and "added to the library as upper v1" in out and json.loads(out[: out.index("}") + 1])["steps"] == 3
    code, out, _ = run(capsys, "library", "add", "upper", str(tmp / "a"), "--base", "tiny")
    assert code == 0 and "upper v2" in out
    code, out, _ = run(capsys, "library", "list")
    assert code == 0 and "upper" in out and "| 2 " in out
    code, out, _ = run(capsys, "generate", "--base", "tiny", "--adapter", "upper@1", "--prompt", "a b",
                       "--prompt", "c d", "--max-new-tokens", "4")
    assert code == 0 and out.count(">>>") == 2
    code, out, _ = run(capsys, "library", "show", "upper", "--version", "1")
    assert code == 0 and json.loads(out)["version"] == 1
    code, out, _ = run(capsys, "library", "export", "upper", str(tmp / "exported"))
    assert code == 0 and (tmp / "exported" / "adapter_model.safetensors").exists()
    code, out, _ = run(capsys, "library", "remove", "upper")
    assert code == 0 and "removed 2" in out
    code, out, err = run(capsys, "generate", "--base", "tiny", "--adapter", "upper", "--prompt", "x")
    assert code == 2 and "no adapter named" in err


def test_bad_inputs_give_one_clear_line(env, capsys):
    tmp, data = env
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    bad = tmp / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{nope\n')
    pkl = tmp / "pkl"
    pkl.mkdir()
    (pkl / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                         "target_modules": ["q_proj"]}))
    (pkl / "adapter_model.bin").write_bytes(pickle.dumps({"x": 1}))
    cases = [
        (["train", "--base", "tiny", "--data", str(empty), "--out", str(tmp / "o")], "no examples"),
        (["train", "--base", "tiny", "--data", str(bad), "--out", str(tmp / "o")], "line 2 is not valid JSON"),
        (["train", "--base", "tiny", "--data", str(tmp / "missing.jsonl"), "--out", str(tmp / "o")], "not found"),
        (["library", "add", "x", str(pkl), "--base", "tiny"], "pickle"),
        (["library", "add", "../x", str(pkl), "--base", "tiny"], "unsafe adapter name"),
        (["train", "--base", "/nonexistent/model", "--data", str(data), "--out", str(tmp / "o")], "not found"),
    ]
    for argv, needle in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2, argv
        assert needle in err and "Traceback" not in err, (argv, err)
    code, out, _ = run(capsys, "library", "list")
    assert "empty" in out
