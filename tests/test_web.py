"""The web page at `/`: its JSON endpoints (TestClient) and the page itself in a real headless
Chromium (Debian's package, driven by Playwright through `executable_path`; no `playwright
install`) against a real uvicorn serving the tiny model and a small library. The browser tests
are skipped, saying why, where Chromium or Playwright is missing; `.ci/run` installs Chromium."""

import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from servers import running

STATIC = Path(__file__).resolve().parents[1] / "modulora" / "serve" / "static"
NAMES = ["capital", "add", "upper"]
KEY = "s3cret"


def card_with_details(path: Path, task: str) -> Path:
    """Give a saved adapter's card a task, samples and metrics, as `modulora train` writes them."""
    card = json.loads((path / "card.json").read_text())
    card.update(task=task, description=f"The {task} task.", samples=[f"{task} sample {i}" for i in range(5)],
                metrics={"train_loss": 0.25, "steps": 60})
    (path / "card.json").write_text(json.dumps(card))
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory, random_lora):
    """A library of three random LoRAs (`capital` with a full card, twice: v1 and v2), a results
    folder, and the files of a good and of a bad adapter to upload."""
    from modulora.base import load_base
    from modulora.evaluate import Results, write_results
    from modulora.library import Library

    root = tmp_path_factory.mktemp("web")
    maker = load_base("tiny", dtype="fp32")
    lib = Library(root / "lib")
    for i, name in enumerate(NAMES):
        out = random_lora(maker.model, root / name, i, maker.fingerprint)
        if name == "capital":
            card_with_details(out, "capital")
            lib.add(name, out, maker.fingerprint)
        lib.add(name, out, maker.fingerprint)
    good = random_lora(maker.model, root / "fresh", 7, maker.fingerprint)
    bad = root / "bad"
    shutil.copytree(good, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": -8}))
    results = root / "results"
    preds = [{"method": m, "task": t, "id": f"{t}-{k}", "prediction": "x", "references": ["x"],
              "scores": {"em": 1.0 if m == "arrow" else 0.0}, "experts": {"capital": 1.0} if m == "arrow" else {}}
             for m in ("base", "arrow") for t in ("capital", "add") for k in range(3)]
    res = Results(tasks=["capital", "add"], methods=["base", "arrow"], metrics={"capital": ["em"], "add": ["em"]},
                  scores={"base": {"capital": {"em": 0.0}, "add": {"em": 0.0}},
                          "arrow": {"capital": {"em": 1.0}, "add": {"em": 1.0}}},
                  routing={"base": {"capital": {}, "add": {}}, "arrow": {"capital": {"capital": 1.0}, "add": {"capital": 1.0}}},
                  n={"capital": 3, "add": 3}, predictions=preds)
    (results / "demo").mkdir(parents=True)
    write_results(res, results / "demo", plots=False, config={"note": "test"})
    (results / "family").mkdir()
    shutil.copy(results / "demo" / "results.json", results / "family" / "math-results.json")
    (results / "family" / "math-run.json").write_text('{"command": "x"}')  # not a results file
    (results / "other-results.json").write_text('{"not": "results"}')  # named like one, but is not
    return {"lib": root / "lib", "results": results, "good": good, "bad": bad, "fingerprint": maker.fingerprint}


@pytest.fixture(scope="module")
def client(tiny, made):
    from fastapi.testclient import TestClient

    from modulora.library import Library
    from modulora.serve import create_app

    app = create_app(tiny, Library(made["lib"]), results_dir=made["results"], api_key=KEY, batch_wait_ms=1)
    with TestClient(app) as tc:
        yield tc


# -- the JSON endpoints and the files ------------------------------------------------------------

def test_page_and_static_files_are_served_with_their_types(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/static/app.js">' in r.text
    for name, kind in [("app.js", "javascript"), ("util.js", "javascript"), ("playground.js", "javascript"),
                       ("style.css", "text/css")]:
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"], (name, r.headers)
    assert client.get("/static/nope.js").status_code == 404
    assert client.get("/static/../web.py").status_code == 404
    imported = {m for f in STATIC.glob("*.js") for m in re.findall(r'from "\./([\w.]+)"', f.read_text())}
    assert imported and all((STATIC / m).is_file() for m in imported)


def test_static_files_reach_nothing_outside_the_server():
    """No CDN, no fonts, no analytics: the page works offline. (The SVG namespace is a name, not
    a fetch.)"""
    for f in STATIC.iterdir():
        text = f.read_text()
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'`)]*", text)) - {"http://www.w3.org/2000/svg"}
        assert not urls, (f.name, urls)
        assert "@import" not in text and "fonts.googleapis" not in text


def test_package_data_ships_the_static_files():
    text = (STATIC.parents[2] / "pyproject.toml").read_text()
    assert '"modulora.serve" = ["static/*.html", "static/*.js", "static/*.css"]' in text
    assert {"index.html", "app.js", "style.css"} <= {p.name for p in STATIC.iterdir()}


def test_adapter_listing_has_the_details(client):
    r = client.get("/v1/adapters")
    assert r.status_code == 200
    data = {a["name"]: a for a in r.json()["data"]}
    assert sorted(data) == sorted(NAMES)
    cap = data["capital"]
    assert cap["version"] == 2 and [v["version"] for v in cap["versions"]] == [1, 2]
    assert cap["versions"][0]["object_id"] == cap["versions"][1]["object_id"]  # same files twice
    assert cap["type"] == "lora" and cap["task"] == "capital" and cap["description"] == "The capital task."
    assert cap["samples"] == ["capital sample 0", "capital sample 1", "capital sample 2"] and cap["n_samples"] == 5
    assert cap["metrics"] == {"train_loss": 0.25, "steps": 60}
    assert cap["num_params"] > 0 and cap["size_bytes"] > cap["num_params"] * 4
    assert len(cap["base_id"]) >= 8 and cap["created"]
    plain = data["add"]
    assert plain["task"] is None and plain["samples"] == [] and plain["metrics"] == {}
    assert client.get("/v1/adapters").json() == r.json()  # cached summaries answer the same


def test_results_list_and_one(client):
    listing = client.get("/v1/results").json()["data"]
    assert [x["name"] for x in listing] == ["demo/results", "family/math-results"]
    assert listing[0]["methods"] == ["base", "arrow"] and listing[0]["average"] == {"base": 0.0, "arrow": 1.0}
    one = client.get("/v1/results/demo/results").json()
    assert "predictions" not in one and one["n_predictions"] == 12
    assert one["scores"]["arrow"]["capital"] == {"em": 1.0} and one["config"] == {"note": "test"}
    assert len(one["examples"]) == 8 and {e["method"] for e in one["examples"]} == {"base", "arrow"}
    for missing in ("nope", "family/math-run", "other-results", "%2e%2e/lib/catalog", "demo%2F..%2Fdemo/results"):
        r = client.get(f"/v1/results/{missing}")
        assert r.status_code == 404 and r.json()["error"]["code"] in ("results_not_found", None), (missing, r.text)


def test_results_without_a_folder_say_how_to_get_one(tiny, made):
    from fastapi.testclient import TestClient

    from modulora.library import Library
    from modulora.serve import create_app

    with TestClient(create_app(tiny, Library(made["lib"]))) as tc:
        r = tc.get("/v1/results")
        assert r.status_code == 404 and "--results" in r.json()["error"]["message"]
        assert tc.get("/v1/info").json() == {"base": tiny.name, "api_key_required": False, "results": False}


def test_clustering_is_404_until_a_build_stores_one(client, made):
    from modulora.build import store_clustering
    from modulora.library import Library

    r = client.get("/v1/clustering")
    assert r.status_code == 404 and "mbc" in r.json()["error"]["message"]
    clustering = {"tasks": ["a", "b"], "assignment": {"a": "cluster-0", "b": "cluster-0"},
                  "clusters": {"cluster-0": ["a", "b"]}, "similarity": [[1.0, 0.5], [0.5, 1.0]]}
    store_clustering(Library(made["lib"]), clustering)
    assert client.get("/v1/clustering").json() == clustering


def test_reads_are_open_and_writes_need_the_key(client, made):
    for path in ("/", "/v1/adapters", "/v1/results", "/v1/info", "/static/app.js", "/metrics"):
        assert client.get(path).status_code == 200, path
    assert client.get("/v1/info").json()["api_key_required"] is True
    r = client.delete("/v1/adapters/add")
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]


# -- the page in a real browser -------------------------------------------------------------------

def chromium_path() -> str | None:
    for candidate in (os.environ.get("MODULORA_CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium",
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed (pip install playwright; the dev extra has it)")
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium installed (apt-get install -y chromium; .ci/run does it as root)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


def served(tiny, made, root: Path, **kwargs):
    """A real server over a copy of the test library (so uploads here change no other test)."""
    from modulora.library import Library
    from modulora.serve import create_app

    shutil.copytree(made["lib"], root / "lib")
    return running(create_app(tiny, Library(root / "lib"), results_dir=made["results"], batch_wait_ms=1, **kwargs))


@pytest.fixture(scope="module")
def site(tiny, made, tmp_path_factory):
    with served(tiny, made, tmp_path_factory.mktemp("site")) as url:
        yield url


@pytest.fixture(scope="module")
def locked_site(tiny, made, tmp_path_factory):
    with served(tiny, made, tmp_path_factory.mktemp("locked"), api_key=KEY) as url:
        yield url


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.set_default_timeout(30_000)
    yield pg
    context.close()
    assert not errors, errors  # no uncaught script error on any view


def names_listed(page) -> list[str]:
    page.wait_for_selector("tr[data-adapter]")
    return sorted(page.eval_on_selector_all("tr[data-adapter]", "rows => rows.map(r => r.dataset.adapter)"))


def generate(page, url: str, route_query: str, prompt: str = "Peru", max_tokens: int = 24) -> None:
    """Open the playground, ask, and wait for the stream's end, recording whether tokens showed
    while it was still streaming."""
    page.goto(f"{url}/#/playground?{route_query}")
    page.wait_for_selector("#pg-prompt")
    page.fill("#pg-prompt", prompt)
    page.fill("#pg-max-tokens", str(max_tokens))
    page.evaluate("""() => {
        window.__seen = [];
        const out = document.getElementById('pg-output');
        new MutationObserver(() => window.__seen.push([out.dataset.state, out.querySelectorAll('.tok').length]))
            .observe(out, {childList: true, attributes: true});
    }""")
    page.click("#pg-run")
    page.wait_for_function("() => ['done', 'error'].includes(document.getElementById('pg-output').dataset.state)")


def token_experts(page) -> list[str]:
    return page.eval_on_selector_all("#pg-output .tok", "ts => ts.map(t => t.dataset.expert || '')")


@pytest.mark.slow
def test_library_lists_the_adapters_and_opens_one(page, site):
    page.goto(site)
    assert names_listed(page) == sorted(NAMES)
    page.fill("#library-search", "capit")
    page.wait_for_function("() => document.querySelectorAll('tr[data-adapter]').length === 1")
    page.click("a.adapter-link")
    page.wait_for_selector("text=Samples (5)")
    body = page.inner_text("main")
    assert "capital sample 4" in body and "The capital task." in body and "Versions" in body
    assert page.locator("tbody tr").count() >= 2  # v1 and v2 in the versions table


@pytest.mark.slow
def test_playground_streams_an_answer_and_colours_its_tokens(page, site):
    # long enough that the browser reads the stream while it is still being generated, even on a
    # loaded machine (24 tokens of the tiny model once all arrived before the first read)
    generate(page, site, "route=capital", max_tokens=128)
    assert page.get_attribute("#pg-output", "data-state") == "done", page.inner_text("#pg-status")
    experts = token_experts(page)
    assert experts and set(experts) == {"capital"}
    seen = page.evaluate("window.__seen")
    assert any(state == "streaming" and 0 < n < len(experts) for state, n in seen), seen  # shown as they came
    bg = page.eval_on_selector("#pg-output .tok", "t => getComputedStyle(t).backgroundColor")
    assert bg not in ("", "rgba(0, 0, 0, 0)", "transparent")
    assert "capital" in page.inner_text("#pg-request-routing") and "capital" in page.inner_text("#pg-legend")
    # a mixture: every token's top expert is the heavier one, the bars show both
    generate(page, site, "route=" + "upper:0.8,add:0.2")
    assert set(token_experts(page)) == {"upper"}
    assert "add" in page.inner_text("#pg-request-routing")
    # the keyboard reaches a token's weights
    page.focus("#pg-output")
    page.keyboard.press("ArrowRight")
    assert "token 1 of" in page.inner_text("#pg-token")


@pytest.mark.slow
def test_playground_colours_arrow_tokens_one_by_one(page, site):
    generate(page, site, "route=arrow&prompt=" + "the quick brown fox jumps", max_tokens=16)
    assert page.get_attribute("#pg-output", "data-state") == "done", page.inner_text("#pg-status")
    experts = token_experts(page)
    assert experts and set(experts) <= set(NAMES)
    # per-token routing (the `token_routing` extension): each token carries its own weights, and
    # Arrow's tokens their per-layer view (the first token's may have none)
    assert "coloured per token" in page.inner_text("#pg-status")
    assert page.locator("#pg-output .tok[data-layers]").count() > 0
    page.click("#pg-output .tok[data-layers] >> nth=0")
    assert page.locator("#pg-token table.layers tbody tr").count() == 2  # the tiny model's 2 layers
    assert "Mean over layers" in page.inner_text("#pg-token")


@pytest.mark.slow
def test_playground_sends_arrow_settings_and_shows_a_refusal(page, site):
    """Arrow's settings show for the arrow route only, reach the server as the `arrow` field (here
    from the page's address), and a pattern the server refuses shows its message."""
    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.method == "POST" and "/v1/" in r.url else None)
    generate(page, site, "route=arrow&arrow_prototypes=spectral&arrow_modules=mlp&arrow_temperature=0.5", max_tokens=6)
    assert page.get_attribute("#pg-output", "data-state") == "done", page.inner_text("#pg-status")
    assert page.is_visible("#pg-arrow")
    assert sent[-1]["arrow"] == {"temperature": 0.5, "prototypes": "spectral", "modules": "mlp"}
    page.fill("#pg-arrow-modules", "mlp(")
    page.click("#pg-run")
    page.wait_for_function("() => ['done', 'error'].includes(document.getElementById('pg-output').dataset.state)")
    assert "regular expression" in page.inner_text("#pg-status")
    page.select_option("#pg-kind", "uniform")
    assert not page.is_visible("#pg-arrow")


@pytest.mark.slow
def test_a_bad_upload_shows_its_error_and_leaves_the_library(page, site, made):
    before = httpx.get(f"{site}/v1/adapters").json()
    page.goto(f"{site}/#/upload")
    page.fill("#up-name", "broken")
    page.set_input_files("#up-files", [str(p) for p in made["bad"].iterdir() if p.is_file()])
    page.click("#up-submit")
    error = page.wait_for_selector("#up-error").inner_text()
    assert "422" in error and "lora_alpha" in error and "unchanged" in error, error
    assert httpx.get(f"{site}/v1/adapters").json() == before
    page.goto(f"{site}/#/library")
    assert names_listed(page) == sorted(NAMES)


@pytest.mark.slow
def test_a_good_upload_appears_and_is_routable(page, site, made):
    page.goto(f"{site}/#/upload")
    page.set_input_files("#up-files", [str(p) for p in made["good"].iterdir() if p.is_file()])
    page.fill("#up-name", "fresh")
    page.click("#up-submit")
    page.wait_for_selector("#up-result .ok")
    assert "Stored fresh v1" in page.inner_text("#up-result")
    page.goto(f"{site}/#/library")
    assert "fresh" in names_listed(page)
    generate(page, site, "route=fresh")
    assert set(token_experts(page)) == {"fresh"}
    page.goto(f"{site}/#/playground")
    assert "fresh" in page.eval_on_selector_all("#pg-adapter option", "os => os.map(o => o.value)")


@pytest.mark.slow
def test_with_an_api_key_reads_are_open_and_writes_ask_for_it(page, locked_site, made):
    page.goto(locked_site)
    assert names_listed(page) == sorted(NAMES)  # reads need no key
    files = [str(p) for p in made["good"].iterdir() if p.is_file()]
    page.goto(f"{locked_site}/#/upload")
    page.fill("#up-name", "fresh")
    page.set_input_files("#up-files", files)
    page.click("#up-submit")
    assert "API key" in page.wait_for_selector("#up-error").inner_text()
    generate(page, locked_site, "route=capital")
    assert page.get_attribute("#pg-output", "data-state") == "error"
    assert "API key" in page.inner_text("#pg-status")
    page.click("#key-button")
    page.fill("#key-input", KEY)
    page.click("#key-dialog button[value=save]")
    generate(page, locked_site, "route=capital")
    assert set(token_experts(page)) == {"capital"}
    page.goto(f"{locked_site}/#/upload")
    page.fill("#up-name", "fresh")
    page.set_input_files("#up-files", files)
    page.click("#up-submit")
    page.wait_for_selector("#up-result .ok")


@pytest.mark.slow
def test_results_and_server_views(page, site):
    page.goto(f"{site}/#/results")
    page.click("text=demo/results")
    page.wait_for_selector("text=Score by method and task")
    assert "100.0" in page.inner_text("table.data") and page.locator(".heat").count() == 1
    page.click("th button:has-text('Average')")  # sorting by a header keeps every row
    assert page.locator("table.data >> nth=0").locator("tbody tr").count() == 2
    page.goto(f"{site}/#/server")
    page.wait_for_function("() => document.querySelector('[data-figure=rps] .value').textContent !== '–'", timeout=15_000)
    assert "Health: ok" in page.inner_text("#srv-health")
    assert "Generated tokens" in page.inner_text("#srv-totals")


@pytest.mark.slow
def test_phone_width_has_no_sideways_scroll(browser, site):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    pg = context.new_page()
    try:
        for view in ("library", "playground", "upload", "results", "server", "adapter/capital"):
            pg.goto(f"{site}/#/{view}")
            pg.wait_for_selector("main .view > *")
            pg.wait_for_timeout(300)
            wide = pg.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
            assert wide <= 1, (view, wide)
    finally:
        context.close()


def test_serve_takes_a_results_folder():
    import argparse

    from modulora.serve import add_serve_command

    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    assert parser.parse_args(["serve", "--results", "runs/eval"]).results == "runs/eval"
    assert parser.parse_args(["serve"]).results is None
