"""Real clients against a real `modulora serve` on 127.0.0.1 (tiny model, random LoRA adapters).

- lm-eval's `local-completions` (token ids, greedy), in-process, on small local tasks whose prompt
  is the chat-rendered text `modulora eval` uses: once `generate_until` with an `until` stop string
  that cuts some answers, once `multiple_choice` (log-likelihoods from echoed prompt logprobs).
  Each is run with the tokenizer lm-eval discovers from the server (its default, `auto`: the
  `remote` backend over `/tokenizer_info` and `/tokenize`) and with the tiny tokenizer saved to a
  local folder (`huggingface`); the per-item answers and accuracies must equal `modulora eval`'s
  (generation, and `--loglik`) on the same items and route.
- LangChain's `ChatOpenAI`: invoke, stream, max_tokens, the greedy default, and a clear 400 for
  an option the server does not implement (tools).
"""

import json
import os
import tempfile

# lm-eval reads its local task data through `datasets`: nothing may reach a hub, and its cache
# stays out of the user's home
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="modulora-test-datasets-"))

import openai  # noqa: E402
import pytest  # noqa: E402

from servers import running  # noqa: E402

from modulora.base import load_base  # noqa: E402
from modulora.data import Example, render_prompt  # noqa: E402
from modulora.library import Library  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning",
                                        "ignore::DeprecationWarning")
NAMES = ("a", "b")
ROUTE = "a"
GEN_TOKENS = 32  # modulora eval's default for `em` tasks; lm-eval's max_gen_toks is set to it
NO_ANSWER = "no such answer"

GEN_ITEMS = [  # (instruction, input)
    ("Reverse the word.", "answer"), ("Add the numbers.", "3 plus 4"), ("Answer the question.", "The capital of France is"),
    ("Reverse the word.", "input"), ("Add the numbers.", "10 plus 2"), ("Answer the question.", "Is 7 odd?"),
    ("Give the output.", "example task"), ("Reverse the word.", "system"), ("Add the numbers.", "1 plus 11"),
    ("Answer the question.", "What is the of and to?"), ("Give the output.", "user assistant"),
    ("Answer yes or no.", "Is Paris in France?"), ("Add the numbers.", "5 minus 2"), ("Reverse the word.", "output"),
]
MC_ITEMS = [  # (instruction, input, reference)
    ("Answer true or false.", "Paris is the capital of France.", "true"),
    ("Answer true or false.", "2 plus 2 equals 5.", "false"),
    ("Answer true or false.", "The word reversed is drow.", "true"),
    ("Choose answer1, answer2 or answer3.", "3 plus 4: answer1 7, answer2 8, answer3 9", "answer1"),
    ("Choose answer1, answer2 or answer3.", "10 minus 2: answer1 12, answer2 8, answer3 6", "answer2"),
    ("Choose option1 or option2.", "Which is odd? option1 7, option2 8", "option1"),
    ("Choose option1 or option2.", "Which is even? option1 7, option2 8", "option2"),
    ("Answer true or false.", "11 is odd.", "true"),
    ("Choose solution1 or solution2.", "Reverse abc: solution1 cba, solution2 abc", "solution1"),
    ("Choose answer1, answer2 or answer3.", "Capital of France: answer1 Rome, answer2 Lima, answer3 Paris", "answer3"),
    ("Answer true or false.", "0 is greater than 1.", "false"),
    ("Choose option1 or option2.", "Which is a letter? option1 7, option2 a", "option2"),
]


# -- the server and its library ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def base():
    return load_base("tiny", dtype="fp32")


@pytest.fixture(scope="module")
def other_base(base):
    """A second copy of the tiny base (the same weights) for what must not touch the served model:
    making adapters, and `modulora eval` (which would run in a process of its own)."""
    other = load_base("tiny", dtype="fp32")
    assert other is not base and other.fingerprint == base.fingerprint
    return other


@pytest.fixture(scope="module")
def lib(tmp_path_factory, random_lora, other_base):
    root = tmp_path_factory.mktemp("real-clients")
    maker = other_base
    lib = Library(root / "lib")
    for i, name in enumerate(NAMES):
        lib.add(name, random_lora(maker.model, root / name, i, maker.fingerprint), maker.fingerprint)
    return lib


@pytest.fixture(scope="module")
def url(base, lib):
    from modulora.serve import create_app

    with running(create_app(base, Library(lib.root), batch_wait_ms=5)) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, base):
    """The tiny tokenizer as a local HF folder (lm-eval's `huggingface` backend loads it)."""
    out = tmp_path_factory.mktemp("tiny-tokenizer")
    base.tokenizer.save_pretrained(out)
    return out


def rendered(tok, instruction: str, input: str) -> str:
    """The prompt text modulora eval gives the model: the user turn through the chat template."""
    return render_prompt(tok, Example(instruction, input, ""))


# -- the data: one file per task that both `modulora eval` and lm-eval read ------------------------

@pytest.fixture(scope="module")
def gen_task(tmp_path_factory, base, client):
    """The generation task: items whose greedy answers (under ROUTE) we know beforehand, a stop
    string that cuts some of them but not all, and references equal to the whole answer for half
    of the uncut items (so both harnesses must score those 1, and the rest 0)."""
    tok = base.tokenizer
    texts = [rendered(tok, i, x) for i, x in GEN_ITEMS]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    answers = [client.completions.create(model=ROUTE, prompt=p, max_tokens=GEN_TOKENS).choices[0].text for p in ids]
    # two ASCII letters (the random model also writes control characters and partial UTF-8)
    candidates = sorted({a[k:k + 2] for a in answers for k in range(len(a) - 1)
                         if a[k:k + 2].isascii() and a[k:k + 2].isalpha()})
    best = min(candidates, key=lambda s: (abs(sum(s in a for a in answers) - len(answers) / 2), s))
    cut = [best in a for a in answers]
    assert 2 <= sum(cut) <= len(answers) - 2, (best, answers)
    root = tmp_path_factory.mktemp("gen-task")
    path = root / "gen.jsonl"
    rows = []
    uncut_seen = 0
    for n, ((instr, inp), text, answer, was_cut) in enumerate(zip(GEN_ITEMS, texts, answers, cut), 1):
        positive = not was_cut and answer.strip() and uncut_seen % 2 == 0
        uncut_seen += not was_cut
        ref = answer if positive else NO_ANSWER
        rows.append({"id": str(n), "instruction": instr, "input": inp, "output": ref, "references": [ref],
                     "rendered": text})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"path": path, "stop": best, "answers": answers, "rows": rows}


@pytest.fixture(scope="module")
def mc_task(tmp_path_factory, base):
    """The multiple-choice task: the options modulora eval offers (`options_of`) and the
    continuations it scores (`the correct answer is X`), precomputed beside the rendered prompt."""
    from modulora.evaluate import _continuation, options_of

    tok = base.tokenizer
    root = tmp_path_factory.mktemp("mc-task")
    path = root / "mc.jsonl"
    rows = []
    for n, (instr, inp, ref) in enumerate(MC_ITEMS, 1):
        ex = Example(instr, inp, ref)
        options = options_of(ex, "choice")
        assert ref in options, (options, ref)
        rows.append({"id": str(n), "instruction": instr, "input": inp, "output": ref,
                     "rendered": rendered(tok, instr, inp),
                     "choices": [_continuation(o, "choice") for o in options], "gold": options.index(ref)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"path": path, "rows": rows}


# -- modulora eval on them ---------------------------------------------------------------------------

def modulora_eval(base, lib, path, out, loglik: bool, metric: str):
    from modulora.evaluate import Method, evaluate, prepare_task

    task = prepare_task(path, metric=metric, loglik=loglik)
    results = evaluate(base, [task], [Method(ROUTE, route=ROUTE)], out, library=str(lib.root), progress=False,
                       plots=False)  # base loaded in fp32, as the server's
    return results


@pytest.fixture(scope="module")
def gen_eval(other_base, lib, gen_task, tmp_path_factory):
    r = modulora_eval(other_base, lib, gen_task["path"], tmp_path_factory.mktemp("gen-eval"), False, "auto")
    assert r.metrics["gen"][0] == "em"
    return r


@pytest.fixture(scope="module")
def mc_eval(other_base, lib, mc_task, tmp_path_factory):
    return modulora_eval(other_base, lib, mc_task["path"], tmp_path_factory.mktemp("mc-eval"), True, "choice")


# -- lm-eval ------------------------------------------------------------------------------------------

def task_yaml(name: str, path, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(path))}\n"
            f"test_split: test\ndoc_to_text: rendered\n{body}")


def lm_eval_run(tmp_path, url, tokenizer_dir, backend: str, name: str, yaml: str) -> dict:
    """Run one local task with `local-completions` in-process; returns (aggregate metrics, samples)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / f"{name}.yaml").write_text(yaml, encoding="utf-8")
    args = f"model={ROUTE},base_url={url}/v1/completions,num_concurrent=1,max_retries=1"
    if backend == "auto":  # else lm-eval falls back to an HF tokenizer named like the model ("a")
        from lm_eval.utils import check_remote_tokenizer_support

        assert check_remote_tokenizer_support(f"{url}/v1/completions", max_retries=1), \
            "lm-eval cannot discover the tokenizer: it needs GET /tokenizer_info (with eos_token) and POST /tokenize"
    if backend == "huggingface":
        args += f",tokenizer_backend=huggingface,tokenizer={tokenizer_dir}"
    # backend "auto": lm-eval's default, which discovers the tokenizer from the server
    out = simple_evaluate(model="local-completions", model_args=args, tasks=[name], log_samples=True,
                          task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                          bootstrap_iters=0)
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    return {"results": out["results"][name], "samples": samples}


BACKENDS = ["auto", "huggingface"]


def test_lm_eval_discovers_the_tokenizer_from_the_server(url):
    """lm-eval's default `tokenizer_backend=auto` uses the server's tokenizer (`remote`) when
    `GET /tokenizer_info` answers with `eos_token` and `POST /tokenize` with `tokens`."""
    from lm_eval.utils import check_remote_tokenizer_support

    assert check_remote_tokenizer_support(f"{url}/v1/completions", max_retries=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lm_eval_generate_until_equals_modulora_eval(tmp_path, url, tokenizer_dir, gen_task, gen_eval, backend):
    stop = gen_task["stop"]
    body = ("output_type: generate_until\ndoc_to_target: output\n"
            f"generation_kwargs:\n  until: [{json.dumps(stop)}]\n  max_gen_toks: {GEN_TOKENS}\n"
            "  do_sample: false\n  temperature: 0\n"
            "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    run = lm_eval_run(tmp_path, url, tokenizer_dir, backend, "gen_lm", task_yaml("gen_lm", gen_task["path"], body))
    preds = {p["id"]: p for p in gen_eval.predictions}
    rows = gen_task["rows"]
    assert len(run["samples"]) == len(rows)
    n_cut = 0
    for s in run["samples"]:
        row = rows[s["doc_id"]]
        assert s["arguments"][0][0] == row["rendered"]  # the context is the chat-rendered prompt
        response = s["resps"][0][0]
        # modulora eval's answer: no stop strings, and stripped (the server's text is not)
        full = preds[row["id"]]["prediction"]
        at = full.find(stop)
        if at >= 0:  # the server cut the answer before the stop string
            n_cut += 1
            assert response.strip() == full[:at].strip(), (row["id"], response, full)
        else:
            assert response.strip() == full, (row["id"], response, full)
        assert s["exact_match"] == preds[row["id"]]["scores"]["em"], (row["id"], response, full)
    assert n_cut >= 2
    assert run["results"]["exact_match,none"] == pytest.approx(gen_eval.main(ROUTE, "gen"))
    assert 0 < gen_eval.main(ROUTE, "gen") < 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_lm_eval_multiple_choice_equals_modulora_eval_loglik(tmp_path, other_base, lib, url, tokenizer_dir, mc_task,
                                                            mc_eval, backend):
    # target_delimiter "": the continuations are scored right after the rendered prompt, as
    # modulora eval scores them (lm-eval moves the prompt's trailing "\n" into each continuation,
    # which adds the same log P("\n") to every option of an item: the argmax is unchanged)
    body = ("output_type: multiple_choice\ndoc_to_choice: choices\ndoc_to_target: gold\ntarget_delimiter: \"\"\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    run = lm_eval_run(tmp_path, url, tokenizer_dir, backend, "mc_lm", task_yaml("mc_lm", mc_task["path"], body))
    preds = {p["id"]: p for p in mc_eval.predictions}
    rows = mc_task["rows"]
    assert len(run["samples"]) == len(rows)

    # the log-likelihoods themselves: differences between an item's options equal a by-hand
    # computation under the same route (modulora eval's `continuation_logprobs`)
    from modulora.routing.api import Router
    from modulora.routing.score import continuation_logprobs

    router = Router(other_base, Library(lib.root))
    users = [f"{r['instruction']}\n\n{r['input']}" for r in rows]
    ours = continuation_logprobs(router, users, [r["choices"] for r in rows], [ROUTE] * len(rows))
    for s in run["samples"]:
        row = rows[s["doc_id"]]
        assert s["arguments"][0][0] == row["rendered"]
        lls = [r[0][0] for r in s["resps"]]
        mine = ours[s["doc_id"]]
        assert [x - lls[0] for x in lls] == pytest.approx([x - mine[0] for x in mine], abs=1e-3), row["id"]
        picked = row["choices"][max(range(len(lls)), key=lls.__getitem__)]
        assert picked == preds[row["id"]]["prediction"], row["id"]
        assert s["acc"] == preds[row["id"]]["scores"]["choice"], row["id"]
    assert run["results"]["acc,none"] == pytest.approx(mc_eval.main(ROUTE, "mc"))


def test_lm_eval_loglikelihood_when_the_next_token_is_eos(tmp_path):
    """lm-eval asks for a continuation's log-likelihood with echo, logprobs=1 and max_tokens=1,
    and drops the last entry of `token_logprobs` (the generated token's). With an instruction
    model the greedy token after an answer is often the end token: its entry must be there too,
    or lm-eval drops the continuation's last token instead. A tiny base whose greedy next token
    after this prompt is made the end token (its output row only) shows it."""
    from types import SimpleNamespace

    import torch
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from modulora.serve import create_app

    b = load_base("tiny", dtype="fp32")
    tok, model = b.tokenizer, b.model
    ctx = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    cont = tok(" Paris.", add_special_tokens=False)["input_ids"]
    ids = ctx + cont
    with torch.no_grad():
        last = model(torch.tensor([ids])).logits[0, -1]
        t = int(last.argmax())
        assert last[t] > 0
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone())  # untied: input embeddings stay
        head.weight[tok.eos_token_id] = 2 * head.weight[t]
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    assert int(logp[-1].argmax()) == tok.eos_token_id
    expected = float(sum(logp[i - 1, ids[i]] for i in range(len(ctx), len(ids))))
    payload = LocalCompletionsAPI._create_payload(SimpleNamespace(model="base"), [ids], generate=False)
    assert payload["echo"] is True and payload["max_tokens"] == 1 and payload["logprobs"] == 1
    with running(create_app(b, Library(tmp_path / "lib"))) as url:
        import httpx

        r = httpx.post(f"{url}/v1/completions", json=payload, timeout=60)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1, lp  # the prompt's, then the generated (end) token's
    ((ll, _),) = LocalCompletionsAPI.parse_logprobs(r.json(), tokens=[ids], ctxlens=[len(ctx)])
    assert ll == pytest.approx(expected, abs=1e-4)


# -- LangChain ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_model(url):
    from langchain_openai import ChatOpenAI

    def make(**kw):
        return ChatOpenAI(base_url=f"{url}/v1", api_key="x", model=ROUTE, max_retries=0, timeout=60, **kw)
    return make


QUESTION = "Reverse the word.\n\nanswer"


def test_langchain_invoke_honours_max_tokens(chat_model, client):
    msg = chat_model(max_tokens=3).invoke(QUESTION)
    usage = msg.response_metadata["token_usage"]
    assert 1 <= usage["completion_tokens"] <= 3
    assert msg.response_metadata["finish_reason"] in ("length", "stop")
    direct = client.chat.completions.create(model=ROUTE, messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=3, temperature=0)
    assert msg.content == direct.choices[0].message.content


def test_langchain_stream_joins_to_the_invoked_text(chat_model):
    llm = chat_model(max_tokens=12)
    chunks = list(llm.stream(QUESTION))
    assert len(chunks) >= 2
    assert "".join(c.content for c in chunks) == llm.invoke(QUESTION).content


def test_langchain_default_temperature_is_greedy(chat_model, client):
    llm = chat_model(max_tokens=10)  # no temperature: the server's default (0) applies
    first, second = llm.invoke(QUESTION).content, llm.invoke(QUESTION).content
    direct = client.chat.completions.create(model=ROUTE, messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=10, temperature=0)
    assert first == second == direct.choices[0].message.content


def test_langchain_tools_are_refused_with_a_clear_400(chat_model):
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    with pytest.raises(openai.BadRequestError) as e:
        chat_model(max_tokens=3).bind_tools([get_weather]).invoke(QUESTION)
    assert e.value.status_code == 400
    assert "tools" in str(e.value)
    assert e.value.body["param"] == "tools" and e.value.body["code"] == "unsupported_field"
