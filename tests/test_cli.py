"""The CLI as a user runs it: subprocesses, exit codes, one-line errors without tracebacks."""

import subprocess
import sys
from pathlib import Path

import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", "outlierfree.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_models_lists_families_sizes_and_variants():
    r = run("models")
    assert r.returncode == 0, r.stderr
    for word in ("bert", "opt", "vit", "base", "125m", "s16", "clipped", "gated", "--gate-init", "109.51 M"):
        assert word in r.stdout


def test_demo_runs_clipped_bert():
    r = run("demo", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert "clipped(alpha=1/T[row], zeta=1)" in r.stdout and "loss" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["demo", "--attention", "clipped", "--gamma", "0.5"], "gamma must be <= 0"),
    (["demo", "--attention", "clipped", "--zeta", "0.5"], "zeta must be >= 1"),
    (["demo", "--attention", "gated", "--gate-init", "1.5"], "gate init probability must be in (0, 1)"),
    (["demo", "--attention", "gated", "--gate-init", "0"], "gate init probability must be in (0, 1)"),
    (["demo", "--attention", "softermax"], "unknown attention variant 'softermax'"),
    (["demo", "--family", "gpt2"], "unknown model family 'gpt2'"),
    (["demo", "--size", "huge"], "unknown size 'huge'"),
    (["demo", "--attention", "gated", "--gate-type", "conv"], "unknown gate type 'conv'"),
    (["demo", "--attention", "vanilla", "--gamma", "-0.1"], "--gamma does not apply to --attention vanilla"),
    (["demo", "--gamma", "abc"], "abc"),
    (["nonsense"], "No such command"),
])
def test_bad_input_is_one_line_without_traceback(args, needle):
    r = run(*args)
    assert r.returncode == 2
    err = r.stderr.strip()
    assert "Traceback" not in r.stderr and len(err.splitlines()) == 1, r.stderr
    assert err.startswith("error: ") and needle in err


def test_patching_unsupported_model_is_one_line(tmp_path):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, vocab_size=50)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    code = ("import outlierfree as of, sys\n"
            "from outlierfree.cli import main\n"
            "m = of.load_model(sys.argv[1])\n"
            "try:\n    of.patch_model(m, 'clipped')\nexcept of.OutlierfreeError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "llama")], capture_output=True, text=True)
    assert "cannot patch a 'llama' model" in r.stdout and "bert, opt and vit" in r.stdout



RELEASED = str(Path(__file__).resolve().parents[1] / "src/outlierfree/released/bert-mini-vanilla")
OUT_COMMANDS = [["analyze", RELEASED], ["quantize", RELEASED], ["doctor", RELEASED], ["export", RELEASED],
                ["train", "--task", "mlm", "--steps", "1"], ["reproduce", "--preset", "quick"], ["release", "runs/none"]]


@pytest.mark.parametrize("below", ["x", "x/y", ""])
def test_out_under_a_file_is_one_line_before_any_work(tmp_path, capsys, below):
    """Every command's --out is checked when parsed (cli._check_out_when_parsed): exit 2, one line, no work. In
    process through the entry point (7 commands); the subprocess test below checks the same as a user sees it."""
    from outlierfree.cli import main

    blocker = tmp_path / "README.md"
    blocker.write_text("a file\n")
    for args in OUT_COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([*args, "--out", str(blocker / below) if below else str(blocker)])
        out, err = capsys.readouterr()
        assert e.value.code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and out == "", (args, out, err)
        assert err.startswith("error: the output directory") and str(blocker) in err and "--out" in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # nothing written


def test_out_under_a_file_as_a_user_sees_it(tmp_path):
    (tmp_path / "README.md").write_text("a file\n")
    (tmp_path / "run.yaml").write_text(f"task: mlm\nsteps: 1\nout: {tmp_path / 'README.md' / 'x'}\n")
    for args in (["analyze", RELEASED, "--out", str(tmp_path / "README.md" / "x")],
                 ["train", "--config", str(tmp_path / "run.yaml")]):  # the config file's out: checked by RunDir
        r = run(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "README.md" in r.stderr and "is under" in r.stderr and "--out" in r.stderr


def test_lazy_group_hides_only_a_command_whose_module_is_absent(tmp_path, monkeypatch):
    """A command whose module is not installed is left out of the list; a module that exists but fails to import
    (a typo, a dependency missing inside it) is an error, not a silently missing command."""
    import click

    from outlierfree import cli

    (tmp_path / "of_cmd_ok.py").write_text("import click\n@click.command('ok')\ndef cmd():\n    'ok'\n")
    (tmp_path / "of_cmd_broken.py").write_text("import of_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "LAZY_COMMANDS", {"ok": "of_cmd_ok:cmd", "absent": "of_cmd_absent.sub:cmd",
                                              "broken": "of_cmd_broken:cmd"})
    group = cli.LazyGroup()
    ctx = click.Context(group)
    assert group.get_command(ctx, "ok").name == "ok" and group.get_command(ctx, "absent") is None
    with pytest.raises(ModuleNotFoundError, match="of_no_such_dependency"):
        group.get_command(ctx, "broken")
    monkeypatch.setattr(cli, "LAZY_COMMANDS", {"ok": "of_cmd_ok:cmd", "absent": "of_cmd_absent:cmd"})
    assert group.list_commands(ctx) == ["ok"]


def test_command_line_records_arguments_and_changed_options():
    """The command recorded in reports: arguments, and only the options that differ from their defaults."""
    import click

    from outlierfree.cli import command_line

    @click.command("q")
    @click.argument("model")
    @click.option("--bits", default="w8a8")
    @click.option("--seed", type=int, default=0)
    @click.option("--quiet", is_flag=True)
    @click.option("--sym/--asym", default=True)
    def q(**kw):
        click.echo(command_line())

    from click.testing import CliRunner

    r = CliRunner().invoke(q, ["m dir", "--seed", "3", "--quiet", "--asym"])
    assert r.output.strip() == "outlierfree q 'm dir' --seed 3 --quiet --asym", r.output
