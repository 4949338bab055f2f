"""The suite every attention variant goes through: each entry of the variant table (attention/variants/), and a toy
variant defined in one file (toy_variant.py), which shows that a new variant needs nothing but its file.

For every variant: what it declares is consistent (flags are its parameters, no flag shared, kernels that exist,
eager among them); its config round-trips through a dict and JSON; its CLI flags are built from its declaration and
parse back; its normaliser gives weights in [0, 1] with masked keys exactly 0, passes gradcheck in float64 and keeps
half precision; in BERT, OPT and ViT it trains (finite loss and gradients, its own parameters get a gradient), shows
its probabilities, saves and loads bit for bit, and patching vanilla afterwards leaves no trace; every kernel it
accepts gives the eager kernel's outputs; its defaults do not kill attention at initialisation.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import MappingProxyType

import click
import pytest
import torch
from click.testing import CliRunner

import outlierfree as of
from outlierfree.attention import variants as registry
from outlierfree.attention.config import IMPLS, AttentionConfig
from outlierfree.attention.eager import normalise
from outlierfree.attention.kernels import KERNELS, choose_kernel
from outlierfree.cli import attention_flag_names, attention_from_flags, attention_options
from outlierfree.errors import OutlierfreeError
from outlierfree import hf_compat

_spec = importlib.util.spec_from_file_location("toy_variant", Path(__file__).parent / "toy_variant.py")
toy_variant = importlib.util.module_from_spec(_spec)
sys.modules["toy_variant"] = toy_variant  # dataclasses read the module's namespace for its ClassVar annotations
_spec.loader.exec_module(toy_variant)

TOYS = {"toy": toy_variant.Toy}  # variants defined in tests, each put in the table by the fixture below
NAMES = [*registry.REGISTRY, *TOYS]
FAMILIES = ("bert", "opt", "vit")


@pytest.fixture(params=NAMES)
def variant(request, monkeypatch):
    """A variant name; a test variant is put in the (read-only) table for the test's duration."""
    name = request.param
    if name in TOYS:
        monkeypatch.setattr(registry, "REGISTRY", MappingProxyType({**registry.REGISTRY, name: TOYS[name]}))
    return name


class _Attention(torch.nn.Module):
    """Stands in for an attention module: holds the variant's submodules (a sink's logits, the toy's temperature)."""


def _module_with(cfg, n_heads=3, head_dim=4, dtype=torch.float64):
    m = _Attention()
    for name, sub in cfg.params.submodules(n_heads * head_dim, n_heads, head_dim).items():
        m.add_module(name, sub.to(dtype))
    return m


def _batch(family, model):
    g = torch.Generator().manual_seed(1)
    if family == "vit":
        c = model.config
        return dict(pixel_values=torch.randn(2, c.num_channels, c.image_size, c.image_size, generator=g),
                    labels=torch.tensor([1, 3]))
    ids = torch.randint(5, model.config.vocab_size, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def _shift_own_parameters(model):
    """Move the variant's own parameters off their initial values, so that a round trip must really load them."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "outlierfree_" in n:
                p.add_(torch.linspace(-0.3, 0.4, p.numel()).view_as(p))


# ---- what a variant declares -----------------------------------------------------------------------------------
def test_declarations_are_consistent(variant):
    cls = registry.variant_class(variant)
    assert cls.name == variant and cls.summary and cls.__dataclass_params__.frozen
    assert "eager" in cls.kernels and set(cls.kernels) <= set(KERNELS)
    fields = set(cls.__dataclass_fields__)
    assert {f.name for f in cls.flags} <= fields  # a flag sets one of its parameters
    everyone = [f.name for _, f in registry.all_flags()]
    assert len(everyone) == len(set(everyone))  # no flag belongs to two variants
    assert not fields & {"variant", "params", "impl", "block_size", "extra"}  # the config's own fields
    # the kernel table follows the variant's declaration
    assert all((variant in k.variants) == (k.name in cls.kernels) for k in KERNELS.values())


def test_config_round_trips_through_json(variant):
    cfg = AttentionConfig(variant)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["variant"] == variant and AttentionConfig.from_dict(d) == cfg
    assert cfg.describe().startswith(variant) and "\n" not in cfg.describe()
    assert AttentionConfig(cfg.params) == cfg  # the parameters alone say which variant
    with pytest.raises(OutlierfreeError, match="unknown attention config keys"):
        AttentionConfig.from_dict({**d, "no_such_parameter": 1})


def test_a_parameter_of_another_variant_is_refused(variant):
    owners = {f.name: n for n, f in registry.all_flags()}
    foreign = next(f for f, n in owners.items() if n != variant)
    with pytest.raises(OutlierfreeError, match=f"{foreign} is not a parameter of {variant} attention") as e:
        AttentionConfig(variant, **{foreign: 1})
    assert f"({owners[foreign]})" in str(e.value) and "\n" not in str(e.value)


def test_cli_flags_come_from_the_declaration(variant):
    @click.command()
    @attention_options
    def cmd(**kw):
        click.echo(json.dumps(attention_from_flags(kw).to_dict()))

    cls = registry.variant_class(variant)
    help_text = CliRunner().invoke(cmd, ["--help"]).output
    for flag in cls.flags:
        assert flag.option in help_text
    r = CliRunner().invoke(cmd, ["--attention", variant])
    assert r.exit_code == 0, r.output
    assert AttentionConfig.from_dict(json.loads(r.output)) == AttentionConfig(variant)  # one default, CLI = Python
    for flag in cls.flags:  # a flag given its default value gives the default config
        default = cls.__dataclass_fields__[flag.name].default
        if default is None or flag.type is bool:
            continue
        r = CliRunner().invoke(cmd, ["--attention", variant, flag.option, str(default)])
        assert r.exit_code == 0 and AttentionConfig.from_dict(json.loads(r.output)) == AttentionConfig(variant)
    other = next(n for n in registry.REGISTRY if n != variant)
    for flag in cls.flags:  # and belongs to this variant only
        kw = {"attention": other, flag.name: True if flag.type is bool else flag.type(1)}
        with pytest.raises(OutlierfreeError, match=f"{flag.option} does not apply to --attention {other}"):
            attention_from_flags(kw)
    assert set(attention_flag_names()) >= {"attention", "attention_impl", *(f.name for f in cls.flags)}


# ---- the normaliser --------------------------------------------------------------------------------------------
def test_weights_are_in_range_and_masked_keys_are_zero(variant):
    cfg = AttentionConfig(variant)
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64) * 3
    keep = torch.ones(2, 1, 5, 7, dtype=torch.bool)
    keep[1, ..., 4:] = False
    p = normalise(_module_with(cfg), scores, keep, cfg, 4)
    assert p.shape == scores.shape and p.dtype == torch.float64 and torch.isfinite(p).all()
    assert (p >= 0).all() and (p <= 1).all()  # weights; rows need not sum to one (zeta > 1, sinks, sigmoid)
    assert (p[~keep.expand_as(p)] == 0).all()
    half = normalise(_module_with(cfg, dtype=torch.bfloat16), scores.bfloat16(), keep, cfg, 4)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    torch.testing.assert_close(half.double(), p, atol=0.05, rtol=0)


def test_gradcheck_float64(variant):
    cfg = AttentionConfig(variant)
    g = torch.Generator().manual_seed(1)
    scores = (torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    keep = torch.ones(2, 1, 4, 5, dtype=torch.bool)
    keep[1, ..., 3:] = False
    m = _module_with(cfg)
    own = list(m.parameters())
    assert torch.autograd.gradcheck(lambda s, *ps: normalise(m, s, keep, cfg, 8), (scores, *own))


# ---- inside the models -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_trains_shows_probabilities_and_round_trips(variant, family, tmp_path):
    cfg = AttentionConfig(variant)
    model = of.build_model(family, "tiny", cfg, seed=0)
    attn = hf_compat.attention_modules(model)
    for _, m in attn:  # the submodules it declares, and no others
        assert {n for n in m._modules if n.startswith("outlierfree")} == set(cfg.params.modules)
    _shift_own_parameters(model)
    b = _batch(family, model)
    model.train()
    out = model(**b)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for n, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), n
        if "outlierfree_" in n:  # its own parameters learn
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    model.eval()
    with torch.no_grad():
        o = model(**b, output_attentions=True)
    assert len(o.attentions) == len(attn) and all(((a >= 0) & (a <= 1)).all() for a in o.attentions)
    of.save_model(model, tmp_path / "m")
    back = of.load_model(tmp_path / "m")
    assert AttentionConfig.from_dict(back.config.outlierfree) == cfg
    with torch.no_grad():
        assert torch.equal(back(**b).logits, model(**b).logits)
    # patching vanilla afterwards leaves no trace: the model is the vanilla one built from the same seed
    of.patch_model(back, "vanilla")
    ref = of.build_model(family, "tiny", "vanilla", seed=0).eval()
    assert [n for n, _ in back.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert not any(k.startswith("_outlierfree") for _, m in hf_compat.attention_modules(back) for k in m.__dict__)


@pytest.mark.parametrize("family", ["bert", "opt"])
def test_every_accepted_kernel_gives_the_eager_outputs(variant, family):
    cls = registry.variant_class(variant)
    accepted = []
    for impl in IMPLS:
        try:
            accepted.append(AttentionConfig(variant, impl=impl))
        except OutlierfreeError as e:
            assert impl not in ("auto", "eager") and "\n" not in str(e)
    assert {c.impl for c in accepted} >= {"auto", "eager"} | ({"sdpa"} if "sdpa" in cls.kernels else set()) \
        | ({"blocked"} if "blocked" in cls.kernels else set())
    eager = of.build_model(family, "tiny", AttentionConfig(variant, impl="eager"), seed=0).eval()
    _shift_own_parameters(eager)
    b = _batch(family, eager)
    with torch.no_grad():
        ref = eager(**b).logits
    real = b["attention_mask"].bool()
    for cfg in accepted:
        for shapes in ((2, 2, 12, 12), (1, 4, 2048, 2048)):
            assert variant in KERNELS[choose_kernel(cfg, shapes, False)].variants
        model = of.build_model(family, "tiny", cfg, seed=0).eval()
        model.load_state_dict(eager.state_dict())
        with torch.no_grad():
            got = model(**b).logits
        torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)


def test_defaults_keep_attention_alive_at_initialisation(variant):
    params = AttentionConfig(variant).params
    for T in (1, 2, 17, 128, 4096):
        assert params.dead_at_init(T) is None, (variant, T)


def test_the_toy_is_not_in_the_package_table():
    assert "toy" not in registry.REGISTRY and "toy" not in registry.VARIANTS
    with pytest.raises(OutlierfreeError, match="unknown attention variant 'toy'"):
        AttentionConfig("toy")
    assert math.isfinite(len(NAMES)) and NAMES[-1] == "toy"
