"""Losses against transformers' own, data order, schedule, optimizer groups and config handling."""

import json

import pytest
import torch

from outlierfree.errors import OutlierfreeError
from outlierfree.models.build import build_model
from outlierfree.data import training
from outlierfree.train import losses, optim
from outlierfree.train.config import TrainConfig, config_difference, parse_set


@pytest.mark.parametrize("variant", ["vanilla", "clipped", "gated"])
def test_mlm_loss_on_masked_positions_equals_hf_loss(variant):
    model = build_model("bert", "tiny", variant, seed=0, vocab_size=120, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0).double()
    ids = torch.randint(5, 120, (3, 20))
    labels = torch.where(torch.rand(3, 20) < 0.3, ids, torch.full_like(ids, -100))
    labels[0, 0] = ids[0, 0]  # at least one label
    ref = model(input_ids=ids, labels=labels).loss  # HF: mean over labelled positions, full-vocab head everywhere
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    s, n = losses.mlm_loss_sum(model, ids, labels)
    assert int(n) == int((labels != -100).sum())
    assert s.dtype == torch.float64 and torch.allclose(s / n, ref, rtol=1e-12, atol=1e-12)
    (s / n).backward()
    for name, g in ref_grads.items():
        assert torch.allclose(dict(model.named_parameters())[name].grad, g, rtol=1e-9, atol=1e-12), name


def test_clm_and_image_losses_equal_hf_losses():
    opt = build_model("opt", "tiny", "gated", seed=0, vocab_size=100, dropout=0.0).double()
    ids = torch.randint(4, 100, (2, 16))
    tm = losses.TaskModel(opt, "clm")
    s, n = tm(input_ids=ids)
    assert int(n) == 2 * 15
    # transformers computes this loss in float32 even for a float64 model
    assert torch.allclose(s / n, opt(input_ids=ids, labels=ids).loss.double(), rtol=1e-6)
    vit = build_model("vit", "tiny", "clipped", seed=0).double()
    x, y = torch.randn(4, 1, 28, 28, dtype=torch.float64), torch.tensor([0, 3, 9, 1])
    s, n = losses.TaskModel(vit, "image")(pixel_values=x, labels=y)
    assert int(n) == 4
    assert torch.allclose(s / n, vit(pixel_values=x, labels=y).loss.double(), rtol=1e-6)


def test_data_order_is_a_function_of_seed_and_step():
    o = training.Order(10, 4, seed=3)
    seen = torch.cat([o.indices(s) for s in range(5)])  # 20 samples = two epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    fresh = training.Order(10, 4, seed=3)
    assert torch.equal(fresh.indices(3), o.indices(3))  # no history needed: resume re-creates the batch
    assert not torch.equal(training.Order(10, 4, seed=4).indices(0), o.indices(0))


def test_schedule_warmup_and_decay():
    cfg = TrainConfig(steps=100, warmup_steps=10, schedule="linear", min_lr_ratio=0.1).resolved()
    f = optim.lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5) and f(100) == pytest.approx(0.1)
    c = optim.lr_lambda(cfg.replace(schedule="cosine"))
    assert c(10) == pytest.approx(1.0) and c(55) == pytest.approx(0.55) and c(100) == pytest.approx(0.1)
    assert optim.lr_lambda(cfg.replace(schedule="constant"))(80) == 1.0


def test_weight_decay_groups_follow_the_reference_options():
    model = build_model("bert", "tiny", "gated", vocab_size=100)
    norms = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    for decay_norm in (False, True):
        decay, no_decay = optim.parameter_groups(model, 0.01, decay_norm)
        d = {id(p) for p in decay["params"]}
        assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
        assert len(d) + len(no_decay["params"]) == len(list(model.parameters()))
        ln_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
        assert (ln_weights <= d) == decay_norm
        assert not any(id(p) in d for n, p in model.named_parameters() if n.endswith("bias"))
        assert any("outlierfree_gate" in n and id(p) in d for n, p in model.named_parameters())
        assert norms


def test_config_file_round_trip_and_errors(tmp_path):
    cfg = TrainConfig(task="clm", attention={"variant": "gated", "gate_init": 0.5}, steps=7, lr=3e-4)
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "c.yaml").write_text("task: clm\nattention: gated\nsteps: 7\nlr: 3.0e-4\nhf_config: {dropout: 0.0}\n")
    assert TrainConfig.from_file(tmp_path / "c.json") == cfg
    y = TrainConfig.from_file(tmp_path / "c.yaml").resolved()
    assert (y.task, y.family, y.attention["variant"], y.steps, y.hf_config) == ("clm", "opt", "gated", 7, {"dropout": 0.0})
    (tmp_path / "bad.yaml").write_text("stesp: 3\n")
    with pytest.raises(OutlierfreeError, match="unknown setting.*stesp"):
        TrainConfig.from_file(tmp_path / "bad.yaml")
    (tmp_path / "broken.yaml").write_text("steps: [3\n")
    with pytest.raises(OutlierfreeError, match="cannot parse"):
        TrainConfig.from_file(tmp_path / "broken.yaml")
    with pytest.raises(OutlierfreeError, match="does not exist"):
        TrainConfig.from_file(tmp_path / "none.yaml")


@pytest.mark.parametrize("change,match", [
    (dict(task="mlm", family="opt"), "does not go with family"),
    (dict(task="speech"), "unknown task"),
    (dict(steps=0), "--steps must be a positive"),
    (dict(batch_size=-1), "--batch-size must be a positive"),
    (dict(batch_size=10, grad_accum=4), "not a multiple"),
    (dict(lr=0.0), "--lr must be positive"),
    (dict(size="huge"), "unknown size"),
    (dict(attention={"variant": "clipped", "gamma": 0.5}), "gamma must be <= 0"),
    (dict(hidden_dropout=1.5), "--hidden-dropout"),
    (dict(warmup_steps=-1), "--warmup-steps must be >= 0"),
    (dict(schedule="step"), "unknown schedule 'step'"),
    (dict(precision="int4"), "unknown precision 'int4'"),
    (dict(optimizer="sgd"), "unknown optimizer 'sgd'"),
    (dict(mlm_probability=1.0), "--mlm-probability must be in"),
    (dict(val_fraction=1.0), "--val-fraction must be in"),
    (dict(adam_beta2=1.0), "Adam betas"),
    (dict(seed=-1), "--seed must be an integer >= 0"),
    (dict(gamma_ramp_steps=10), "--gamma-ramp-steps does not apply to --attention vanilla"),
    (dict(attention={"variant": "clipped"}, steps=10, gamma_ramp_steps=10), "is not below --steps 10"),
])
def test_bad_settings_are_one_line_errors(change, match):
    with pytest.raises(OutlierfreeError, match=match) as e:
        TrainConfig(**change).resolved()
    assert "\n" not in str(e.value) and "; " in str(e.value)


@pytest.mark.parametrize("task", ["mlm", "clm", "image"])
def test_the_request_is_frozen_and_resolving_is_idempotent(task):
    """TrainConfig is the request of `train`: a changed copy is replace(); resolving a resolved config (what a
    resumed or repeated run does with its saved train_config.json) changes nothing."""
    import dataclasses

    cfg = TrainConfig(task=task, attention={"variant": "gated"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 3
    r = cfg.resolved()
    assert cfg.steps is None and r.steps is not None and r.family is not None  # resolved() returns a copy
    assert r.resolved() == r and TrainConfig.from_dict(r.to_dict()).resolved() == r


def test_overrides_identity_and_set_parsing():
    cfg = TrainConfig(task="clm", hidden_dropout=0.0, attention_dropout=0.2, hf_config={"init_std": 0.01}).resolved()
    assert cfg.model_overrides() == {"init_std": 0.01, "dropout": 0.0, "attention_dropout": 0.2}
    assert parse_set(["a=1", "b=0.5", "c=true", "d=gelu"]) == {"a": 1, "b": 0.5, "c": True, "d": "gelu"}
    with pytest.raises(OutlierfreeError, match="key=value"):
        parse_set(["nothing"])
    a, b = cfg.identity(), cfg.replace(out="elsewhere", log_every=3, resume=True).identity()
    assert a == b and config_difference(a, cfg.replace(lr=0.5).identity()) == ["lr: 0.001 -> 0.5"]


def test_cli_flags_override_the_config_file(tmp_path):
    import click

    from outlierfree.train.cli import build_config, train_cmd

    (tmp_path / "c.yaml").write_text("task: clm\nsteps: 7\nlr: 0.01\nattention: {variant: clipped, gamma: -0.1}\n")
    ctx = train_cmd.make_context("train", ["--config", str(tmp_path / "c.yaml"), "--lr", "0.5", "--set", "x=1"])
    kw = dict(ctx.params)
    with ctx:
        cfg = build_config(ctx, kw.pop("config_file"), kw.pop("set_items"), {k: v for k, v in kw.items()
                                                                             if k != "print_config"})
    assert (cfg.task, cfg.steps, cfg.lr, cfg.hf_config) == ("clm", 7, 0.5, {"x": 1})
    assert cfg.attention == {"variant": "clipped", "gamma": -0.1}  # no attention flag: the file's variant
    ctx = train_cmd.make_context("train", ["--config", str(tmp_path / "c.yaml"), "--attention", "gated"])
    kw = dict(ctx.params)
    with ctx:
        cfg = build_config(ctx, kw.pop("config_file"), kw.pop("set_items"), {k: v for k, v in kw.items()
                                                                             if k != "print_config"})
    assert cfg.attention["variant"] == "gated"
    assert isinstance(ctx, click.Context)


def test_shared_task_losses_handle_padding_and_preselected_logits():
    """The losses training and quant's evaluation share: a padded causal-LM batch scores only predictions of real
    tokens (checked against a loop over sequences in float64), and masked-LM logits taken at the masked positions
    give the same sum as logits over every position."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 11, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0  # sequence 1 has 4 real tokens: 3 predictions
    s, n = losses.causal_lm_loss_sum(logits, ids, mask)
    ref, count = 0.0, 0
    for b in range(3):
        real = int(mask[b].sum())
        for t in range(real - 1):
            ref -= float(torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]])
            count += 1
    assert int(n) == count == 6 + 3 + 6 and abs(float(s) - ref) < 1e-10
    s_all, n_all = losses.causal_lm_loss_sum(logits, ids, torch.ones_like(mask))
    assert int(n_all) == 18 and torch.equal(s_all, losses.causal_lm_loss_sum(logits, ids)[0])
    labels = torch.where(torch.rand(3, 7, generator=g) < 0.4, ids, torch.full_like(ids, losses.IGNORE))
    full, m = losses.masked_lm_loss_sum(logits, labels)
    picked, m2 = losses.masked_lm_loss_sum(logits[labels != losses.IGNORE], labels)
    assert int(m) == int(m2) == int((labels != losses.IGNORE).sum()) and torch.equal(full, picked)
    s, n, correct = losses.classification_loss_sum(logits[:, 0], ids[:, 0])
    assert int(n) == 3 and int(correct) == int((logits[:, 0].argmax(-1) == ids[:, 0]).sum())
