"""The evaluation harness: metrics, task preparation, resumable evaluation, log-likelihood scoring,
and the command line's refusals before any compute."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modulora.data import DataError, load_task
from modulora.evaluate import (EvalError, Method, evaluate, mixed_task, options_of, prepare_task,
                               right_expert_rate, task_files)
from modulora.metrics import (choice_match, exact_match, fits, last_number, letter_match, number_match,
                              option_letter, rouge_l)
from modulora.tasks import make_task, write_jsonl


def test_metrics():
    assert exact_match("The Paris.", ["paris"]) == 1.0
    assert rouge_l("the cat sat on the mat", ["cat sat on mat"]) == 1.0  # articles dropped
    assert rouge_l("p b c d", ["p x c y"]) == pytest.approx(0.5)
    assert rouge_l("", ["x"]) == 0.0 and rouge_l("q", ["x", "q"]) == 1.0
    assert last_number("He has 3 apples, then 1,250.5 more. The answer is 18.") == 18.0
    assert number_match("so 7 - 3 = 4. The answer is 4.", ["4.0"]) == 1.0
    assert number_match("The answer is 4.001", ["4"]) == 0.0
    assert number_match("no number here", ["4"]) == 0.0
    assert choice_match("the correct answer is answer3 because answer1 is wrong", ["answer3"]) == 1.0
    assert choice_match("answer1", ["answer3"]) == 0.0
    assert choice_match("The correct answer is TRUE", ["true"]) == 1.0
    assert option_letter("Rationale ... The answer is (D).") == "D"
    assert letter_match("(A) then (C)", ["C"]) == 1.0
    assert letter_match("I think B", ["b"]) == 1.0
    assert fits("number", ["4", "1,200.5"]) and not fits("number", ["Paris"])
    assert fits("choice", ["answer1", "solution2"]) and not fits("choice", ["maybe"])
    assert fits("letter", ["A", "(E)"]) and not fits("letter", ["F"])


def _write_la(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def test_prepare_task_metrics_and_refusals(tmp_path):
    math = _write_la(tmp_path / "la" / "AddSub" / "test.json",
                     [{"instruction": f"What is {i} + 1?", "input": "", "output": "", "answer": str(i + 1)}
                      for i in range(30)])
    mc = _write_la(tmp_path / "la" / "boolq" / "test.json",
                   [{"instruction": "Is it? Answer format: true/false", "input": "", "output": "",
                     "answer": "true" if i % 2 else "false"} for i in range(10)])
    t = prepare_task(math, n=8, seed=3)
    assert t.name == "AddSub" and t.metrics == ["number"] and len(t.examples) == 8
    assert [e.id for e in t.examples] == [e.id for e in prepare_task(math, n=8, seed=3).examples]  # seeded
    assert [e.id for e in t.examples] != [e.id for e in prepare_task(math, n=8, seed=4).examples]
    assert prepare_task(mc).metrics == ["choice"]
    assert options_of(prepare_task(mc).examples[0], "choice") == ["false", "true"]
    assert [n for n, _ in task_files(tmp_path / "la")] == ["AddSub", "boolq"]
    with pytest.raises(EvalError, match="does not fit task boolq"):
        prepare_task(mc, metric="number")
    with pytest.raises(EvalError, match="unknown metric"):
        prepare_task(mc, metric="bleu")
    with pytest.raises(EvalError, match="multiple-choice"):
        prepare_task(math, loglik=True)
    empty = tmp_path / "task9_empty.json"
    empty.write_text(json.dumps({"Definition": ["Say hi."], "Instances": []}))
    with pytest.raises(DataError, match="no examples"):
        prepare_task(empty)
    odd = tmp_path / "data.parquet"
    odd.write_bytes(b"PAR1")
    with pytest.raises(DataError, match="unknown data format"):
        prepare_task(odd)


def test_flan_cot_reader(tmp_path):
    p = tmp_path / "aqua_train.tsv"
    p.write_text("What is 1+1?\\nOptions:\\n(A) 2\\n(B) 3\t(A)\t1+1 = 2\n")
    ex = load_task(p).examples[0]
    assert ex.instruction == "What is 1+1?\nOptions:\n(A) 2\n(B) 3"
    assert ex.output.endswith("The answer is (A).") and ex.references == ["A"]
    assert options_of(ex, "letter") == ["A", "B"]
    bad = tmp_path / "bad.tsv"
    bad.write_text("only\ttwo\n")
    with pytest.raises(DataError, match="line 1 has 2 tab-separated fields"):
        load_task(bad)


@pytest.fixture(scope="module")
def tiny_library(tmp_path_factory, tiny):
    """Two tiny LoRAs in a library, and their task files."""
    from modulora.adapters import AdapterConfig
    from modulora.library import Library
    from modulora.train import TrainConfig, train_adapter

    root = tmp_path_factory.mktemp("evallib")
    lib = Library(root / "lib")
    files = {}
    for name in ("capital", "upper"):
        task = make_task(name, 40, seed=1)
        files[name] = write_jsonl(task, root / f"{name}.jsonl")
        train_adapter(tiny, task, AdapterConfig(r=4), TrainConfig(steps=3, batch_size=4, max_length=64),
                      root / "ad" / name, progress=False)
        lib.add(name, root / "ad" / name, tiny.fingerprint)
    return lib.root, files


def test_evaluate_resumes_and_reports(tmp_path, tiny, tiny_library):
    lib, files = tiny_library
    tasks = [prepare_task(files["capital"], n=6, max_new_tokens=4), prepare_task(files["upper"], n=6,
                                                                                max_new_tokens=4)]
    methods = [Method("base"), Method("capital", "capital"), Method("arrow", "arrow", top_k=2)]
    out = tmp_path / "run"
    res = evaluate(tiny, tasks, methods, out, library=str(lib), batch_size=4, progress=False)
    preds = (out / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 3 * 12
    for f in ("results.json", "results.md", "accuracy.png", "routing.png", "settings.json"):
        assert (out / f).stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["predictions"]) == 36 and set(saved["scores"]) == {"base", "capital", "arrow"}
    assert all(r["experts"] == {"capital": 1.0} for r in saved["predictions"] if r["method"] == "capital")
    arrow_w = res.routing["arrow"]["capital"]
    assert set(arrow_w) <= {"capital", "upper"} and sum(arrow_w.values()) == pytest.approx(1.0, abs=1e-3)
    assert "| base" in (out / "results.md").read_text()

    # an interrupted run: drop the last 10 predictions and cut one line in half; the rerun makes
    # exactly those again, and gives the same answers as before
    kept = preds[:-10]
    (out / "predictions.jsonl").write_text("\n".join(kept) + "\n" + preds[-10][:20] + "\n")
    res2 = evaluate(tiny, tasks, methods, out, library=str(lib), batch_size=4, progress=False)
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines() if x.endswith("}")]
    assert len(lines) == 36
    assert res2.scores == res.scores
    assert sorted(r["prediction"] for r in res2.predictions) == sorted(r["prediction"] for r in res.predictions)

    # the same folder with other settings for a method already there is refused
    with pytest.raises(EvalError, match="other settings"):
        evaluate(tiny, tasks, [Method("capital", "upper")], out, library=str(lib), progress=False)
    # a folder written before Method had its `arrow` field resumes (it ran the default); a method
    # with Arrow settings is recorded with them, and other settings under its name are refused
    settings = json.loads((out / "settings.json").read_text())
    for m in settings["methods"].values():
        del m["arrow"]
    (out / "settings.json").write_text(json.dumps(settings))
    a_side = Method("arrow a", "arrow", top_k=2, arrow={"prototypes": "a", "modules": "mlp"})
    res3 = evaluate(tiny, tasks, methods + [a_side], out, library=str(lib), batch_size=4, progress=False)
    assert res3.scores["arrow"] == res.scores["arrow"] and set(res3.routing["arrow a"]["capital"]) == {"capital",
                                                                                                        "upper"}
    assert json.loads((out / "settings.json").read_text())["methods"]["arrow a"]["arrow"] == a_side.arrow
    with pytest.raises(EvalError, match="other settings"):
        evaluate(tiny, tasks, [Method("arrow a", "arrow", top_k=2)], out, library=str(lib), progress=False)


def test_route_checks_before_compute(tmp_path, tiny_library):
    lib, files = tiny_library
    task = prepare_task(files["capital"], n=2)
    with pytest.raises(EvalError, match="'nope'"):
        evaluate(None, [task], [Method("x", "nope")], tmp_path / "o", library=str(lib), progress=False)
    with pytest.raises(EvalError, match="top_k=5"):
        evaluate(None, [task], [Method("x", "arrow", top_k=5)], tmp_path / "o", library=str(lib), progress=False)
    with pytest.raises(EvalError, match="'geography'"):  # oracle routes need the task's own adapter
        evaluate(None, [prepare_task(files["capital"], n=2, name="geography")], [Method("o", "own")],
                 tmp_path / "o", library=str(lib), progress=False)
    with pytest.raises(EvalError, match="Arrow settings"):
        evaluate(None, [task], [Method("x", "capital", arrow={"normalize": True})], tmp_path / "o",
                 library=str(lib), progress=False)
    with pytest.raises(EvalError, match="Arrow settings"):
        evaluate(None, [task], [Method("x", "arrow", arrow={"temp": 1.0})], tmp_path / "o", library=str(lib),
                 progress=False)
    with pytest.raises(EvalError, match="library not found"):
        evaluate(None, [task], [Method("o", "own")], tmp_path / "o", library=str(tmp_path / "none"), progress=False)
    assert not (tmp_path / "o").exists()


def test_mixed_task_and_own_route(tmp_path, tiny, tiny_library):
    lib, files = tiny_library
    tasks = [prepare_task(files[n], n=4, max_new_tokens=3, name=n) for n in ("capital", "upper")]
    mixed = mixed_task(tasks, seed=1)
    assert len(mixed.examples) == 8 and sorted(set(mixed.sources)) == ["capital", "upper"]
    assert mixed.sources != sorted(mixed.sources)  # shuffled: batches mix tasks
    methods = [Method("own", "own"), Method("retrieval", "retrieval"),
               Method("ood", "retrieval", exclude_own=True)]
    res = evaluate(tiny, [mixed], methods, tmp_path / "m", library=str(lib), batch_size=8, progress=False)
    own = [r for r in res.predictions if r["method"] == "own"]
    assert all(r["experts"] == {r["source"]: 1.0} for r in own)
    assert right_expert_rate(res, "own", "mixed") == 1.0
    assert right_expert_rate(res, "ood", "mixed") == 0.0  # never its own expert


def test_loglik_matches_direct_computation(tiny, tiny_library):
    """Routed continuation scores equal log-probabilities computed by hand from the model's logits
    (the base alone, and one adapter attached the ordinary way)."""
    from modulora.data import Example, render_prompt
    from modulora.generate import using_adapter
    from modulora.library import Library
    from modulora.routing.api import Router
    from modulora.routing.score import continuation_logprobs

    lib, _ = tiny_library
    library = Library(lib)
    router = Router(tiny, library)
    prompts = ["Is the sky green? true or false", "Pick: answer1 or answer2"]
    conts = [["the correct answer is true", "the correct answer is false"],
             ["the correct answer is answer1", "the correct answer is answer2", "x"]]
    tok = tiny.tokenizer

    def by_hand(model, prompt, cont):
        p = tok(render_prompt(tok, Example("", prompt, "")), add_special_tokens=False)["input_ids"]
        c = tok(cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c])).logits.float()
        lp = torch.log_softmax(logits[0], -1)
        return float(sum(lp[len(p) - 1 + j, t] for j, t in enumerate(c)))

    for route in ("base", "upper"):
        got = continuation_logprobs(router, prompts, conts, [route, route], batch_size=3)
        with using_adapter(tiny, None if route == "base" else library.get(route).path) as model:
            want = [[by_hand(model, p, c) for c in cs] for p, cs in zip(prompts, conts)]
        for g, w in zip(got, want):
            assert g == pytest.approx(w, abs=1e-3)


def test_cli_eval_end_to_end_and_bad_input(tmp_path, tiny_library):
    lib, files = tiny_library
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "modulora.cli", "--library", str(lib), "eval", "--base", "tiny"]
    r = subprocess.run(cmd + ["--data", str(files["capital"]), "--route", "base", "--route", "capital",
                              "--n", "4", "--max-new-tokens", "3", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| capital" in r.stdout and (tmp_path / "o" / "results.md").exists()
    r = subprocess.run(cmd + ["--data", str(files["capital"]), "--route", "missing", "--out", str(tmp_path / "p")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "p").exists()
    r = subprocess.run(cmd + ["--data", str(files["capital"]), "--metric", "number", "--out", str(tmp_path / "p")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "does not fit" in r.stderr


def test_paired_difference_tells_gap_from_noise():
    """A method right on every example where the other is wrong has an interval far above 0; two
    methods that differ on one example of many have an interval that spans 0; different example
    sets are refused."""
    from modulora.evaluate import Results, paired_difference

    def results(a_scores, b_scores):
        preds = [{"method": m, "task": "t", "id": str(i), "scores": {"em": s}}
                 for m, sc in (("a", a_scores), ("b", b_scores)) for i, s in enumerate(sc)]
        return Results(tasks=["t"], methods=["a", "b"], metrics={"t": ["em"]}, scores={}, routing={},
                       n={"t": len(a_scores)}, predictions=preds)

    d, lo, hi = paired_difference(results([1.0] * 30 + [0.0] * 10, [0.0] * 40), "a", "b")
    assert d == pytest.approx(75.0) and 55 < lo < d < hi <= 100
    d, lo, hi = paired_difference(results([1.0] + [0.0] * 99, [0.0] * 100), "a", "b")
    assert d == pytest.approx(1.0) and lo <= 0 < hi
    assert paired_difference(results([1.0] * 5, [0.0] * 5), "b", "a")[0] == pytest.approx(-100.0)
    bad = results([1.0] * 5, [0.0] * 4)
    with pytest.raises(EvalError, match="same examples"):
        paired_difference(bad, "a", "b")


def test_the_results_table_and_plot_put_the_longer_list_in_rows(tmp_path):
    """Methods as rows while they are at least as many as the tasks; else tasks as rows (16
    held-out tasks against 10 methods would make a table 18 columns wide, and 170 bars): the
    plot then is a task-by-method heatmap of a readable size. Routing heatmaps show each
    method's own experts."""
    from PIL import Image

    from modulora.evaluate import Results, plot_routing, plot_scores

    def results(tasks, methods):
        scores = {m: {t: {"em": (i + j) / 10, "rougeL": 0.5} for j, t in enumerate(tasks)} for i, m in enumerate(methods)}
        routing = {m: {t: ({f"{m}-expert-{j}": 1.0} if m != "base" else {}) for j, t in enumerate(tasks)}
                   for m in methods}
        return Results(tasks, methods, {t: ["em", "rougeL"] for t in tasks}, scores, routing, {t: 1 for t in tasks}, [])

    sizes = {}
    for label, (n_tasks, n_methods) in {"bars": (2, 3), "heatmap": (16, 10)}.items():
        res = results([f"task{j:02d}_some_long_name" for j in range(n_tasks)], ["base"] + [f"m{i}" for i in range(n_methods - 1)])
        sizes[label] = Image.open(plot_scores(res, tmp_path / f"{label}.png")).size
        w, h = Image.open(plot_routing(res, tmp_path / f"{label}-routing.png")).size
        assert w <= 120 * 3 * max(4.0, 0.3 * n_tasks + 2.5) + 1  # each method's own experts, not the union
    assert sizes["heatmap"][0] < 2000 and sizes["heatmap"][1] > sizes["heatmap"][0] / 2  # not 40 inches wide

    def cells(line):
        return [c.strip() for c in line.split("|")[1:-1]]

    wide = results(["a", "b"], ["base", "x", "y"]).markdown().splitlines()
    assert cells(wide[0]) == ["method", "a (em)", "b (em)", "average"]
    assert cells(wide[3]) == ["x", "10.0", "20.0", "15.0"]
    long = results(["a", "b", "c"], ["base", "x"]).markdown(1).splitlines()
    assert cells(long[0]) == ["task", "base", "x"]
    assert cells(long[2]) == ["a (rougeL)", "50.0", "50.0"]
    assert cells(long[-1]) == ["average", "50.0", "50.0"]
    assert cells(results(["a", "b", "c"], ["base", "x"]).markdown().splitlines()[-1]) == ["average", "10.0", "20.0"]
