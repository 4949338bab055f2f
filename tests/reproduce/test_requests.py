"""``outlierfree reproduce`` / ``release`` as requests: every bad value is refused when the request is made, in one
line naming the flag, before anything is trained or written."""

import json

import pytest

from outlierfree import OutlierfreeError
from outlierfree.reproduce import PRESETS, ReproduceRequest, ReproduceResult
from outlierfree.reproduce.release import ReleaseRequest


@pytest.mark.parametrize("kw,needle", [
    ({"preset": "huge"}, "unknown preset 'huge'"),
    ({"families": "bert,gpt"}, "unknown family 'gpt'"),
    ({"families": " , "}, "--families is empty"),
    ({"variants": "vanilla,sparse"}, "unknown variant 'sparse'"),
    ({"variants": ("sparse",)}, "unknown variant 'sparse' for the quick preset"),
    ({"families": ("gpt",)}, "unknown family 'gpt'"),
    ({"seeds": "0,x"}, "--seeds '0,x' is not a list of integers"),
    ({"max_steps": 0}, "--max-steps must be positive"),
    ({"report_only": True}, "does not exist"),
    ({"out": "FILE/below"}, "is a file"),
])
def test_reproduce_request_refuses_each_bad_value_in_one_line(tmp_path, kw, needle):
    if kw.get("out") == "FILE/below":
        (tmp_path / "FILE").write_text("x")
        kw = {"out": str(tmp_path / "FILE" / "below")}
    with pytest.raises(OutlierfreeError) as e:
        ReproduceRequest(**{"out": str(tmp_path / "o"), **kw})
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["FILE"] if "FILE" in str(kw.get("out")) else [])


def test_reproduce_request_from_flags_equals_the_library_form(tmp_path):
    """The CLI's comma-separated text and a library caller's sequences make the same request and the same runs."""
    a = ReproduceRequest("quick", str(tmp_path), families="bert, opt", variants="vanilla", seeds="0,2")
    b = ReproduceRequest("quick", str(tmp_path), families=["bert", "opt"], variants=("vanilla",), seeds=(0, 2))
    assert a == b and a.seeds == (0, 2)
    assert [s.name for s in a.specs()] == ["bert-vanilla-s0", "bert-vanilla-s2", "opt-vanilla-s0", "opt-vanilla-s2"]
    assert ReproduceRequest("cpu").out == "runs/reproduce-cpu"
    assert len(ReproduceRequest("quick", str(tmp_path)).specs()) == len(PRESETS["quick"].runs())


def test_reproduce_result_writes_the_report_of_its_runs(tmp_path):
    """The result's write is the report: results.json's meta is the result's, its runs are the result's runs."""
    run = {"name": "bert-vanilla-s0", "family": "bert", "variant": "vanilla", "seed": 0, "fp": 20.0, "w8a8": 25.0,
           "w8a8_linear": 21.0, "max_inf_norm": 50.0, "avg_kurtosis": 3.0, "per_layer_inf_norm": [], "track": [],
           "how": {"machine": "m", "commit": "c", "run_dir": str(tmp_path / "runs" / "bert-vanilla-s0"),
                   "quant": {"w8a8": {"sites": "paper"}}}}
    res = ReproduceResult(preset="quick", out=str(tmp_path), runs=["bert-vanilla-s0"], results=[run], released=None,
                          missing={"bert-clipped-s0": "not started"}, max_steps=3, commit="abc", wall_s=1.5,
                          command="outlierfree reproduce --max-steps 3")
    files = res.write(tmp_path)
    assert files[:2] == [tmp_path / "report.md", tmp_path / "results.json"] and all(p.exists() for p in files)
    written = json.loads((tmp_path / "results.json").read_text())
    assert {k: written["meta"][k] for k in res.meta()} == res.meta()
    assert written["runs"] == [run] and written["meta"]["missing"] == {"bert-clipped-s0": "not started"}
    md = (tmp_path / "report.md").read_text()
    assert "| bert | vanilla | 1 |" in md and "bert-clipped-s0 (not started)" in md
    assert ReproduceResult(**{**res.to_dict(), "command": None}).meta()["command"] == \
        f"outlierfree reproduce --preset quick --out {tmp_path}"


def _run_dir(root, *, model=True):
    """A finished run's directory as far as the request looks: result.json and the model weights."""
    (root / "train" / "model").mkdir(parents=True)
    (root / "result.json").write_text("{}")
    if model:
        (root / "train" / "model" / "model.safetensors").write_bytes(b"")
    return root


@pytest.mark.parametrize("case,needle", [
    ("dtype", "unknown --dtype 'int4'"),
    ("unfinished", "is not a finished reproduce run"),
    ("out_exists", "exists"),
    ("no_weights", "has no model.safetensors"),
])
def test_release_request_refuses_each_bad_value_in_one_line(tmp_path, case, needle):
    run = _run_dir(tmp_path / "run", model=case != "no_weights")
    kw = {"run_dir": run, "out": tmp_path / "rel"}
    if case == "dtype":
        kw["dtype"] = "int4"
    elif case == "unfinished":
        (run / "result.json").unlink()
    elif case == "out_exists":
        (tmp_path / "rel").mkdir()
    with pytest.raises(OutlierfreeError) as e:
        ReleaseRequest(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert (tmp_path / "rel").exists() == (case == "out_exists")


def test_release_request_accepts_a_finished_run(tmp_path):
    r = ReleaseRequest(_run_dir(tmp_path / "run"), tmp_path / "rel", dtype="float32", note="n")
    assert r.model_dir == tmp_path / "run" / "train" / "model" and r.out == str(tmp_path / "rel")
