"""The request log cannot be forged: hostile paths and model names stay inside one line and one field."""

import io
import json
import re

import httpx
import pytest

from servers import running

from modulora.library import Library
from modulora.serve.request_log import KeyValues, configure, text_value

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

# TIME (two tokens) LEVEL EVENT, then ` key=value` pairs; a value is a JSON string or a token without spaces
_HEAD = re.compile(r"\S+ \S+ \S+ (\S+)")
_PAIR = re.compile(r' ("(?:[^"\\]|\\.)*"|[A-Za-z0-9_.,/:@+-]+)=("(?:[^"\\]|\\.)*"|[^ "=][^ =]*)')

HOSTILE_MODEL = 'x\n2026-01-01 00:00:00,000 info request status=200 " status=200 \r\u2028 path=/ok\\'


def parse_text_line(line: str) -> dict:
    """The fields of one text log line; fails unless the whole line is well formed."""
    m = _HEAD.match(line)
    assert m, line
    fields, pos = {}, m.end()
    while pos < len(line):
        p = _PAIR.match(line, pos)
        assert p, f"malformed at {line[pos:]!r}"
        key, value = (json.loads(t) if t.startswith('"') else t for t in p.groups())
        assert key not in fields, f"duplicate key {key!r} in {line!r}"
        fields[key] = value
        pos = p.end()
    return fields


@pytest.mark.parametrize("value", ["plain", "", "a b", "a=b", 'q"q', "new\nline", "\x00\x1b[31m", "\u2028\u0085",
                                   "back\\slash", 17, 0.25, True, None, {"a b": 1, "c=d": "\n"}, ["x", 1],
                                   {"c": 1.0}])
def test_every_text_value_is_one_token_that_reads_back(value):
    text = text_value(value)
    assert len(text.splitlines()) <= 1 and text.isascii() and (text.startswith('"') or " " not in text)
    fields = parse_text_line(f"2026-01-01 00:00:00,000 info request k={text} after=1")
    got = fields["k"]
    if isinstance(value, str):
        assert got == value
    else:  # non-strings are their JSON (JSON-quoted again when they hold a space or '=')
        assert json.loads(got) == json.loads(json.dumps(value))
    assert fields["after"] == "1"


def test_hostile_path_and_model_give_one_line_each(tiny, tmp_path):
    from modulora.serve import create_app

    buf = io.StringIO()
    logger = configure("text", stream=buf)
    try:
        with running(create_app(tiny, Library(tmp_path / "lib"), batch_wait_ms=5)) as url:
            r1 = httpx.post(f"{url}/v1/completions%0Afake=1%0D%20status=200", json={}, headers={"x-request-id": "p1"},
                            timeout=60)
            r2 = httpx.post(f"{url}/v1/completions", json={"model": HOSTILE_MODEL, "prompt": "hi", "max_tokens": 2},
                            headers={"x-request-id": "p2"}, timeout=60)
    finally:
        for h in list(logger.handlers):
            logger.removeHandler(h)
    assert r1.status_code == 404 and r2.status_code in (400, 404), (r1.text, r2.text)
    lines = [ln for ln in buf.getvalue().splitlines() if " request " in ln and "/health" not in ln]
    assert len(lines) == 2, lines
    assert buf.getvalue().count("\n") == len(buf.getvalue().splitlines())  # no other line breaks at all
    first, second = (parse_text_line(ln) for ln in lines)
    assert first["request_id"] == "p1" and first["path"] == "/v1/completions\nfake=1\r status=200"
    assert first["status"] == "404" and "fake" not in first
    assert second["request_id"] == "p2" and second["path"] == "/v1/completions"
    assert second["route"] == HOSTILE_MODEL and second["status"] == str(r2.status_code)


def test_json_lines_are_safe_too():
    import logging

    from modulora.serve.request_log import JsonLines

    rec = logging.LogRecord("modulora.requests", logging.INFO, __file__, 1, "request", None, None)
    rec.fields = {"path": "/a\nb", "route": HOSTILE_MODEL}
    line = JsonLines().format(rec)
    assert len(line.splitlines()) == 1 and line.isascii()
    assert json.loads(line)["route"] == HOSTILE_MODEL and json.loads(line)["path"] == "/a\nb"
    text = KeyValues().format(rec)
    assert len(text.splitlines()) == 1 and parse_text_line(text)["route"] == HOSTILE_MODEL
