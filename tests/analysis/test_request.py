"""The analyze command's shape: AnalyzeRequest checks every flag once (one-line errors naming the flag), and the
library call (analyze_checkpoints -> AnalysisResult.write) writes what `outlierfree analyze` writes."""

import json
from pathlib import Path

import pytest

from outlierfree.analysis.run import AnalyzeRequest, analyze_checkpoint, analyze_checkpoints
from outlierfree.errors import OutlierfreeError

RELEASED = Path(__file__).resolve().parents[2] / "src/outlierfree/released/bert-mini-vanilla"


@pytest.mark.parametrize("kw, flag", [
    (dict(batches=0), "--batches"),
    (dict(max_sequences=0), "--max-sequences"),
    (dict(batch_size=0), "--batch-size"),
    (dict(seq_len=4), "--seq-len"),
    (dict(packing="zigzag"), "--packing"),
    (dict(threshold=0.0), "--threshold"),
    (dict(rel_threshold=-1.0), "--rel-threshold"),
    (dict(noop_threshold=0.0), "--noop-threshold"),
    (dict(noop_threshold=1.5), "--noop-threshold"),
    (dict(sites="ln_input,nonsense"), "--sites"),
    (dict(sites=("ln_input", "nonsense")), "--sites"),
    (dict(models=("/nonexistent/model",)), "does not exist"),
    (dict(models=()), "no model given"),
])
def test_request_rejects_each_bad_value_in_one_line(kw, flag):
    kw = {"models": (str(RELEASED),), **kw}
    with pytest.raises(OutlierfreeError) as e:
        AnalyzeRequest(**kw)
    msg = str(e.value)
    assert flag in msg and "\n" not in msg and e.value.fix, msg


def test_request_normalises_its_fields():
    """One path or several, sites as text or kinds: the same request; --no-attention drops attention internals."""
    a = AnalyzeRequest(str(RELEASED), sites="ln_input+attn_probs")
    b = AnalyzeRequest([RELEASED], sites=("ln_input", "attn_probs"))
    assert a == b and a.models == (str(RELEASED),) and a.kinds == ("ln_input", "attn_probs")
    assert AnalyzeRequest(str(RELEASED), sites="ln_input,attn_probs,query", no_attention=True).kinds == ("ln_input",)
    assert AnalyzeRequest(track=("runs/x",)).models == ()  # a track alone is a request
    with pytest.raises(OutlierfreeError, match="takes one model"):
        analyze_checkpoint(AnalyzeRequest((str(RELEASED), str(RELEASED))))


def _without_timing(doc):
    for r in doc["reports"]:
        r.pop("timing")
    return doc


def test_library_result_writes_what_the_cli_writes(tmp_path, capsys):
    from outlierfree.cli import main

    args = ["--batches", "1", "--batch-size", "2", "--seq-len", "32", "--sites", "ln_input,ffn_output,attn_probs"]
    main(["analyze", str(RELEASED), *args, "--out", str(tmp_path / "cli")])  # returns on success
    printed = capsys.readouterr().out.splitlines()

    request = AnalyzeRequest((str(RELEASED),), batches=1, batch_size=2, seq_len=32,
                             sites="ln_input,ffn_output,attn_probs", progress=False)
    result = analyze_checkpoints(request)
    assert [r["name"] for r in result.reports] == ["bert-mini-vanilla"]
    assert list(result.tracks) == ["bert-mini-vanilla"]  # the release's own log.jsonl outlier events
    cli_doc = json.loads((tmp_path / "cli" / "report.json").read_text())
    # cli.command_line: the arguments and the options that differ from their defaults, in declaration order
    assert cli_doc["command"] == (f"outlierfree analyze {RELEASED} --batches 1 --batch-size 2 --seq-len 32 --out "
                                  f"{tmp_path / 'cli'} --sites ln_input,ffn_output,attn_probs")
    result.command = cli_doc["command"]
    files = result.write(tmp_path / "lib")
    assert [f.name for f in files[:2]] == ["report.json", "report.md"] and all(f.is_file() for f in files)

    cli_files = sorted(p.name for p in (tmp_path / "cli").iterdir())
    assert cli_files == sorted(f.name for f in files) and "noop_head.png" in cli_files
    lib_doc = json.loads((tmp_path / "lib" / "report.json").read_text())
    assert _without_timing(cli_doc) == _without_timing(lib_doc)
    assert {k: lib_doc[k] for k in ("command", "tracks")} == {k: result.to_dict()[k] for k in ("command", "tracks")}

    def md(p):  # the timing line differs between two runs
        return [ln for ln in (p / "report.md").read_text().splitlines() if not ln.startswith("Time:")]

    assert md(tmp_path / "cli") == md(tmp_path / "lib")
    assert printed == [*result.lines(), f"wrote {tmp_path / 'cli' / 'report.json'}, {tmp_path / 'cli' / 'report.md'} "
                                        f"and {len(files) - 2} plots"]


def test_a_track_without_events_fails_before_any_model_is_analysed(tmp_path):
    (tmp_path / "log.jsonl").write_text(json.dumps({"event": "train", "step": 1, "loss": 2.0}) + "\n")
    with pytest.raises(OutlierfreeError, match="has no outlier events"):
        analyze_checkpoints(AnalyzeRequest(("/dev/null",), track=(str(tmp_path),)))
