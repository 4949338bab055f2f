"""Released checkpoints: packing a run (float16 weights re-measured), loading it, bad input, and the main job's
report opening with them."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from outlierfree import OutlierfreeError, load_model
from outlierfree.reproduce import ReproduceRequest, reproduce
from outlierfree.reproduce import release as rel_mod
from outlierfree.reproduce.release import ReleaseRequest, available, make_release


def quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def bert_runs(tmp_path_factory):
    """Two finished quick-preset BERT runs (vanilla, gated) of 3 steps, without the shipped releases."""
    out = tmp_path_factory.mktemp("runs")
    reproduce(ReproduceRequest("quick", str(out), families=("bert",), variants=("vanilla", "gated"), max_steps=3,
                               progress=False, released=False), echo=quiet).write(out)
    return out / "runs"


def test_release_is_a_float16_model_directory_that_loads_as_float32(bert_runs, tmp_path):
    run = bert_runs / "bert-vanilla-s0"
    out = make_release(ReleaseRequest(run, tmp_path / "rel" / "bert-tiny-vanilla"), echo=quiet).out
    for f in ("config.json", "model.safetensors", "tokenizer.json", "train_config.json", "spec.json", "log.jsonl",
              "result.json", "release.json", "README.md"):
        assert (out / f).is_file(), f
    half = load_file(str(out / "model.safetensors"))
    full = load_file(str(run / "train" / "model" / "model.safetensors"))
    assert {t.dtype for t in half.values()} == {torch.float16}
    model = load_model(out)
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.float32 for p in params.values())
    # the loaded weights are the float32 run's, rounded once to float16
    w = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(params[w].detach(), full[w].half().float())
    info = json.loads((out / "release.json").read_text())
    assert info["check"]["ok"] and info["check"]["fp_relative_change"] <= 0.005
    card = (out / "README.md").read_text()
    assert "outlierfree reproduce --preset quick --families bert --variants vanilla --seeds 0" in card
    assert info["released_at_commit"] in card
    assert available(tmp_path / "rel") == [out]
    assert not [p for p in (tmp_path / "rel").iterdir() if p.name.startswith(".")]  # no temporary left


def test_release_refuses_bad_input_and_writes_nothing(bert_runs, tmp_path):
    with pytest.raises(OutlierfreeError, match="not a finished reproduce run"):
        make_release(ReleaseRequest(tmp_path, tmp_path / "r1"), echo=quiet)
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutlierfreeError, match="exists"):
        make_release(ReleaseRequest(bert_runs / "bert-vanilla-s0", tmp_path / "exists"), echo=quiet)
    with pytest.raises(OutlierfreeError, match="dtype"):
        make_release(ReleaseRequest(bert_runs / "bert-vanilla-s0", tmp_path / "r2", dtype="int4"), echo=quiet)
    r = subprocess.run([sys.executable, "-m", "outlierfree", "release", str(tmp_path), "--out",
                        str(tmp_path / "r3")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_release_refused_when_float16_moves_the_numbers(bert_runs, tmp_path, monkeypatch):
    real = rel_mod.measure

    def shifted(model_dir, spec, progress=False):
        m = real(model_dir, spec, progress)
        return {**m, "fp": m["fp"] * 1.01}  # a 1 % change of the FP metric

    monkeypatch.setattr(rel_mod, "measure", shifted)
    with pytest.raises(OutlierfreeError, match="float16 weights change the numbers"):
        make_release(ReleaseRequest(bert_runs / "bert-gated-s0", tmp_path / "r"), echo=quiet)
    assert list(tmp_path.iterdir()) == []


def test_main_job_opens_its_report_with_the_releases(bert_runs, tmp_path, monkeypatch):
    root = tmp_path / "released"
    for v in ("vanilla", "gated"):
        make_release(ReleaseRequest(bert_runs / f"bert-{v}-s0", root / f"bert-tiny-{v}"), echo=quiet)
    monkeypatch.setattr(rel_mod, "RELEASED", root)
    out = tmp_path / "quick"
    lines = []
    reproduce(ReproduceRequest("quick", str(out), families=("bert",), variants=("vanilla",), max_steps=3,
                               progress=False), echo=lines.append).write(out)
    md = (out / "report.md").read_text()
    sections = [ln for ln in md.splitlines() if ln.startswith("## ")]
    assert sections[0] == "## The paper's effect on released checkpoints"
    assert "bert-tiny-vanilla" in md and "bert-tiny-gated" in md
    res = json.loads((out / "results.json").read_text())
    rel = res["released"]
    assert {r["released"]["name"] for r in rel["runs"]} == {"bert-tiny-vanilla", "bert-tiny-gated"}
    # the opening sentence is computed from the measured numbers
    c = rel["criteria"][0]
    assert rel["headline"].startswith("On the released checkpoints") and f"{c['vanilla_degradation']:+.3g}" in \
        rel["headline"]
    assert rel["headline"] in md
    # where each release came from: one line per release, in the table's order, each naming its own card's note
    how = md.split("\nHow: ", 1)[1].split("\n| family |", 1)[0]
    bullets = [ln for ln in how.splitlines() if ln.startswith("- ")]
    assert [b.split("`")[1] for b in bullets] == ["bert-tiny-vanilla", "bert-tiny-gated"], how
    for b, r in zip(bullets, sorted(rel["runs"], key=lambda r: r["variant"] != "vanilla")):
        assert r["released"]["name"] in b and b.endswith(".")
    for p in rel["plots"]:
        assert (out / p).is_file(), p
    # measured with the release's own settings, on its own validation data
    for r in rel["runs"]:
        assert r["how"]["spec"]["quant"] == json.loads((root / r["released"]["name"] / "spec.json").read_text())[
            "quant"]
        assert r["fp"] is not None and r["w8a8"] is not None
    # a rerun reuses the measurements
    lines.clear()
    reproduce(ReproduceRequest("quick", str(out), families=("bert",), variants=("vanilla",), max_steps=3,
                               progress=False), echo=lines.append).write(out)
    assert sum("measured earlier, skipped" in ln for ln in lines) == 2
    # --no-released leaves them out
    reproduce(ReproduceRequest("quick", str(out), families=("bert",), variants=("vanilla",), max_steps=3,
                               progress=False, released=False), echo=quiet).write(out)
    assert "released checkpoints" not in (out / "report.md").read_text()


def test_shipped_releases_keep_their_numbers_and_show_the_effect():
    """The checkpoints shipped in the package: each loads, its stored weights reproduce the float32 run's FP metric
    and W8A8 degradation on its own validation batches, and vanilla's W8A8 degradation is at least 5x gated's and
    clipped's (the paper's effect, which the main job's report opens with)."""
    from outlierfree.reproduce.presets import METRIC
    from outlierfree.reproduce.release import _check, measure, release_spec

    releases = {p.name: p for p in available()}
    assert {"bert-mini-vanilla", "bert-mini-clipped", "bert-mini-gated"} <= set(releases), sorted(releases)
    degradation = {}
    for name, path in releases.items():
        spec = release_spec(path)
        result = json.loads((path / "result.json").read_text())
        now = measure(path, spec)
        check = _check(result, now)
        assert check["ok"], (name, check)
        sign = 1 if METRIC[spec.family] == "perplexity" else -1
        degradation[spec.variant] = sign * (now["w8a8"] - now["fp"])
        card = (path / "README.md").read_text()
        assert f"--variants {spec.variant} --seeds {spec.seed}" in card
    for fix in ("gated", "clipped"):  # both training-time fixes keep W8A8 within 1/5 of vanilla's loss
        assert degradation["vanilla"] >= 5 * max(degradation[fix], 1e-9), (fix, degradation)


def test_provenance_is_one_line_per_release_with_its_own_note():
    from outlierfree.reproduce.report import provenance_line

    runs = [{"family": "bert", "variant": v, "seed": 0, "name": f"bert-{v}-s0",
             "released": {"name": f"bert-mini-{v}", "preset": "gpu", "train_seconds": 7200.0 + i * 360,
                          "note": f"trained on machine {i},\nin one sitting."}}
            for i, v in enumerate(("vanilla", "gated"))] + [
        {"family": "bert", "variant": "clipped", "seed": 0, "name": "c", "released": {"name": "bert-mini-clipped"}}]
    lines = [provenance_line(r) for r in runs]
    assert lines[0] == "- `bert-mini-vanilla` (gpu preset, 2.0 h of training): Trained on machine 0, in one sitting."
    assert lines[1] == "- `bert-mini-gated` (gpu preset, 2.1 h of training): Trained on machine 1, in one sitting."
    assert lines[2] == "- `bert-mini-clipped`: No note in its card."
    assert all("\n" not in ln for ln in lines)
