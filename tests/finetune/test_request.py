"""`outlierfree finetune` as request -> library call -> typed result: FinetuneConfig rejects each bad value with a
one-line error naming the flag, the card's "Reproduce" command parses back (through the real click command) into the
same run, and the CLI prints what the library call returns."""

import dataclasses
import json

import pytest

from outlierfree.cli import main
from outlierfree.errors import OutlierfreeError
from outlierfree.finetune import FinetuneConfig, finetune
from outlierfree.finetune import loop
from outlierfree.finetune.config import retrofit_attention
from outlierfree.quant.config import parse_site_set


def make(**kw):
    return FinetuneConfig(**{"model": "m", "out": "o", **kw})


@pytest.mark.parametrize("change,words", [
    (dict(model=""), "no model given"),
    (dict(out=""), "no --out given"),
    (dict(method="magic"), "unknown --method 'magic'"),
    (dict(steps=0), "--steps 0"),
    (dict(lr=-1.0), "a learning rate is negative"),
    (dict(range_lr=-1.0), "a learning rate is negative"),
    (dict(sites="bogus"), "unknown --sites value 'bogus'"),
    (dict(sites="paper,full"), "--sites 'paper,full' names several site sets"),  # a fine-tune learns one set
    (dict(sites="ln_input+nonsense"), "unknown --sites value 'nonsense'"),
    (dict(weight_granularity="per_token"), "unknown --weight-granularity 'per_token'"),
    (dict(penalty="l2"), "unknown --outlier-penalty 'l2'"),
    (dict(penalty="kurtosis"), "--outlier-penalty kurtosis needs a weight"),
    (dict(float_weight=-0.5), "--float-weight -0.5 is negative"),
    (dict(penalty_weight=-1.0), "--penalty-weight -1.0 is negative"),
    (dict(layer_weight=-1.0), "--layer-weight -1.0 is negative"),
    (dict(batch_size=0), "--batch-size must be at least 1"),
    (dict(calib_batches=0), "--calib-batches must be at least 1"),
    (dict(train_batches=0), "--train-batches must be at least 1"),
    (dict(eval_batches=0), "--eval-batches must be at least 1"),
    (dict(calib_batches=9, train_batches=8), "--calib-batches 9 exceeds --train-batches 8"),
    (dict(seq_len=1), "--seq-len 1 is too short"),
    (dict(warmup_steps=-1), "--warmup-steps -1 is negative"),
    (dict(save_every=-1), "--save-every is negative"),
    (dict(grad_clip=-1.0), "grad_clip -1.0 is negative"),
    (dict(measure_batches=0), "measure_batches 0 is too few"),
    (dict(fp32_head=True, int8_head=True), "--fp32-head and --int8-head contradict each other"),
    (dict(distill_positions="cls"), "unknown --distill-positions 'cls'"),
    (dict(attention={"variant": "vanilla"}), "--attention vanilla cannot be retrofitted"),
    (dict(attention={"variant": "gated", "gate_init": 1.5}), "gate init probability must be in (0, 1)"),
])
def test_each_bad_value_is_a_one_line_error_naming_it(change, words):
    with pytest.raises(OutlierfreeError) as e:
        make(**change)
    assert words in str(e.value) and "\n" not in str(e.value) and "; " in str(e.value)


def test_sites_are_validated_by_parse_site_set_alone_and_kept_as_text():
    """The same words the quantize command accepts; site kinds are kept joined by +, presets as their name."""
    for text in ("paper", "full", "linear", "ln_input+residual", "residual,ln_input"):
        parsed = parse_site_set(text)
        cfg = make(sites=text)
        assert cfg.sites == (parsed if isinstance(parsed, str) else "+".join(parsed))
        assert make(sites=cfg.sites) == cfg  # normalising is idempotent (a saved config loads as itself)
    for bad in ("bogus", "paper+full", ""):
        with pytest.raises(OutlierfreeError) as e:
            parse_site_set(bad)
        with pytest.raises(OutlierfreeError) as f:
            make(sites=bad)
        assert str(e.value) == str(f.value)  # one validation, one message


@pytest.mark.parametrize("name,value,variant", [("gate_init", 0.5, "gated"), ("alpha", 2.0, "clipped"),
                                                ("eta", 1.1, "ncs"), ("beta", 2.0, "ncs")])
def test_a_retrofit_flag_of_another_variant_is_a_one_line_error(name, value, variant):
    other = next(v for v in ("gated", "clipped", "ncs") if v != variant)
    with pytest.raises(OutlierfreeError, match=f"--{name.replace('_', '-')} applies to --attention {variant}"):
        retrofit_attention(other, **{name: value})
    assert retrofit_attention(variant, **{name: value})[name] == value


def test_the_request_is_frozen():
    cfg = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 3


def parsed_by_the_cli(args, monkeypatch):
    """The FinetuneConfig that `outlierfree finetune ARGS` builds (the library call replaced by a recorder)."""
    seen = []

    def record(cfg):
        seen.append(cfg)
        return loop.FinetuneResult(cfg.out, cfg.out, {})

    monkeypatch.setattr(loop, "finetune", record)
    main(["finetune", *args])
    (cfg,) = seen
    return cfg


@pytest.mark.parametrize("kw", [
    {},
    dict(method="qat", steps=7, lr=1e-4, range_lr=5e-3, sites="full", weight_granularity="per_channel",
         batch_size=4, seq_len=32, seed=3, calib_batches=2, train_batches=5, eval_batches=3, warmup_steps=0,
         data="text.txt", save_every=0, measure=False),
    dict(method="retrofit", attention=retrofit_attention("clipped", alpha=2.0), gate_lr=0.5, real_int8=False),
    dict(method="retrofit+qat", attention=retrofit_attention("ncs", eta=1.1, beta=1.05), float_weight=0.5,
         penalty="infnorm", penalty_weight=1e-3, sites="ln_input+residual", layer_weight=0.25),
    dict(attention=retrofit_attention("gated", gate_init=0.5), model="dir with space/m", out="o u t"),
    dict(attention={"variant": "clipped"}),  # from Python: the flags' clipped default (alpha 1, T per row)
    dict(method="qat", sites="linear", weight_granularity="per_channel", symmetric_attention=True, int8_head=True),
    dict(fp32_head=True),
    dict(distill_positions="masked", float_weight=1.0),
])
def test_the_card_command_parses_back_into_the_same_run(kw, monkeypatch, capsys):
    cfg = make(**kw)
    import shlex

    args = shlex.split(cfg.command())[2:]
    assert shlex.split(cfg.command())[:2] == ["outlierfree", "finetune"] and args == cfg.flags()
    back = parsed_by_the_cli(args, monkeypatch)
    assert back.identity() == cfg.identity()
    same = ("out", "measure", "real_int8", "save_every", "measure_batches")
    assert {k: getattr(back, k) for k in same} == {k: getattr(cfg, k) for k in same}
    assert cfg.python_only() == {}
    assert capsys.readouterr().out.splitlines() == [f"cured model: {cfg.out}"]


def test_settings_no_flag_sets_are_named_on_the_card():
    from outlierfree.finetune.card import card

    cfg = make(grad_clip=0.5, attention={"variant": "gated", "gate_type": "mlp"}, measure_batches=2)
    extra = cfg.python_only()
    assert extra["grad_clip"] == 0.5 and extra["measure_batches"] == 2 and extra["attention"]["gate_type"] == "mlp"
    text = card(cfg, {})
    assert cfg.command(out="OUT") in text and "grad_clip=0.5" in text and "'gate_type': 'mlp'" in text


def test_site_kinds_fine_tune_and_the_cli_prints_the_result(tiny_bert, tmp_path, capsys):
    """A site-kind set trains its learned ranges like a preset does; what the CLI prints and the card's command
    are the library result's and the config's."""
    from outlierfree.quant.learned import load_ranges

    out = tmp_path / "kinds"
    args = ["finetune", str(tiny_bert / "model"), "--out", str(out), "--data", str(tiny_bert / "text.txt"),
            "--batch-size", "4", "--seq-len", "32", "--train-batches", "3", "--calib-batches", "2",
            "--eval-batches", "2", "--steps", "2", "--method", "qat", "--sites", "ln_input+residual",
            "--no-real-int8", "--no-progress"]
    main(args)
    printed = capsys.readouterr().out.splitlines()
    result = finetune(FinetuneConfig(**{k: v for k, v in json.loads(
        (out / "model" / "finetune_config.json").read_text()).items() if k not in ("identity", "attention")},
        attention={"variant": "gated"}))
    assert result.already_finished and printed == result.lines() == [f"cured model: {out / 'model'}"]
    assert result.after["learned_ranges_used"] > 0 and result.record["quant"]["sites"] == ["ln_input", "residual"]
    saved = load_ranges(out / "model")
    assert saved.act and saved.sites == "ln_input+residual"  # the ranges of the asked set, recorded with it
    assert all(":" in name for name in saved.act)  # residual sums and LayerNorm inputs are op sites, no modules
    card = result.card.read_text()
    assert "outlierfree finetune " + str(tiny_bert / "model") + " --out OUT" in card
    assert "--sites ln_input+residual" in card and "--method qat" in card and "--steps 2" in card


def test_grid_flags_off_leave_the_identity_of_earlier_runs_and_on_change_it():
    """A run begun before --fp32-head / --int8-head / --symmetric-attention existed (its identity has no such keys)
    resumes unchanged; each flag on is another run, and the card's quantize / export flags carry it."""
    base = make(method="qat")
    assert not {"fp32_head", "int8_head", "symmetric_attention"} & set(base.identity())
    assert base.quant_flags() == []
    for name in ("fp32_head", "int8_head", "symmetric_attention"):
        on = make(method="qat", **{name: True})
        assert on.identity()[name] is True and on.identity() != base.identity()
        assert on.quant_flags() == ["--" + name.replace("_", "-")]
    masked = make(method="qat", distill_positions="masked")
    assert masked.identity()["distill_positions"] == "masked" and masked.identity() != base.identity()
    lin = make(sites="linear", weight_granularity="per_channel", symmetric_attention=True)
    assert lin.quant_flags() == ["--sites", "linear", "--weight-granularity", "per_channel", "--symmetric-attention"]
