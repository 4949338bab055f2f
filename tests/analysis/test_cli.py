"""`outlierfree analyze` end to end on tiny trained models (BERT with outlier tracking, ViT), and its bad inputs:
one line, non-zero exit, no traceback, no partial report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from outlierfree.cli import main
from outlierfree.analysis.tracking import headline_metrics


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A BERT trained for a few steps with --track-outliers (run dir with log.jsonl), and an untrained tiny ViT."""
    import os

    from outlierfree.models.build import build_model
    from outlierfree.models.io import save_model
    from outlierfree.train import TrainConfig, train

    root = tmp_path_factory.mktemp("runs")
    old = os.environ.get("OUTLIERFREE_CACHE")
    os.environ["OUTLIERFREE_CACHE"] = str(root / "cache")
    try:
        model_dir = train(TrainConfig(task="mlm", steps=6, batch_size=4, vocab_size=600, track_outliers=3,
                                      eval_every=0, save_every=0, val_size=8, out=str(root / "bert"),
                                      progress=False), outlier_metrics=headline_metrics).model_dir
    finally:
        if old is None:
            os.environ.pop("OUTLIERFREE_CACHE", None)
        else:
            os.environ["OUTLIERFREE_CACHE"] = old
    save_model(build_model("vit", "tiny", "clipped", seed=0), root / "vit")
    return {"bert": Path(model_dir), "run": root / "bert", "vit": root / "vit", "root": root}


def _run(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def test_analyze_two_models_side_by_side(runs, capsys, tmp_path):
    out = tmp_path / "report"
    try:
        main([
            "analyze", str(runs["bert"]), str(runs["vit"]), "--batches", "2", "--batch-size", "4",
            "--seq-len", "64", "--out", str(out)])
    except SystemExit as e:  # click may exit 0
        assert e.code in (0, None)
    stdout = capsys.readouterr().out
    assert "max inf-norm" in stdout and "wrote" in stdout
    doc = json.loads((out / "report.json").read_text())
    bert, vit = doc["reports"]
    for r in (bert, vit):
        assert r["batches"] == 2 and r["sequences"] == 8 and r["seed"] == 0
        assert r["headline"]["max_inf_norm"] > 0 and r["headline"]["max_inf_norm_site"].endswith(":input")
        assert r["model"]["path"] and r["data"]["source"]
    assert "validation split" in bert["data"]["source"] and "[SEP]" in {t for h in [bert["noop"]["example"]["tokens"]]
                                                                       for t in h}
    assert "fashion-mnist" in vit["data"]["source"] and "background" in vit["heads"][0]
    # the run's outlier track was picked up from log.jsonl beside the model
    track = doc["tracks"][bert["name"]]
    assert [e["step"] for e in track] == [3, 6]
    for f in ("per_layer.png", "heatmap.png", "histogram.png", "noop_head.png", "tracking.png", "report.md"):
        assert (out / f).stat().st_size > 1000, f
        if f.endswith(".png"):
            assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert bert["headline"]["max_inf_norm_site"] in md and "## Training track" in md
    assert not list(out.parent.glob(".report.tmp-*"))


def test_track_only(runs, tmp_path, capsys):
    out = tmp_path / "t"
    try:
        main(["analyze", "--track", str(runs["run"]), "--out", str(out)])
    except SystemExit as e:
        assert e.code in (0, None)
    assert (out / "tracking.png").is_file()
    doc = json.loads((out / "report.json").read_text())
    assert doc["reports"] == [] and [e["step"] for e in doc["tracks"]["bert"]] == [3, 6]


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/model"], "does not exist"),
    (["{tmp}/notamodel"], "no config.json"),
    (["{tmp}/corrupt"], "cannot read the config"),
    (["{bert}", "--batches", "0"], "--batches must be at least 1"),
    (["{bert}", "--sites", "nonsense"], "unknown site kind"),
    (["{notok}"], "vocabulary files are missing"),
    (["{bert}", "--data", "{tmp}/empty.txt"], "no text"),
    (["{bert}", "--data", "{tmp}/symbols.jsonl", "--packing", "documents"], "no tokens"),
    ([], "no model given"),
])
def test_bad_input_one_line(runs, tmp_path, capsys, args, message):
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "config.json").write_text("{not json")
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "symbols.jsonl").write_text(json.dumps({"text": "\u0007"}) + "\n")
    notok = tmp_path / "notok"
    if "{notok}" in args:
        import shutil

        shutil.copytree(runs["bert"], notok)
        for f in notok.glob("tokenizer*"):
            f.unlink()
    args = [a.format(tmp=tmp_path, bert=runs["bert"], notok=notok) for a in args]
    out = tmp_path / "out"
    code, stdout, err = _run(["analyze", *args, "--out", str(out)], capsys)
    assert code not in (0, None)
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith(("Loading", "analysing"))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()  # nothing half-written


def test_help_lists_flags():
    r = subprocess.run([sys.executable, "-m", "outlierfree.cli", "analyze", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for flag in ("--data", "--batches", "--out", "--track", "--no-attention", "--threshold"):
        assert flag in r.stdout


def test_out_never_replaces_a_foreign_directory(runs, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, _, err = _run(["analyze", str(runs["vit"]), "--batches", "1", "--out", str(foreign)], capsys)
    assert code == 2 and "not an analysis report directory" in err
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_training_data_is_read_from_train_config(tmp_path):
    """What training recorded comes from the one reader (data/training_record.py): its data and validation fraction; a torn
    or absent train_config.json counts as no record."""
    from outlierfree.data.training_record import read_training_record

    (tmp_path / "train_config.json").write_text(json.dumps({"data": "corpus.txt", "val_fraction": 0.25}))
    record = read_training_record(tmp_path)
    assert record.trained_here and record.data == "corpus.txt" and record.val_fraction() == 0.25
    (tmp_path / "train_config.json").write_text("{torn")
    assert read_training_record(tmp_path) is None
    assert read_training_record(tmp_path / "absent") is None


def test_model_names_climb_past_generic_directories():
    from outlierfree.analysis.run import model_name

    assert model_name("/r/bert-vanilla-s0/train/model") == "bert-vanilla-s0/train/model"
    assert model_name("/r/bert-gated-s0/train/model") != model_name("/r/bert-vanilla-s0/train/model")
    assert model_name("/x/all-MiniLM/model") == "all-MiniLM/model"
    assert model_name("/a/gemma.gguf") == "gemma"
