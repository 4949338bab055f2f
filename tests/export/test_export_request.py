"""``outlierfree export`` as request -> library call -> result: every bad value is refused when the request is made
(one line, naming the flag), and the library call writes what the command writes."""

import json

import pytest
import torch

pytest.importorskip("onnxruntime")  # the deploy extra (setup.sh installs it)
pytest.importorskip("onnx")

from outlierfree import OutlierfreeError  # noqa: E402
from outlierfree.cli import main  # noqa: E402
from outlierfree.export.run import ExportRequest, export_checkpoint  # noqa: E402
from outlierfree.quant.config import QuantSpec, configs_from_flags, paper_w8a8  # noqa: E402
from outlierfree.records import dumps  # noqa: E402


def _dynamic():
    c = paper_w8a8()
    return (type(c)(weight=c.weight, activation=QuantSpec(8, False, "per_token", "current_minmax", static=False),
                    sites="paper"),)


@pytest.mark.parametrize("change,needle", [
    ({"out": "EXISTING"}, "--out"),
    ({"configs": configs_from_flags(bits="w8a8", sites="paper,linear")}, "one --bits and one --sites"),
    ({"configs": configs_from_flags(sites="ln_input+residual")}, "--sites ln_input+residual"),
    ({"configs": configs_from_flags(bits="w4a8")}, "--bits w4a8"),
    ({"configs": _dynamic()}, "static per-tensor activation ranges"),
    ({"calib_batches": 0}, "--calib-batches"),
    ({"eval_batches": -1}, "--eval-batches"),
    ({"batch_size": 0}, "--batch-size"),
    ({"seq_len": 1}, "--seq-len"),
    ({"threads": -1}, "--threads"),
    ({"runtime": "tensorrt"}, "--runtime"),
])
def test_request_refuses_each_bad_value_in_one_line(tmp_path, change, needle):
    if change.get("out") == "EXISTING":
        change = {"out": str(tmp_path)}
    kw = {"model": "whatever", "out": str(tmp_path / "new"), **change}
    with pytest.raises(OutlierfreeError) as e:
        ExportRequest(**kw)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    assert not (tmp_path / "new").exists()


def test_request_defaults_are_the_commands():
    """The library defaults are the command's: the paper's W8A8 config, 16/4 batches of 8, ONNX Runtime."""
    r = ExportRequest("m", "o")
    assert r.config == configs_from_flags()[0] == paper_w8a8()
    assert (r.calib_batches, r.eval_batches, r.batch_size, r.runtime) == (16, 4, 8, "onnxruntime")


def test_library_call_writes_what_the_cli_writes(tiny_gated_bert, tmp_path, capsys):
    root = tiny_gated_bert
    flags = {"data": str(root / "text.txt"), "calib_batches": 1, "eval_batches": 1, "batch_size": 2, "seq_len": 16,
             "threads": 1}
    args = [x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = export_checkpoint(ExportRequest(str(root / "model"), str(tmp_path / "lib"), progress=False, **flags))
        capsys.readouterr()
        main(["export", str(root / "model"), *args, "--quiet", "--out", str(tmp_path / "cli")])
    finally:
        torch.set_num_threads(n)
    printed = capsys.readouterr().out.strip().splitlines()
    lib, cli = tmp_path / "lib", tmp_path / "cli"
    assert [p.name for p in result.files] == sorted(p.name for p in cli.iterdir())
    assert result.out == lib and [p.parent for p in result.files] == [lib] * len(result.files)
    # the result is export.json, and the command's summary is the result's lines
    on_disk = json.loads((lib / "export.json").read_text())
    assert on_disk == json.loads(dumps(result.to_dict()))
    assert [line.replace(str(lib), str(cli)) for line in result.lines()] == printed
    # the same numbers either way (same model, data, seed, config); only the command line, timing and paths differ
    made = json.loads((cli / "export.json").read_text())
    assert made["command"].startswith("outlierfree export") and "--calib-batches 1" in made["command"]
    assert on_disk["command"] == "outlierfree.export.run.export_checkpoint"
    for k in ("command", "seconds_total"):
        on_disk.pop(k), made.pop(k)
    assert on_disk.keys() == made.keys()
    for k in ("simulated", "pytorch_float", "onnxruntime_int8", "ranges", "config", "deploy", "site_agreement",
              "kernels", "data", "export"):
        assert on_disk[k] == made[k], k
    assert (lib / "ranges.json").read_text() == (cli / "ranges.json").read_text()


@pytest.mark.parametrize("config,words", [
    (paper_w8a8(), None),
    (paper_w8a8().replace(weight=configs_from_flags(weight_granularity="per_channel")[0].weight), None),
    (configs_from_flags(bits="w4a8")[0], "--bits w4a8"),
    (configs_from_flags(bits="w8a16")[0], "--bits w8a16"),
    (_dynamic()[0], "static per-tensor only"),
])
def test_one_integer_form_check_for_quantize_export_and_finetune(tmp_path, config, words):
    """QuantConfig.no_integer_form is the one rule of what runs in integers; quantize --backend and export refuse
    with it, and finetune's real-INT8 measurement skips with it."""
    from outlierfree.quant.run import QuantizeRequest

    why = config.no_integer_form()
    assert (why is None) == (words is None) and (words is None or words in why)
    if why is None:
        ExportRequest(model="m", out=str(tmp_path / "a"), configs=(config,))
        QuantizeRequest(model="m", configs=(config,), backend="onnxruntime")
        return
    for make in (lambda: ExportRequest(model="m", out=str(tmp_path / "b"), configs=(config,)),
                 lambda: QuantizeRequest(model="m", configs=(config,), backend="onnxruntime")):
        with pytest.raises(OutlierfreeError) as e:
            make()
        assert why in str(e.value) and "\n" not in str(e.value)
