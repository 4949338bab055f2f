"""Every gate form: shapes, initial probability, fine-tuning identity, gradcheck in float64."""

import math

import pytest
import torch

from outlierfree.attention import GATE_TYPES, AttentionConfig, AttentionGate


@pytest.mark.parametrize("gate_type", GATE_TYPES)
@pytest.mark.parametrize("per", ["token", "head"])
def test_gradcheck_every_gate(gate_type, per):
    cfg = AttentionConfig("gated", gate_type=gate_type, gate_per=per, gate_init=0.3)
    gate = AttentionGate(8, 2, 4, cfg.params).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    params = [p for p in gate.parameters()]
    assert torch.autograd.gradcheck(lambda t, *ps: gate(t), (x, *params))


@pytest.mark.parametrize("gate_type", GATE_TYPES)
def test_shapes_and_initial_probability(gate_type):
    cfg = AttentionConfig("gated", gate_type=gate_type, gate_init=0.25, gate_finetune=True)
    gate = AttentionGate(8, 2, 4, cfg.params)
    x = torch.randn(3, 5, 8)
    p = gate(x)
    expect = {"elementwise": (3, 5, 2, 4), "scalar": (1, 1, 2, 1)}.get(gate_type, (3, 5, 2, 1))
    assert p.shape == expect
    # fine-tuning mode: zero weights, bias logit(p), output divided by p -> exactly 1
    torch.testing.assert_close(p, torch.ones_like(p))
    assert math.isclose(torch.sigmoid(torch.tensor(cfg.params.gate_bias_init)).item(), 0.25, rel_tol=1e-6)


def test_head_linear_uses_only_its_own_slice():
    cfg = AttentionConfig("gated", gate_type="head_linear")
    gate = AttentionGate(8, 2, 4, cfg.params)
    x = torch.randn(1, 1, 8, requires_grad=True)
    gate(x)[0, 0, 0, 0].backward()  # head 0's gate
    assert (x.grad[0, 0, 4:] == 0).all() and (x.grad[0, 0, :4] != 0).any()


def test_per_head_gate_is_masked_mean_over_tokens():
    cfg = AttentionConfig("gated", gate_type="linear", gate_per="head")
    gate = AttentionGate(8, 2, 4, cfg.params).double()
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, False]])
    expect = torch.sigmoid(gate.proj(x[:, :2]).mean(1))
    torch.testing.assert_close(gate(x, mask)[0, 0, :, 0], expect[0])
