"""The four experiments in --quick mode (tiny model, a few examples): the whole pipeline runs,
writes its reports, and a rerun reuses every trained adapter. Needs the shared data folder."""

import json
import os
import re
from pathlib import Path

import pytest

from modulora.cli import main

DATA = Path(os.environ.get("MODULORA_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
pytestmark = pytest.mark.skipif(not (DATA / "sni").is_dir(), reason=f"shared data folder not found at {DATA}")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")


@pytest.mark.parametrize("name", ["zeroshot", "mixed", "continual", "family"])
def test_quick_experiment(work, name, capsys):
    assert main(["experiment", name, "--quick", "--data", str(DATA), "--work", str(work), "--no-progress"]) == 0
    report = work / "quick" / "results" / name / "README.md"
    text = report.read_text()
    assert "Mode: quick" in text and "Environment: modulora" in text and "Target" in text
    assert "Precision: training cpu fp32" in text and ", evaluation cpu " in text
    assert "| base" in text or "| learned (L2R)" in text
    if name == "zeroshot":  # every method against the uniform merge, with its interval
        assert re.search(r"\| TIES merge \| [\d.]+ \| [\d.]+ \| [+-][\d.]+ \([+-][\d.]+ to [+-][\d.]+\) \|", text)
        # the Arrow ablation: one setting changed at a time, each with its interval
        ablation = text.split("## Arrow settings")[1].split("## Per task")[0]
        for row in ("| top-1 |", "| temperature 0.1 |", "| prototypes from A |", "| spectral scores (SpectR) |", "| routing in the MLPs only |",
                    "| routing in layers 1-1 only |"):
            assert re.search(re.escape(row) + r" [\d.]+ \| [\d.]+ \| [+-][\d.]+ \([+-][\d.]+ to [+-][\d.]+\) \|"
                             r" [\d.]+ \| [\d.]+ \|", ablation), (row, ablation)
        assert "| without GenKnowSub (Arrow top-4) |" in ablation
        routed = text.split("## Where routing sent each task")[1].split("## Per task")[0]
        assert routed.count("\n| task") >= 2 and re.search(r"\| task\w+ \| task\w+ \d\.\d\d", routed), routed
    for image in {"zeroshot": ["accuracy.png", "routing.png", "mbc-similarity.png"], "mixed": ["per-task.png"],
                  "continual": ["average-by-step.png"], "family": ["math.png", "commonsense.png"]}[name]:
        assert (report.parent / image).stat().st_size > 1000


def test_rerun_reuses_adapters(work):
    """Runs after the parametrized ones: the private build reports every adapter reused."""
    assert main(["experiment", "zeroshot", "--quick", "--data", str(DATA), "--work", str(work), "--no-progress"]) == 0
    build = json.loads((work / "quick" / "sni-private-4x3" / "build.json").read_text())
    assert build["trained"] == [] and len(build["reused"]) == 4


def test_missing_data_folder(tmp_path, capsys):
    assert main(["experiment", "mixed", "--quick", "--data", str(tmp_path / "nowhere"), "--work", str(tmp_path)]) == 2
    assert "shared data folder" in capsys.readouterr().err
