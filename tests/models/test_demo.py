"""`outlierfree demo` as request -> library call -> typed result: DemoRequest rejects each bad value with a one-line
error, run_demo's numbers hold the invariants of each variant, and the CLI prints the result's lines."""

import re

import pytest
import torch

from outlierfree.attention.config import AttentionConfig
from outlierfree.errors import OutlierfreeError
from outlierfree.models.build import build_model, count_parameters
from outlierfree.models.demo import DemoRequest, run_demo


@pytest.mark.parametrize("kw,words", [
    (dict(family="gpt2"), "unknown model family 'gpt2'"),
    (dict(size="huge"), "unknown size 'huge'"),
    (dict(family="vit", size="125m"), "unknown size '125m' for vit"),
    (dict(attention="softermax"), "unknown attention variant 'softermax'"),
    (dict(attention={"variant": "clipped", "gamma": 0.5}), "gamma must be <= 0"),
    (dict(attention=3), "attention must be an AttentionConfig"),
    (dict(batch_size=0), "batch_size 0 is too small"),
    (dict(seq_len=1), "seq_len 1 is too short"),
])
def test_each_bad_value_is_a_one_line_error(kw, words):
    with pytest.raises(OutlierfreeError) as e:
        DemoRequest(**kw)
    assert words in str(e.value) and "\n" not in str(e.value) and "; " in str(e.value)


def test_the_request_takes_a_config_its_dict_or_its_name():
    a = DemoRequest(attention=AttentionConfig("gated", gate_init=0.5))
    assert DemoRequest(attention={"variant": "gated", "gate_init": 0.5}) == a
    assert DemoRequest(attention="gated").attention == AttentionConfig("gated")
    assert DemoRequest().attention.describe() == "clipped(alpha=1/T[row], zeta=1)"  # the demo's default


@pytest.mark.parametrize("family", ["bert", "opt", "vit"])
def test_vanilla_rows_sum_to_one_and_the_numbers_are_the_models(family):
    torch.set_num_threads(1)
    r = run_demo(DemoRequest(family=family, attention="vanilla", seed=1, batch_size=2, seq_len=16))
    assert r.parameters == count_parameters(build_model(family, "tiny", "vanilla", seed=1))
    assert abs(r.row_sum_min - 1) < 1e-5 and abs(r.row_sum_max - 1) < 1e-5 and r.zero_fraction < 0.6
    assert r.heads == build_model(family, "tiny", "vanilla").config.num_attention_heads
    assert r.batch_shape[0] == 2 and (family == "vit" or r.batch_shape == (2, 16))
    assert torch.isfinite(torch.tensor(r.loss)) and r.loss > 0 and r.seconds > 0
    # the loss is the model's on the same seeded batch, recomputed here without the demo
    model = build_model(family, "tiny", "vanilla", seed=1)
    torch.manual_seed(1)
    if family == "vit":
        c = model.config
        batch = dict(pixel_values=torch.randn(2, c.num_channels, c.image_size, c.image_size),
                     labels=torch.randint(0, c.num_labels, (2,)))
    else:
        ids = torch.randint(5, model.config.vocab_size, (2, 16))
        batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    with torch.no_grad():
        assert model(**batch).loss.item() == pytest.approx(r.loss, rel=1e-5)


def test_clipped_rows_sum_to_at_most_one_and_reach_exact_zeros():
    r = run_demo(DemoRequest(batch_size=2, seq_len=32))  # the default: clipped softmax at gamma = -1/T per row
    assert 0 <= r.row_sum_min <= r.row_sum_max <= 1 + 1e-6 and r.zero_fraction > 0


def test_the_cli_prints_the_results_lines():
    from click.testing import CliRunner

    from outlierfree.cli import demo_cmd

    out = CliRunner().invoke(demo_cmd, ["--family", "opt", "--attention", "gated", "--gate-init", "0.5",
                                        "--seed", "2"])
    assert out.exit_code == 0, out.output
    lines = run_demo(DemoRequest(family="opt", attention={"variant": "gated", "gate_init": 0.5}, seed=2)).lines()
    timing = re.compile(r" in \d+ ms")  # the only line part that differs between two runs
    assert [timing.sub("", x) for x in out.output.splitlines()] == [timing.sub("", x) for x in lines]
