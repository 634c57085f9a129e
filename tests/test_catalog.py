"""The catalog under many large cards: a size limit on card.json, listing without parsing cards,
and removals that give the space back (issue 14 point 4)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest

from modulora.adapters.format import LIMITS
from modulora.library import Library, LibraryError
from modulora.validate import ValidationError

from test_library import make_lora


@pytest.fixture(scope="module")
def fp():
    from modulora.base import load_base

    return load_base("tiny", dtype="fp32").fingerprint


def _with_card(d: Path, fp: dict, size: int, seed: int = 0) -> Path:
    """A valid LoRA dir whose card.json is about `size` bytes (padded with sample inputs)."""
    make_lora(d, fp, seed=seed)
    card = json.loads((d / "card.json").read_text())
    text = json.dumps(card)
    pad = max(0, size - len(text) - 32)
    card["samples"] = ["x" * 1000] * (pad // 1006) + ["y" * (pad % 1006)]
    (d / "card.json").write_text(json.dumps(card))
    return d


def _state(lib: Library):
    with sqlite3.connect(lib.catalog) as db:
        rows = db.execute("SELECT name, version, object_id FROM adapters ORDER BY name, version").fetchall()
    return rows, sorted(p.name for p in (lib.root / "objects").iterdir())


def test_card_limit_is_far_below_the_json_limit():
    assert 64 << 10 <= LIMITS.max_card_bytes < LIMITS.max_json_bytes


def test_oversized_card_is_refused_and_library_unchanged(tmp_path, fp):
    lib = Library(tmp_path / "lib")
    lib.add("small", _with_card(tmp_path / "small", fp, 10_000))
    before = _state(lib)
    big = _with_card(tmp_path / "big", fp, LIMITS.max_card_bytes + 10_000, seed=1)
    with pytest.raises(ValidationError, match=rf"card\.json .*limit of {LIMITS.max_card_bytes} bytes"):
        lib.add("big", big)
    assert _state(lib) == before
    assert [r.name for r in lib.list()] == ["small"]
    # just under the limit is accepted
    ok = _with_card(tmp_path / "ok", fp, LIMITS.max_card_bytes - 2_000, seed=2)
    assert (ok / "card.json").stat().st_size <= LIMITS.max_card_bytes
    assert lib.add("ok", ok).card["samples"]


def test_trained_cards_fit(tmp_path, fp):
    """train.py keeps up to 32 samples of up to 1000 characters, plus the base fingerprint."""
    d = make_lora(tmp_path / "a", fp)
    card = json.loads((d / "card.json").read_text())
    card["samples"] = ["é" * 1000] * 32  # 2 bytes each in UTF-8, 6 escaped by json.dumps
    card["metrics"] = {"steps": 100, "train_loss": 1.0, "val_loss": 1.1}
    (d / "card.json").write_text(json.dumps(card, indent=2))
    assert (d / "card.json").stat().st_size <= LIMITS.max_card_bytes
    Library(tmp_path / "lib").add("trained", d)


def test_list_does_not_parse_cards(tmp_path, fp):
    """Listing reads names, types and object ids only. Cards come from the catalog (not from the
    files on disk) and are parsed when a record's `card` is first read: a damaged card in the
    catalog fails there, with a LibraryError naming the adapter, and nowhere else."""
    lib = Library(tmp_path / "lib")
    lib.add("a", _with_card(tmp_path / "a", fp, 5_000, seed=0))
    rec_b = lib.add("b", _with_card(tmp_path / "b", fp, 5_000, seed=1))
    # a damaged card.json on disk is never read by the catalog
    card_file = rec_b.path / "card.json"
    card_file.chmod(0o644)
    card_file.write_text("{not json")
    assert lib.get("b").card["name"] == "b"
    # a damaged card in the catalog itself: listing still works, reading that card fails clearly
    with sqlite3.connect(lib.catalog) as db:
        db.execute("UPDATE adapters SET card='{not json' WHERE name='b'")
    recs = lib.list()
    assert [(r.name, r.type) for r in recs] == [("a", "lora"), ("b", "lora")]
    assert lib.latest_object_ids() == {"a": recs[0].object_id, "b": recs[1].object_id}
    assert [r.version for r in lib.versions("b")] == [1]
    assert recs[0].card["name"] == "a" and recs[1].config["r"] == 4
    with pytest.raises(LibraryError, match=r"card of b@1 is not valid JSON"):
        recs[1].card
    with pytest.raises(LibraryError, match=r"card of b@1 is not valid JSON"):
        lib.get("b").card
    assert lib.get("b").type == "lora"  # get() parses nothing either until asked


def test_card_of_a_removed_record(tmp_path, fp):
    lib = Library(tmp_path / "lib")
    lib.add("a", _with_card(tmp_path / "a", fp, 5_000))
    (rec,) = lib.list()
    lib.remove("a")
    with pytest.raises(LibraryError, match="a@1 was removed"):
        rec.card
    (rec,) = [lib.add("a", tmp_path / "a")]
    assert rec.card["name"] == "a"  # the record add() returns holds its card


def _add_named(lib: Library, src, n: int, versions: int = 1) -> None:
    """Add `src` as a0..a{n-1}, each card naming its adapter, `versions` times each."""
    for i in range(n):
        card = json.loads((src / "card.json").read_text())
        card["name"] = f"a{i}"
        (src / "card.json").write_text(json.dumps(card))
        for _ in range(versions):
            lib.add(f"a{i}", src)


def test_list_cost_does_not_grow_with_card_size(tmp_path, fp):
    lib = Library(tmp_path / "lib")
    _add_named(lib, _with_card(tmp_path / "src", fp, LIMITS.max_card_bytes - 2_000), 20)
    t = time.perf_counter()
    for _ in range(20):
        recs = lib.list()
        lib.latest_object_ids()
    per_call = (time.perf_counter() - t) / 20
    assert len(recs) == 20
    # parsing 20 cards of ~250 KB takes tens of ms; one small query takes well under that
    assert per_call < 0.02, per_call


def _catalog_bytes(lib: Library) -> int:
    return sum(p.stat().st_size for p in lib.root.glob("catalog.sqlite*"))


def test_remove_reclaims_space(tmp_path, fp):
    lib = Library(tmp_path / "lib")
    src = _with_card(tmp_path / "src", fp, LIMITS.max_card_bytes - 2_000)
    _add_named(lib, src, 12, versions=2)  # a second version with the same object
    lib.put_derived(lib.get("a0").object_id, "test", b"\0" * 500_000)
    full = _catalog_bytes(lib)
    assert full > 12 * LIMITS.max_card_bytes
    lib.remove("a0", 1)
    assert len(list((lib.root / "objects").iterdir())) == 12  # a0@2 still holds that object
    for i in range(12):
        lib.remove(f"a{i}")
    assert list((lib.root / "objects").iterdir()) == []
    assert list((lib.root / "tmp").iterdir()) == []
    assert _catalog_bytes(lib) < full / 4, (_catalog_bytes(lib), full)
    assert lib.integrity_check() == "ok"
    lib.add("again", src)  # still usable; version numbers are never reused
    assert lib.add("a3", src).version == 3


def test_remove_reclaims_space_in_a_catalog_without_auto_vacuum(tmp_path, fp):
    """Catalogs made before auto_vacuum was set are VACUUMed after large removals."""
    root = tmp_path / "lib"
    root.mkdir()
    db = sqlite3.connect(root / "catalog.sqlite")
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    lib = Library(root)  # creates the tables in a catalog whose auto_vacuum is off
    with sqlite3.connect(lib.catalog) as db:
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    _add_named(lib, _with_card(tmp_path / "src", fp, LIMITS.max_card_bytes - 2_000), 10)
    full = _catalog_bytes(lib)
    for i in range(10):
        lib.remove(f"a{i}")
    assert _catalog_bytes(lib) < full / 4, (_catalog_bytes(lib), full)
    assert lib.integrity_check() == "ok"
