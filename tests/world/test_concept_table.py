"""scripts/concept_table.py: the concepts README's table from `loraclr evaluate --json` results."""

import json

import pytest


@pytest.fixture
def mod(script):
    return script("scripts/concept_table.py", "concept_table_script")


def _stat(m):
    return {"mean": m, "low": max(0.0, m - 0.2), "high": min(1.0, m + 0.2), "n": 16}


def _results(path, scores, suite="single"):
    per = {n: {"identity": _stat(i), "text": _stat(0.9), "image": _stat(0.8)} for n, i in scores.items()}
    path.write_text(json.dumps({"model": "mini", "results": [{"suite": suite, "per_concept": per}]}))
    return path


MANIFEST = {"concepts": [
    {"name": "rubo", "kind": "identity", "format": "kohya", "rank": 4, "steps": 2400, "token_warmup": 600,
     "trigger": "<rubo1> <rubo2> <rubo3>"},
    {"name": "tobi", "kind": "identity", "format": "edlora", "rank": 4, "steps": 1200, "token_warmup": 600,
     "trigger": "<tobi1> <tobi2>"},
    {"name": "mosaic", "kind": "style", "format": "kohya", "rank": 4, "steps": 600, "trigger": "mosaic"},
]}


def test_table_rows_and_the_bar(tmp_path, mod):
    m = tmp_path / "manifest.json"
    m.write_text(json.dumps(MANIFEST))
    own = [_results(tmp_path / "own_a.json", {"rubo": 0.875}), _results(tmp_path / "own_b.json", {"tobi": 0.25, "mosaic": 0.0})]
    val = _results(tmp_path / "val.json", {"rubo": 0.75, "tobi": 0.5})
    base = _results(tmp_path / "base.json", {"rubo": 0.0, "tobi": 0.0625, "mosaic": 0.0})
    md = tmp_path / "table.md"
    assert mod.main(["--manifest", str(m), "--own", *map(str, own), "--validation", str(val), "--base", str(base),
                     "--md", str(md)]) == 0
    text = md.read_text()
    rows = [r for r in text.splitlines() if r.startswith("| ")]
    assert len(rows) == 4  # header + 3 concepts
    assert rows[1].startswith("| rubo | identity | kohya | 4 | 2400 | 600 | `<rubo1> <rubo2> <rubo3>` | 0.88 [0.68, 1.00] | 0.75 |")
    assert "| mosaic | style | kohya | 4 | 600 | - | `mosaic` | - | - | - |" in rows[3]
    assert "1 of 2" in text and "below: tobi 0.25" in text and "mean 0.56" in text
    assert "Validation seeds: mean 0.62, 0 of 2" in text and "highest identity 0.06" in text


def test_a_multi_suite_file_is_refused(tmp_path, mod):
    with pytest.raises(ValueError, match="single"):
        mod.per_concept(_results(tmp_path / "multi.json", {"rubo": 1.0}, suite="multi"))


def test_a_concept_scored_twice_is_refused(tmp_path, mod):
    files = [_results(tmp_path / "a.json", {"rubo": 1.0}), _results(tmp_path / "b.json", {"rubo": 0.5})]
    with pytest.raises(ValueError, match="rubo"):
        mod.per_concept(files)
