"""The CLI as a user runs it: subprocesses, exit codes, one-line errors without tracebacks."""

import subprocess
import sys

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
