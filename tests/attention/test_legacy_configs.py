"""Configs written before issue 25 (every variant's 18 flat fields in each config.json and train_config.json) load as
the same configs, and compute the same. legacy_configs.json was written by the code of that time (commit 148d46b):
for each config its constructor keywords, what ``to_dict()`` stored and what ``describe()`` said, and the same for
sets of ``--attention`` flags."""

import json
from pathlib import Path

import pytest
import torch

import outlierfree as of
from outlierfree import AttentionConfig
from outlierfree.cli import attention_from_flags
from outlierfree.train.config import config_difference

LEGACY = json.loads((Path(__file__).parent / "legacy_configs.json").read_text())


def at_old_defaults(variant: str, keywords: dict) -> dict:
    """The keywords as the old code read them: softplus's default scale was then the earlier reading ``entropy``
    (issue 26 made the paper's formula the default), so a softplus config or flag set without a scale meant it."""
    return {"softplus_scale": "entropy", **keywords} if variant == "softplus" else dict(keywords)


@pytest.mark.parametrize("name", sorted(LEGACY["configs"]))
def test_an_old_config_loads_as_the_same_config(name):
    entry = LEGACY["configs"][name]
    fields = dict(entry["fields"])
    variant = fields.pop("variant")
    now = AttentionConfig(variant, **at_old_defaults(variant, fields))
    old = AttentionConfig.from_dict(entry["legacy"])
    assert old == now and old.describe() == entry["describe"]
    # a run recorded with the old dict resumes with the new one, and a changed config is still told apart
    assert config_difference({"attention": entry["legacy"]}, {"attention": now.to_dict()}) == []
    changed = now.replace(block_size=64).to_dict()
    assert config_difference({"attention": entry["legacy"]}, {"attention": changed}) == \
        [f"attention: {entry['legacy']!r} -> {changed!r}"]


@pytest.mark.parametrize("name", sorted(LEGACY["cli"]))
def test_the_same_flags_give_the_same_config(name):
    entry = LEGACY["cli"][name]
    flags = dict(entry["flags"])
    if flags.get("attention") == "softplus" and flags.get("softplus_scale") is None:
        flags["softplus_scale"] = "entropy"  # the old default (at_old_defaults)
    now = attention_from_flags(flags)
    assert now == AttentionConfig.from_dict(entry["legacy"]) and now.describe() == entry["describe"]


def test_the_cli_default_is_the_python_default():
    """The one change of behaviour: ``AttentionConfig("clipped")`` used to mean the paper's gamma = -0.025 (which
    zeroes every near-uniform row of T >= 41 keys) while ``--attention clipped`` meant gamma = -1/T per row; both mean
    the latter now. An old config always stored its gamma, so it loads as it was."""
    cli = LEGACY["cli"]["clipped"]["legacy"]
    assert AttentionConfig("clipped") == AttentionConfig.from_dict(cli) == attention_from_flags({"attention": "clipped"})
    paper = LEGACY["configs"]["clipped_paper"]["legacy"]
    assert AttentionConfig.from_dict(paper).params.gamma == -0.025 and paper["alpha"] is None


@pytest.mark.parametrize("name", ["clipped_alpha_fixed", "gated_linear_ft", "ncs_strong", "sink_init",
                                  "softplus_none_pow"])
def test_a_model_patched_from_an_old_dict_computes_the_same(name):
    entry = LEGACY["configs"][name]
    fields = dict(entry["fields"])
    a = of.build_model("opt", "tiny", AttentionConfig(fields.pop("variant"), **fields), seed=0).eval()
    b = of.build_model("opt", "tiny", entry["legacy"], seed=0).eval()
    ids = torch.randint(5, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
    assert a.config.outlierfree == b.config.outlierfree
