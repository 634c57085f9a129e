"""`modulora generate --route ...`, `router train`, `merge` and `build` through the CLI on the tiny model."""

import pytest

from modulora.cli import main
from modulora.tasks import make_task, write_jsonl
from modulora.routing.api import Router, parse_fixed
from modulora.routing.experts import RoutingError


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """A library of three tiny LoRAs trained on generated tasks (each with card samples)."""
    tmp = tmp_path_factory.mktemp("routing-cli")
    for name in ("upper", "add", "capital"):
        data = write_jsonl(make_task(name, n=40), tmp / f"{name}.jsonl")
        assert main(["--library", str(tmp / "lib"), "train", "--base", "tiny", "--data", str(data), "--steps", "2",
                     "--out", str(tmp / name), "--add", name, "--dtype", "fp32", "--rank", "4"]) == 0
    return tmp / "lib"


def run(capsys, lib, *argv):
    code = main(["--library", str(lib), *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("route,expect", [
    ("uniform", "add 0.33"), ("upper", "upper 1.00"), ("upper:3,add:1", "upper 0.75, add 0.25"),
    ("arrow", "layer  0:"), ("retrieval", "routing:"),
])
def test_generate_with_each_route_explains_its_experts(capsys, lib, route, expect):
    code, out, err = run(capsys, lib, "generate", "--base", "tiny", "--route", route, "--prompt",
                         "Rewrite the text in capital letters.\n\napple river", "--max-new-tokens", "3", "--explain")
    assert code == 0, err
    assert expect in out, out


def test_router_train_then_learned_route(capsys, lib):
    code, out, err = run(capsys, lib, "generate", "--base", "tiny", "--route", "learned", "--prompt", "x")
    assert code == 2 and "router train" in err
    code, out, err = run(capsys, lib, "router", "train", "--epochs", "20")
    assert code == 0 and "3 adapters" in out, err
    code, out, err = run(capsys, lib, "generate", "--base", "tiny", "--route", "learned", "--prompt",
                         "Add the two numbers. Answer with the sum only.\n\n12 + 30", "--max-new-tokens", "2",
                         "--explain")
    assert code == 0 and "add 1.00" in out, (out, err)


def test_merge_command_makes_a_routable_adapter(capsys, lib):
    code, out, err = run(capsys, lib, "merge", "--method", "concat", "--adapters", "upper,add", "--name", "both")
    assert code == 0, err
    code, out, err = run(capsys, lib, "generate", "--base", "tiny", "--route", "both", "--prompt", "a",
                         "--max-new-tokens", "2", "--explain")
    assert code == 0 and "both 1.00" in out, err


@pytest.mark.parametrize("argv,needle", [
    (["--route", "nosuch"], "unknown adapter 'nosuch'"),
    (["--route", "arrow", "--top-k", "9"], "top_k=9"),
    (["--route", "upper:-1"], "weights must be positive"),
])
def test_bad_routes_are_clear_errors(capsys, lib, argv, needle):
    code, out, err = run(capsys, lib, "generate", "--base", "tiny", "--prompt", "x", *argv)
    assert code == 2 and needle in err and "Traceback" not in err, err


def test_empty_library_and_other_base_refused(capsys, tmp_path, lib, tiny):
    code, out, err = run(capsys, tmp_path / "empty", "generate", "--base", "tiny", "--route", "uniform", "--prompt", "x")
    assert code == 2 and "empty" in err
    from modulora.library import Library

    other = dict(tiny.fingerprint, id="0000", weights="ffff")
    with pytest.raises(RoutingError, match="another base"):
        Router(type("B", (), {"fingerprint": other})(), Library(lib)).experts()
    assert parse_fixed("a, b") == {"a": 0.5, "b": 0.5}


def test_explain_summarises_the_requests_own_tokens(tiny):
    from modulora.data import Example, render_prompt
    from modulora.routing.engine import Engine

    tok, eng = tiny.tokenizer, Engine(tiny)
    for text in ["apple river stone", "a"]:
        ids, (lo, hi) = eng.encode_prompt(text)
        assert ids == tok(render_prompt(tok, Example("", text, "")), add_special_tokens=False)["input_ids"]
        assert tok.decode(ids[lo:hi]).strip() == text


def test_arrow_settings_reach_the_route(capsys, lib, tiny):
    """--arrow-* on the command line and `arrow=` in the API: a module Arrow does not route in
    mixes every expert equally; settings for a route that is not Arrow are refused."""
    from modulora.library import Library

    r = Router(tiny, Library(lib))
    equal = {n: 1 / len(r.lora_names()) for n in r.lora_names()}  # earlier tests may have added adapters
    prompt = "Rewrite the text in capital letters.\n\napple river"
    a = r.answer([prompt], ["arrow"], top_k=1, max_new_tokens=2, explain=True, arrow={"modules": r"mlp"})[0]
    for module, weights in a.per_layer.items():
        if "mlp" not in module:
            assert weights == pytest.approx(equal), module
    plain = r.answer([prompt], ["arrow"], top_k=1, max_new_tokens=2, explain=True)[0]
    assert any(w != pytest.approx(equal) for m, w in plain.per_layer.items() if "mlp" not in m)
    with pytest.raises(RoutingError, match="unknown Arrow setting 'temp'"):
        r.resolve([prompt], ["arrow"], top_k=1, arrow={"temp": 2})
    code, out, err = run(capsys, lib, "generate", "--base", "tiny", "--route", "arrow", "--top-k", "2",
                         "--arrow-prototypes", "spectral", "--arrow-temperature", "0.5", "--arrow-cosine",
                         "--prompt", prompt, "--max-new-tokens", "2", "--explain")
    assert code == 0 and "layer  0:" in out, err
    code, out, err = run(capsys, lib, "generate", "--base", "tiny", "--route", "arrow", "--arrow-modules", "mlp(",
                         "--prompt", prompt, "--max-new-tokens", "2")
    assert code == 2 and "regular expression" in err and "Traceback" not in err, err
    with pytest.raises(SystemExit, match="apply to --route arrow"):
        run(capsys, lib, "generate", "--base", "tiny", "--route", "uniform", "--arrow-cosine", "--prompt", prompt)
