"""Every zoo variant and the OSP recipe train from the CLI on bert/opt/vit tiny, load back, and go through the W8A8
simulator with the attention probe seeing scores and probabilities; the gamma ramp; Muon's parameter split."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from outlierfree import load_model
from outlierfree.cli import main
from outlierfree.errors import OutlierfreeError
from outlierfree.quant import quantize
from outlierfree.quant.config import paper_w8a8
from outlierfree.train import TrainConfig
from outlierfree.train.optim import MuonAdamW, build_optimizer, muon_matrices

ZOO = ("ncs", "softmax1", "sink", "softpick", "sigmoid", "softplus")
TASKS = {"mlm": "bert", "clm": "opt", "image": "vit"}


def _batches(family, model):
    torch.manual_seed(0)
    if family == "vit":
        c = model.config
        return [{"pixel_values": torch.randn(4, c.num_channels, c.image_size, c.image_size)}]
    ids = torch.randint(5, model.config.vocab_size, (4, 16))
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]


def _w8a8_sees_the_attention(model, family):
    batches = _batches(family, model)
    with torch.no_grad():
        ref = model(**batches[0]).logits
    with quantize(model, paper_w8a8()) as qm:
        qm.calibrate(batches, progress=False)
        names = list(qm.act)
        assert any(n.endswith(":scores") for n in names) and any(n.endswith(":probs") for n in names), names
        with torch.no_grad():
            q = model(**batches[0]).logits
    assert torch.isfinite(q).all() and not torch.equal(q, ref)  # quantization ran, and changed something


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("variant", ZOO)
def test_zoo_variant_trains_and_quantizes(task, variant, corpus, tiny_images, tiny_args, tmp_path):
    out = tmp_path / "run"
    data = tiny_images if task == "image" else corpus
    main(["train", *tiny_args(task, data, out), "--attention", variant, "--steps", "2", "--eval-every", "2",
          "--save-every", "0"])
    model = load_model(out / "model")
    assert model.config.outlierfree["variant"] == variant
    loss = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in loss if e["event"] == "train")
    _w8a8_sees_the_attention(model, TASKS[task])


@pytest.mark.parametrize("task", list(TASKS))
def test_osp_recipe_trains_saves_and_loads(task, corpus, tiny_images, tiny_args, tmp_path):
    out = tmp_path / "run"
    data = tiny_images if task == "image" else corpus
    main(["train", *tiny_args(task, data, out), "--attention", "softpick", "--optimizer", "muon", "--norm",
          "single-scale", "--embed-proj", "--steps", "3", "--eval-every", "3", "--save-every", "2"])
    model = load_model(out / "model")
    assert model.config.outlierfree_recipe == {"norm": "single-scale", "embed_proj": True}
    norms = [m for m in model.modules() if type(m).__name__ == "SingleScaleLayerNorm"]
    assert norms and all(m.weight.shape == (1,) for m in norms)
    assert not any(type(m) is nn.LayerNorm for m in model.modules())
    proj = model.get_input_embeddings().outlierfree_embed_proj
    assert not torch.equal(proj.weight, torch.eye(proj.weight.shape[0]))  # trained, and loaded back
    # the final model is the last step's weights, gains and projection included
    from safetensors.torch import load_file

    ckpt = load_file(str(out / "checkpoint" / "model.safetensors"))
    state = model.state_dict()
    for k, v in ckpt.items():
        k = k.removeprefix("model.")
        assert torch.equal(state[k], v), k
    _w8a8_sees_the_attention(model, TASKS[task])


def test_muon_takes_the_hidden_matrices_only():
    from outlierfree.models.build import build_model

    model = build_model("bert", "tiny", "sink", seed=0)
    mats, _ = muon_matrices(model)
    names = {id(p): n for n, p in model.named_parameters()}
    got = sorted(names[id(p)] for p in mats)
    assert got and all(("attention" in n or "intermediate" in n or "output.dense" in n) and n.endswith("weight")
                       for n in got), got
    assert not any("embeddings" in n or n.startswith("cls.") or "sink" in n for n in got)
    cfg = TrainConfig(optimizer="muon").resolved()
    opt = build_optimizer(model, cfg, [{"params": list(model.parameters()), "weight_decay": 0.0}])
    assert isinstance(opt, MuonAdamW)
    n_opt = sum(len(g["params"]) for g in opt.param_groups)
    assert n_opt == len(list(model.parameters()))
    # one step moves every matrix; state round-trips
    model(input_ids=torch.randint(5, 100, (2, 8))).logits.sum().backward()
    before = mats[0].detach().clone()
    opt.step()
    assert not torch.equal(before, mats[0])
    opt.load_state_dict(opt.state_dict())
    assert sum(len(g["params"]) for g in opt.param_groups) == n_opt


def test_muon_without_matrices_is_a_one_line_error():
    class EmbOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.norm = nn.Embedding(10, 4), nn.LayerNorm(4)

    cfg = TrainConfig(optimizer="muon").resolved()
    m = EmbOnly()
    with pytest.raises(OutlierfreeError, match="use --optimizer adamw"):
        build_optimizer(m, cfg, [{"params": list(m.parameters()), "weight_decay": 0.0}])


def test_gamma_ramp_runs_the_training_loop(corpus, tmp_path, monkeypatch):
    import outlierfree.train.loop as loop

    seen = []
    real = loop.set_gamma_ramp
    monkeypatch.setattr(loop, "set_gamma_ramp", lambda model, f: (seen.append(f), real(model, f)))
    cfg = TrainConfig(task="mlm", data=str(corpus), out=str(tmp_path / "r"), progress=False, steps=4,
                      eval_every=0, save_every=0, vocab_size=400, seq_len=32, batch_size=8, val_size=32,
                      attention={"variant": "clipped", "gamma": -0.1}, gamma_ramp_steps=2)
    loop.train(cfg)
    assert seen == [0.0, 0.5, 1.0, 1.5]  # step / ramp steps, clamped to 1 by set_gamma_ramp


@pytest.mark.parametrize("args,needle", [
    (["--attention", "vanilla", "--gamma-ramp-steps", "5"], "--gamma-ramp-steps does not apply"),
    (["--attention", "clipped", "--gamma-ramp-steps", "9", "--steps", "5"], "not below --steps 5"),
    (["--optimizer", "lion"], "unknown optimizer 'lion'"),
    (["--norm", "rms"], "unknown norm 'rms'"),
    (["--attention", "ncs", "--eta", "0.5"], "eta must be >= 1"),
    (["--attention", "ncs", "--beta", "2"], "beta must be in"),
    (["--attention", "softplus", "--softplus-power", "0"], "power must be >= 1"),
    (["--attention", "softpick", "--softpick-eps", "-1"], "softpick eps must be > 0"),
    (["--attention", "sigmoid", "--attention-impl", "blocked"], "blocked kernel does not compute"),
    (["--attention", "softmax1", "--eta", "1.1"], "--eta does not apply to --attention softmax1"),
    (["--attention", "sink", "--gate-init", "0.5"], "--gate-init does not apply to --attention sink"),
    (["--attention", "ncs", "--sink-init", "1"], "--sink-init does not apply to --attention ncs"),
])
def test_bad_zoo_flags_are_one_line_exit_2(args, needle, tmp_path):
    r = subprocess.run([sys.executable, "-m", "outlierfree", "train", "--out", str(tmp_path / "x"), *args,
                        "--print-config"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


def test_zoo_preset_and_reproduce_variants():
    from outlierfree.reproduce.presets import PRESETS, VARIANT_NAMES, ZOO_BERT, ZOO_OPT

    zoo = PRESETS["zoo-gpu"]
    runs = zoo.runs()
    assert {(r.family, r.variant) for r in runs} == {("bert", v) for v in ZOO_BERT} | {("opt", v) for v in ZOO_OPT}
    assert {r.seed for r in runs} == {0, 1, 2} and len(runs) == 3 * (len(ZOO_BERT) + len(ZOO_OPT))
    gpu = PRESETS["gpu"]
    for r in runs:  # the gpu preset's recipe, plus only what the variant itself adds
        base = {k: v for k, v in r.train.items() if k not in ("task", "family", "attention", "gamma_ramp_steps",
                                                               "optimizer", "norm", "embed_proj")}
        assert base == gpu.train[r.family]
        TrainConfig(**r.train).resolved()  # every spec is a valid training config
    ramp = next(r for r in runs if r.variant == "clipped_ramp")
    assert ramp.train["gamma_ramp_steps"] == 1600 and ramp.train["attention"]["gamma"] == -0.025
    osp = next(r for r in runs if r.variant == "osp")
    assert (osp.train["optimizer"], osp.train["norm"], osp.train["embed_proj"]) == ("muon", "single-scale", True)
    # --max-steps keeps the ramp inside the run
    short = next(r for r in zoo.runs(variants=("clipped_ramp",), max_steps=40))
    assert short.train["gamma_ramp_steps"] == 4 and short.train["steps"] == 40
    # every preset accepts every variant name it defines, and the old presets' runs are unchanged
    for name in ("quick", "cpu", "gpu"):
        specs = PRESETS[name].runs(variants=VARIANT_NAMES)
        assert {s.variant for s in specs} == set(VARIANT_NAMES)
        for s in PRESETS[name].runs():
            assert not {"gamma_ramp_steps", "optimizer", "norm", "embed_proj"} & set(s.train)


def test_zoo_preset_is_the_gpu_recipe_cut_to_one_number_of_steps():
    """Issue 26's zoo: bert/mini only, the gpu recipe with ZOO_STEPS steps, every variant of the table, OSP with
    vanilla and with the chosen best, and the vanilla sweep changing only its lr or warm-up."""
    from outlierfree.reproduce.presets import (PRESETS, VARIANT_NAMES, ZOO_LR_SWEEP, ZOO_OSP_WITH, ZOO_STEPS,
                                               ZOO_TABLE, zoo_train)

    zoo, gpu = PRESETS["zoo"], PRESETS["gpu"]
    runs = {r.variant: r for r in zoo.runs()}
    assert set(runs) == set(ZOO_TABLE) and {r.family for r in runs.values()} == {"bert"}
    assert {r.seed for r in runs.values()} == {0}
    assert {"gated", "gated_elementwise", "clipped", "clipped_ramp", "ncs", "softmax1", "sink", "softpick",
            "sigmoid", "softplus", "osp", f"osp_{ZOO_OSP_WITH}"} <= set(runs) and len(ZOO_LR_SWEEP) >= 3
    van = runs["vanilla"].train
    assert van["steps"] == ZOO_STEPS and van["track_outliers"] <= ZOO_STEPS // 8
    # the gpu recipe, but for the schedule's length and how often it tracks, evaluates and saves
    same = ("size", "batch_size", "seq_len", "lr", "warmup_steps", "hidden_dropout", "attention_dropout", "precision")
    assert {k: van[k] for k in same} == {k: gpu.train["bert"][k] for k in same}
    assert zoo_train(123)["steps"] == 123 and zoo_train(123)["lr"] == van["lr"]  # one number chooses the recipe
    for r in runs.values():
        TrainConfig(**r.train).resolved()
    assert runs["gated_elementwise"].train["attention"]["gate_type"] == "elementwise"
    assert runs["gated"].train["attention"]["gate_type"] == "head_linear"
    assert runs["clipped"].train["attention"]["gamma"] == -1 / 128  # alpha 1 per row at T = 128
    assert runs["clipped_ramp"].train["attention"]["gamma"] == -0.025
    assert runs["clipped_ramp"].train["gamma_ramp_steps"] == ZOO_STEPS // 10
    osp, best = runs["osp"].train, runs[f"osp_{ZOO_OSP_WITH}"].train
    assert osp["attention"] == {"variant": "vanilla"} and best["attention"] == runs[ZOO_OSP_WITH].train["attention"]
    for t in (osp, best):
        assert (t["optimizer"], t["norm"], t["embed_proj"]) == ("muon", "single-scale", True)
    for name, change in ZOO_LR_SWEEP.items():  # each sweep row differs from vanilla in exactly what it names
        t = runs[name].train
        assert t["attention"] == {"variant": "vanilla"}
        assert {k for k in set(t) | set(van) if t.get(k) != van.get(k)} == set(change)
    # its own names are accepted by it and refused, with the valid list, by the presets that lack them
    assert set(zoo.variant_names) == set(VARIANT_NAMES) | set(ZOO_TABLE)
    with pytest.raises(OutlierfreeError, match="unknown variant 'vanilla_lr2e3' for the gpu preset"):
        gpu.runs(variants=("vanilla_lr2e3",))


def test_zoo_variant_names_from_the_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "outlierfree", "reproduce", "--preset", "cpu", "--variants",
                        "gated_elementwise", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown variant 'gated_elementwise'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()
    r = subprocess.run([sys.executable, "-m", "outlierfree", "reproduce", "--preset", "zoo", "--variants",
                        "gated_elementwise,vanilla_wu1000", "--out", str(tmp_path / "z"), "--report-only"],
                       capture_output=True, text=True)
    # accepted, then refused only because nothing was trained there
    assert r.returncode == 2 and "does not exist" in r.stderr, r.stderr


def test_osp_run_resumes_to_the_same_weights(corpus, tmp_path, monkeypatch):
    """A killed Muon + single-scale + embedding-projection run resumed from its checkpoint ends with the weights of
    an uninterrupted one (the composite optimizer's state and the (1,) gains survive the checkpoint)."""
    import outlierfree.train.loop as loop

    def cfg(out, resume=False):
        return TrainConfig(task="mlm", data=str(corpus), out=str(out), progress=False, steps=4, eval_every=0,
                           save_every=2, vocab_size=400, seq_len=32, batch_size=8, val_size=32, resume=resume,
                           attention={"variant": "ncs"}, optimizer="muon", norm="single-scale", embed_proj=True,
                           gamma_ramp_steps=3)

    whole = load_model(loop.train(cfg(tmp_path / "whole")).model_dir)
    real = loop.TrainingBatches.train_batch

    def dies_at_step_3(self, step):
        if step == 2:
            raise KeyboardInterrupt  # after the step-2 checkpoint
        return real(self, step)

    monkeypatch.setattr(loop.TrainingBatches, "train_batch", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg(tmp_path / "cut"))
    monkeypatch.setattr(loop.TrainingBatches, "train_batch", real)
    resumed = load_model(loop.train(cfg(tmp_path / "cut", resume=True)).model_dir)
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# the identity a gpu-preset checkpoint recorded before the zoo's fields existed (runs/gpu, bert-vanilla-s0)
_OLD_IDENTITY = {
    "task": "mlm", "family": "bert", "size": "mini",
    "attention": {"variant": "vanilla", "gamma": -0.025, "zeta": 1.0, "alpha": None, "alpha_t": "fixed",
                  "max_len": None, "gate_type": "head_linear", "gate_per": "token", "gate_init": 0.25,
                  "gate_finetune": False, "impl": "auto", "block_size": 128, "extra": {}},
    "hf_config": {}, "hidden_dropout": 0.1, "attention_dropout": 0.1, "data": None, "text_column": "text",
    "hf_split": "train", "val_fraction": 0.02, "tokenizer": None, "vocab_size": 8192, "seq_len": 128,
    "mlm_probability": 0.15, "steps": 16000, "batch_size": 32, "grad_accum": 1, "lr": 0.001, "warmup_steps": 200,
    "schedule": "linear", "min_lr_ratio": 0.0, "weight_decay": 0.01, "decay_norm": False, "adam_beta1": 0.9,
    "adam_beta2": 0.999, "adam_eps": 1e-06, "grad_clip": 1.0, "precision": "no", "seed": 0, "val_size": 128}


def test_runs_made_before_the_zoo_still_match_their_config():
    """Checkpoints and finished runs record TrainConfig.identity(); the zoo's new fields (and AttentionConfig's) at
    their defaults must not make an old run look like another one (it would refuse to resume or be redone)."""
    from outlierfree.reproduce.presets import PRESETS
    from outlierfree.train.config import config_difference

    spec = next(s for s in PRESETS["gpu"].runs() if s.name == "bert-vanilla-s0")
    cfg = TrainConfig(**spec.train, seed=spec.seed, out="x").resolved()
    assert config_difference(_OLD_IDENTITY, cfg.identity()) == []
    # a zoo setting does change the identity
    assert config_difference(_OLD_IDENTITY, cfg.replace(optimizer="muon").identity()) == ["optimizer: None -> 'muon'"]
    ncs = cfg.replace(attention={"variant": "ncs", "eta": 1.1}).resolved().identity()
    assert ncs["attention"]["eta"] == 1.1
    # a record that left beta out at its default (as configs written before issue 25 did) is the same run
    no_beta = {**ncs, "attention": {k: v for k, v in ncs["attention"].items() if k != "beta"}}
    assert config_difference(no_beta, ncs) == [] and config_difference(no_beta, cfg.identity()) != []
