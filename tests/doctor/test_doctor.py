"""The doctor command's shape: DoctorRequest checks every flag once (one-line errors naming the flag), and the
library call (diagnose -> DoctorResult.write) writes what `outlierfree doctor` writes."""

import json
from pathlib import Path

import pytest

from outlierfree.doctor.run import DoctorRequest, diagnose
from outlierfree.errors import OutlierfreeError

RELEASED = Path(__file__).resolve().parents[2] / "src/outlierfree/released/bert-mini-vanilla"


@pytest.mark.parametrize("kw, flag", [
    (dict(calib_batches=0), "--calib-batches"),
    (dict(eval_batches=0), "--eval-batches"),
    (dict(keep_16bit=-1), "--keep-16bit"),
    (dict(batch_size=0), "--batch-size"),
    (dict(seq_len=4), "--seq-len"),
    (dict(max_sequences=0), "--max-sequences"),
    (dict(model="/nonexistent/model"), "does not exist"),
])
def test_request_rejects_each_bad_value_in_one_line(kw, flag):
    kw = {"model": str(RELEASED), **kw}
    with pytest.raises(OutlierfreeError) as e:
        DoctorRequest(**kw)
    msg = str(e.value)
    assert flag in msg and "\n" not in msg and e.value.fix, msg


def test_the_analysis_doctor_runs_first():
    """doctor's first stage is analyze on the evaluation batches, with the residual sums quantize sees."""
    a = DoctorRequest(RELEASED, eval_batches=3, batch_size=4, seed=2, progress=False).analysis_request()
    assert a.models == (str(RELEASED),) and (a.batches, a.batch_size, a.seq_len, a.seed) == (3, 4, 128, 2)
    assert "residual" in a.kinds and "attn_probs" in a.kinds and not a.progress


def _stable(doc):
    """doctor.json without what differs between two runs of the same diagnosis: wall times and the command."""
    doc = {k: v for k, v in doc.items() if k not in ("seconds", "stage_seconds", "command")}
    doc["configs"] = [{k: v for k, v in c.items() if k != "seconds"} for c in doc["configs"]]
    return doc


def test_library_result_writes_what_the_cli_writes(tmp_path, capsys):
    from outlierfree.cli import main

    args = ["--calib-batches", "1", "--eval-batches", "1", "--batch-size", "2", "--seq-len", "32", "--keep-16bit", "1"]
    main(["doctor", str(RELEASED), *args, "--quiet", "--out", str(tmp_path / "cli")])  # returns on success
    captured = capsys.readouterr()
    lines = []
    result = diagnose(DoctorRequest(RELEASED, calib_batches=1, eval_batches=1, batch_size=2, seq_len=32,
                                    keep_16bit=1, progress=False), echo=lines.append)
    files = result.write(tmp_path / "lib")
    assert [f.name for f in files] == ["doctor.md", "doctor.json", "doctor.png"] and all(f.is_file() for f in files)
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == sorted(f.name for f in files)

    cli_doc = json.loads((tmp_path / "cli" / "doctor.json").read_text())
    lib_doc = json.loads((tmp_path / "lib" / "doctor.json").read_text())
    assert _stable(cli_doc) == _stable(lib_doc) and _stable(lib_doc) == _stable(json.loads(json.dumps(
        result.to_dict())))
    assert cli_doc["command"] == f"outlierfree doctor {RELEASED} {' '.join(args)} --out {tmp_path / 'cli'} --quiet"
    assert lib_doc["command"] is None  # set by the CLI only
    assert [c["label"] for c in lib_doc["configs"]][:2] == ["W8A8 paper", "W8A8 full"]
    # the console: the stage lines and the verdict on stderr, the files on stdout
    assert captured.err.splitlines() == [*lines, *result.lines()]
    assert lines[0].startswith("[1/4]") and result.lines() == [lib_doc["verdict"]["summary"]]
    assert captured.out.strip() == f"wrote {', '.join(str(tmp_path / 'cli' / f.name) for f in files)}"

    def md(p):  # the last line says how long it took
        return [ln for ln in (p / "doctor.md").read_text().splitlines() if not ln.startswith("Took")]

    assert md(tmp_path / "cli") == md(tmp_path / "lib")
