"""The kernel table (attention/kernels.py): choose_kernel is pure and returns the documented kernel for every
(variant, impl, probabilities, softcap / position bias) case, the table is read-only, and nothing in attention/
registers anything at import time."""

import ast
import dataclasses
import itertools
import pathlib
import subprocess
import sys

import pytest

from outlierfree.attention import blocked as bl
from outlierfree.attention import interface, kernels
from outlierfree.attention.config import CLIP_VARIANTS, IMPLS, SOFTMAX_VARIANTS, VARIANTS, AttentionConfig
from outlierfree.attention.kernels import AUTO_MIN_ELEMS, KERNELS, choose_kernel
from outlierfree.errors import OutlierfreeError

SHORT = (2, 2, 24, 24)  # 2304 probabilities: eager's side of the impl="auto" rule
LONG = (1, 4, 2048, 2048)  # 16.8M >= AUTO_MIN_ELEMS: blocked's side


def expected(variant, impl, shapes, want_probs, softcap, position_bias):
    """The documented rule, written out case by case (the module docstring of attention/kernels.py)."""
    if want_probs or softcap or position_bias:
        return "eager"  # only eager materialises probabilities, applies a softcap, adds a position bias
    if variant in CLIP_VARIANTS:
        if impl == "blocked":
            return "blocked"
        if impl == "auto":
            return "blocked" if shapes[0] * shapes[1] * shapes[2] * shapes[3] >= AUTO_MIN_ELEMS else "eager"
        return "eager"
    if variant in SOFTMAX_VARIANTS and impl in ("auto", "sdpa", "blocked"):
        return "sdpa"  # a blocked request on a softmax variant is served by torch's fused kernel
    return "eager"


def configs():
    """Every (variant, impl) the config validation accepts."""
    for variant, impl in itertools.product(VARIANTS, IMPLS):
        try:
            yield AttentionConfig(variant, impl=impl)
        except OutlierfreeError:
            continue


@pytest.mark.parametrize("cfg", list(configs()), ids=lambda c: f"{c.variant}-{c.impl}")
def test_choose_kernel_follows_the_documented_rule(cfg):
    for shapes, want_probs, softcap, bias in itertools.product((SHORT, LONG), (False, True), (False, True),
                                                               (False, True)):
        got = choose_kernel(cfg, shapes, want_probs, softcap=softcap, position_bias=bias)
        assert got == expected(cfg.variant, cfg.impl, shapes, want_probs, softcap, bias), \
            (cfg.variant, cfg.impl, shapes, want_probs, softcap, bias)
        # pure: asking again (or with a NamedTuple of the same sizes) gives the same answer
        assert choose_kernel(cfg, kernels.Shapes(*shapes), want_probs, softcap=softcap, position_bias=bias) == got


def test_documented_cases():
    ask = choose_kernel
    assert ask(AttentionConfig("clipped", impl="blocked"), SHORT, False) == "blocked"
    assert ask(AttentionConfig("ncs", impl="blocked"), SHORT, False) == "blocked"
    assert ask(AttentionConfig("clipped", impl="blocked"), SHORT, True) == "eager"  # probabilities wanted
    assert ask(AttentionConfig("clipped", impl="blocked"), SHORT, False, softcap=True) == "eager"
    assert ask(AttentionConfig("clipped", impl="blocked"), SHORT, False, position_bias=True) == "eager"
    assert ask(AttentionConfig("clipped"), SHORT, False) == "eager" and ask(AttentionConfig("clipped"), LONG,
                                                                           False) == "blocked"
    # the threshold itself: B*H*Tq*Tk == AUTO_MIN_ELEMS is "long"
    assert ask(AttentionConfig("ncs"), (1, 1, 1, AUTO_MIN_ELEMS), False) == "blocked"
    assert ask(AttentionConfig("ncs"), (1, 1, 1, AUTO_MIN_ELEMS - 1), False) == "eager"
    for variant in SOFTMAX_VARIANTS:
        for impl in ("auto", "sdpa", "blocked"):  # blocked on a softmax variant: served by sdpa
            assert ask(AttentionConfig(variant, impl=impl), LONG, False) == "sdpa"
        assert ask(AttentionConfig(variant, impl="eager"), LONG, False) == "eager"
        assert ask(AttentionConfig(variant), SHORT, True) == "eager"
    for variant in ("softmax1", "sink", "softpick", "sigmoid", "softplus"):
        assert ask(AttentionConfig(variant), LONG, False) == "eager"


def test_the_table_documents_blocked_on_softmax_as_sdpa():
    assert "blocked" in KERNELS["sdpa"].serves and set(KERNELS["sdpa"].variants) == set(SOFTMAX_VARIANTS)
    assert set(KERNELS["blocked"].variants) == set(CLIP_VARIANTS)
    assert KERNELS["blocked"].takes_causal and not KERNELS["eager"].takes_causal
    assert [k.name for k in KERNELS.values()] == list(KERNELS) and list(KERNELS)[-1] == "eager"
    eager = KERNELS["eager"]  # the last row takes every call
    assert set(eager.variants) == set(VARIANTS) and set(eager.serves) == set(IMPLS)
    assert eager.returns_probs and eager.takes_softcap and eager.takes_position_bias and eager.auto_min_elems == 0


def test_the_table_is_read_only():
    with pytest.raises(TypeError):
        KERNELS["flash"] = KERNELS["eager"]  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        KERNELS["blocked"].auto_min_elems = 0  # type: ignore[misc]


def test_no_registries_left():
    assert not hasattr(interface, "CLIPPED_KERNELS") and not hasattr(interface, "AUTO_CLIPPED")
    assert not hasattr(bl.blocked_kernel, "takes_causal")


ATTENTION_DIR = pathlib.Path(kernels.__file__).parent


@pytest.mark.parametrize("path", sorted(ATTENTION_DIR.rglob("*.py")), ids=lambda p: str(p.relative_to(ATTENTION_DIR)))
def test_no_module_level_mutation(path):
    """No top-level statement of an attention module writes into another object (a registry, a function's
    attribute): importing a module must not change what another one does."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
            if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            assert not isinstance(t, (ast.Subscript, ast.Attribute)), f"{path.name}:{node.lineno} mutates at import"
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):  # e.g. REGISTRY.update(...)
            assert not isinstance(node.value.func, ast.Attribute), f"{path.name}:{node.lineno} calls at import"


def test_importing_the_interface_alone_gives_a_working_blocked_kernel():
    """A fresh interpreter that imports only outlierfree.attention.interface runs the blocked kernel (nothing has
    to be imported for its side effect first)."""
    code = """
import torch
from outlierfree.attention import interface
from outlierfree.attention.blocked import blocked_clipped_attention
from outlierfree.attention.config import AttentionConfig

class M(torch.nn.Module):
    is_causal = True

m = M().eval()
m.outlierfree = AttentionConfig("clipped", gamma=-0.05, impl="blocked")
q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64) for _ in range(3))
assert interface.kernels.choose_kernel(m.outlierfree, (1, 2, 6, 6), False) == "blocked"
out, probs = interface.outlierfree_attention(m, q, k, v, None, scaling=0.5)
ref = blocked_clipped_attention(q, k, v, -0.05, 1.0, None, True, 0.5)
assert probs is None and torch.equal(out, ref.transpose(1, 2).contiguous())
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
