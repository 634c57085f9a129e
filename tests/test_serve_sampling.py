"""Request semantics real OpenAI clients rely on, checked with the `openai` client against a real
server on 127.0.0.1 (tiny model, random LoRA adapters): stop strings, max_completion_tokens, n,
seeds (the same text alone or in a mixed batch), sampling, penalties, and log-probabilities equal
to a by-hand computation from the model's logits under the same route."""

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from servers import running

from modulora.base import load_base
from modulora.forward import forward
from modulora.library import Library
from modulora.routing.engine import Engine
from modulora.routing.experts import load_experts
from modulora.routing.layer import RoutingPlan, routing
from modulora.routing.requests import EngineRequest, SamplingParams

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
NAMES = ("a", "b", "c")
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def lib(tmp_path_factory, random_library):
    return random_library(tmp_path_factory.mktemp("sampling"), NAMES)


@pytest.fixture(scope="module")
def base():
    return load_base("tiny", dtype="fp32")


@pytest.fixture(scope="module")
def client(base, lib):
    from modulora.serve import create_app

    with running(create_app(base, Library(lib.root), batch_wait_ms=20)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)


def test_stop_strings_cut_the_text_and_finish_with_stop(client):
    full = client.completions.create(model="a", prompt=PROMPT, max_tokens=12).choices[0]
    assert full.finish_reason == "length" and len(full.text) > 6
    stop = full.text[3:5]
    cut = client.completions.create(model="a", prompt=PROMPT, max_tokens=12, stop=[stop, "never-seen"]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    streamed = client.completions.create(model="a", prompt=PROMPT, max_tokens=12, stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cut.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_and_max_completion_tokens_are_honoured(client):
    msgs = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model="b", messages=msgs, max_completion_tokens=3, temperature=1.0, seed=1)
    assert r.usage.completion_tokens <= 3 and r.choices[0].finish_reason in ("length", "stop")
    r = client.chat.completions.create(model="b", messages=msgs, max_tokens=50, max_completion_tokens=2)
    assert r.usage.completion_tokens <= 2  # max_completion_tokens wins


def test_n_samples_share_a_prompt_and_seeds_reproduce(client):
    kw = dict(model="a", prompt=PROMPT, max_tokens=10, temperature=1.0, top_p=0.95, seed=11)
    two = client.completions.create(n=2, **kw)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.prompt_tokens > 0
    again = client.completions.create(n=2, **kw)
    assert [c.text for c in again.choices] == [c.text for c in two.choices]
    assert client.completions.create(**kw).choices[0].text == two.choices[0].text  # sample 0 of n is seed's
    # alone vs. in a mixed batch of other requests and routes: the same text
    others = [dict(model=m, prompt=p, max_tokens=8, temperature=t, seed=s) for m, p, t, s in
              [("b", "hello", 0.0, None), ("arrow", "12 + 3", 0.7, 5), ("base", "x y", 1.0, 2), ("c", "Peru", 0.0, None)]]
    with ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(client.completions.create, n=2, **kw)] + [pool.submit(client.completions.create, **o)
                                                                        for o in others * 2]
        mixed = futs[0].result()
        [f.result() for f in futs[1:]]
    assert [c.text for c in mixed.choices] == [c.text for c in two.choices]
    # different seeds sample different texts (with 4 tries, the chance of equal texts is negligible)
    texts = {client.completions.create(**dict(kw, seed=s)).choices[0].text for s in range(4)}
    assert len(texts) > 1


def test_penalties_change_what_repeats(client, base):
    kw = dict(model="base", prompt=PROMPT, max_tokens=24)
    plain = client.completions.create(**kw).choices[0]
    penal = client.completions.create(frequency_penalty=2.0, presence_penalty=2.0, **kw).choices[0]
    assert plain.text != penal.text
    eng = Engine(base)  # the same through the engine, counting token ids
    ids = eng.encode_text(PROMPT)
    runs = eng.run([EngineRequest(ids, None, params=SamplingParams(max_tokens=24, **p))
                    for p in ({}, {"frequency_penalty": 2.0, "presence_penalty": 2.0})])
    distinct = [len(set(a.samples[0].token_ids)) for a in runs]
    assert distinct[1] > distinct[0]  # a strong penalty repeats less
    assert eng.decode(runs[1].samples[0].token_ids) == penal.text


def by_hand(base, lib, route, ids):
    """Log-softmax of the model's logits over `ids` under `route`, computed directly."""
    eng = Engine(base)
    eng.use_experts(load_experts(lib, fingerprint=base.fingerprint))
    try:
        plan = RoutingPlan(eng.experts.slots, [route])
        with routing(base.model, plan), torch.inference_mode():
            logits, _ = forward(base.model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        return torch.log_softmax(logits[0].float(), -1)
    finally:
        eng.release()


def test_echo_logprobs_equal_a_hand_computation(client, base, lib):
    ids = base.tokenizer(PROMPT + " Paris")["input_ids"]
    r = client.completions.create(model="a:0.7,b:0.3", prompt=ids, max_tokens=0, echo=True, logprobs=3)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == base.tokenizer.decode(ids) and lp.token_logprobs[0] is None
    logp = by_hand(base, lib, {"a": 0.7, "b": 0.3}, ids)
    want = [float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want)) < 1e-4
    assert len(lp.top_logprobs[1]) == 3
    best = float(logp[0].max())
    assert abs(max(lp.top_logprobs[1].values()) - best) < 1e-4


def test_chat_logprobs_equal_a_hand_computation(client, base, lib):
    msgs = [{"role": "system", "content": "terse"}, {"role": "user", "content": "Peru"}]
    r = client.chat.completions.create(model="c", messages=msgs, max_tokens=5, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    prompt = base.tokenizer(base.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                            add_special_tokens=False)["input_ids"]
    gen_ids = base.tokenizer(r.choices[0].message.content, add_special_tokens=False)["input_ids"]
    logp = by_hand(base, lib, {"c": 1.0}, prompt + gen_ids)
    n = len(prompt)
    greedy_first = float(logp[n - 1].max())
    assert abs(content[0].logprob - greedy_first) < 1e-4  # greedy: the chosen token is the most likely
    assert abs(content[0].top_logprobs[0].logprob - content[0].logprob) < 1e-6


def test_a_sample_of_several_prompts_numbers_choices_as_openai(client):
    r = client.completions.create(model="b", prompt=["one", "two"], n=2, max_tokens=3, temperature=0.5, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert len(r.model_extra["routing"]) == 4


def test_a_prompt_and_max_tokens_past_the_context_are_refused(client, base):
    context = base.model.config.max_position_embeddings
    with pytest.raises(openai.BadRequestError, match=f"context of {context} tokens"):
        client.completions.create(model="a", prompt=PROMPT, max_tokens=context)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="a", prompt=[5] * (context + 1), max_tokens=1)
