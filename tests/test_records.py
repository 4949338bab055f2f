"""The record layer: one non-finite policy that round-trips, atomic writes, the run log, a full disk."""

import errno
import json
import math

import pytest

from outlierfree import OutlierfreeError
from outlierfree import records


def test_non_finite_numbers_round_trip_as_strict_json(tmp_path):
    obj = {"sqnr": math.inf, "low": -math.inf, "missing": math.nan, "ok": 1.5, "rows": [(1, math.inf)], "n": None}
    p = records.write_json(tmp_path / "r.json", obj)
    text = p.read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))  # strict JSON
    back = records.read_json(p)
    assert back["sqnr"] == math.inf and back["low"] == -math.inf and math.isnan(back["missing"])
    assert back["ok"] == 1.5 and back["rows"] == [[1, math.inf]] and back["n"] is None
    assert [q.name for q in tmp_path.iterdir()] == ["r.json"]  # no temporary left


def test_corrupt_json_is_one_line(tmp_path):
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(OutlierfreeError, match="corrupt"):
        records.read_json(tmp_path / "bad.json")


def test_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    p = records.write_json(tmp_path / "r.json", {"a": 1})
    real = type(p).write_text

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(p), "write_text", full)
    with pytest.raises(OutlierfreeError, match="disk is full"):
        records.write_json(p, {"a": 2})
    monkeypatch.setattr(type(p), "write_text", real)
    assert records.read_json(p) == {"a": 1}
    assert [q.name for q in tmp_path.iterdir()] == ["r.json"]


def test_log_skips_a_torn_line_and_filters_events(tmp_path):
    log = tmp_path / records.LOG_FILE
    records.append_log(log, {"event": "train", "step": 1, "loss": math.nan})
    records.append_log(log, {"event": "outliers", "step": 1, "max_inf_norm": 3.0})
    with open(log, "a") as f:
        f.write('{"event": "train", "st')  # a kill in the middle of a line
    rows = records.read_log(log)
    assert [r["event"] for r in rows] == ["train", "outliers"] and math.isnan(rows[0]["loss"])
    assert records.read_log(log, ("outliers",)) == [{"event": "outliers", "step": 1, "max_inf_norm": 3.0}]
    assert records.read_log(tmp_path / "none.jsonl") == []


@pytest.mark.parametrize("below", ["", "x", "x/y"])
def test_a_file_in_the_way_of_a_directory_is_one_line(tmp_path, below):
    from outlierfree.records import atomic_dir

    blocker = tmp_path / "README.md"
    blocker.write_text("a file\n")
    target = blocker / below if below else blocker
    for make in (records.check_dir_path, records.make_dir):
        with pytest.raises(OutlierfreeError) as e:
            make(target)
        assert str(blocker) in str(e.value) and "--out" in e.value.fix
    with pytest.raises(OutlierfreeError):
        with atomic_dir(target) as tmp:  # refused on entry: nothing is written
            (tmp / "x").write_text("never")
    assert blocker.read_text() == "a file\n" and sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


def test_make_dir_makes_nested_directories_and_accepts_existing_ones(tmp_path):
    d = records.make_dir(tmp_path / "a" / "b")
    assert d.is_dir() and records.make_dir(d) == d and records.check_dir_path(tmp_path / "new" / "c") == \
        tmp_path / "new" / "c"
