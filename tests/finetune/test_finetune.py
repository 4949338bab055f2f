"""outlierfree finetune: retrofit leaves outputs unchanged at step 0, gradients reach weights and ranges, a killed
run resumes bit-identically, learned ranges survive save/load and reach the ONNX export, bad input is one line."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import archs  # tests/archs.py (conftest puts tests/ on the path)

from outlierfree.cli import main
from outlierfree.finetune import FinetuneConfig, finetune
from outlierfree.finetune.loop import FinetuneRunDir, StepLoss, Student, _set_ramp, retrofit_for
from outlierfree.models.build import build_model, patch_model
from outlierfree.quant import paper_w8a8, quantize
from outlierfree.quant.evaluate import model_output
from outlierfree.quant.learned import load_ranges, make_trainable
from outlierfree.quant.grid import qparams


def small_flags(root, out, *extra):
    """CLI flags of a tiny, fast fine-tune of the tiny BERT on its text."""
    return ["finetune", str(root / "model"), "--out", str(out), "--data", str(root / "text.txt"), "--batch-size", "4",
            "--seq-len", "32", "--train-batches", "3", "--calib-batches", "2", "--eval-batches", "2",
            "--no-progress", *extra]


def _batches(n=3, vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (3, 16), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 11:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _outputs(model, batch):
    """Every output that carries meaning (logits or hidden states), float64 for the comparison."""
    out = model(**batch)
    y = getattr(out, "logits", None)
    return (y if y is not None else out.last_hidden_state).double()


@pytest.mark.parametrize("variant", ["gated", "clipped", "ncs"])
@pytest.mark.parametrize("name", archs.ARCH_NAMES)
def test_retrofit_at_step_0_leaves_outputs_unchanged_on_every_architecture(name, variant):
    """The retrofit ``finetune`` applies (gated with gate_finetune; clipped softmax / NCS with gamma ramped from 0)
    computes what the original did, on every family of tests/archs.py (encoders, decoders with grouped-query
    attention and sliding windows, T5, ViT), and the new parameters (gates) get gradients: the retrofit is not
    limited to the families trained from scratch (BERT, OPT, ViT)."""
    model = archs.build(name)
    b = archs.batch(name, model)
    real = archs.real_token_mask(name, b)
    with torch.no_grad():
        ref = _outputs(model, b)
    cfg = FinetuneConfig(model="m", out="o", method="retrofit", attention={"variant": variant}, steps=10)
    patch_model(model, cfg.attention_config(), strict=False)
    _set_ramp(model, cfg, 0)
    got = _outputs(model, b)
    keep = real if real is not None and real.shape == got.shape[:2] else torch.ones(got.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(got[keep], ref[keep], rtol=1e-5, atol=1e-5)
    if variant == "gated":
        got[keep].pow(2).mean().backward()
        grads = [p.grad for n, p in model.named_parameters() if "outlierfree_gate" in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    else:  # halfway through the ramp the variant is really on: outputs move
        _set_ramp(model, cfg, 5)
        with torch.no_grad():
            moved = _outputs(model, b)
        assert (moved[keep] - ref[keep]).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["bert", "opt"])
def test_layer_distillation_taps_every_norm_and_is_zero_only_for_the_original(family):
    """--layer-weight: the tap captures one (B, T, D) output per LayerNorm (what nn.LayerNorm computes: checked
    against calling each norm on the captured input), the layer loss is 0 between the original and its retrofit at
    step 0 (outputs unchanged), positive once a weight moves, and its gradient reaches the early layers."""
    from outlierfree.finetune.losses import NormTap, layer_loss
    from outlierfree.hf_compat import layer_norms

    model = build_model(family, "tiny", "vanilla", seed=0).eval()
    data = _batches(1, vocab=min(100, model.config.vocab_size))[0]
    task = "clm" if family == "opt" else "mlm"
    norms = [m for _, _, m in layer_norms(model)]
    with NormTap(model, "input") as ins, NormTap(model, "output") as outs, torch.no_grad():
        model_output(model, data, task)
    assert len(outs.tensors) == len(ins.tensors) == len(norms) >= 3
    for m, x, y in zip(norms, ins.tensors, outs.tensors):
        torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps))
    teacher = outs.tensors
    student = build_model(family, "tiny", "vanilla", seed=0).eval()
    patch_model(student, FinetuneConfig(model="m", out="o", method="retrofit").attention_config())
    with NormTap(student, "output") as tap:
        model_output(student, data, task)
    assert float(layer_loss(tap.tensors, teacher, data["attention_mask"]).detach()) < 1e-6  # float32 rounding
    emb = next(p for n, p in student.named_parameters() if "embed" in n and p.dim() == 2)  # the word table
    with torch.no_grad():
        emb.add_(0.5 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(0)))
    with NormTap(student, "output") as tap:
        model_output(student, data, task)
    loss = layer_loss(tap.tensors, teacher, data["attention_mask"])
    assert float(loss.detach()) > 1e-4
    loss.backward()
    assert emb.grad is not None and float(emb.grad.abs().sum()) > 0
    with pytest.raises(ValueError):
        layer_loss(tap.tensors[:-1], teacher, None)


def test_trainable_ranges_start_at_the_calibrated_simulator_and_gradients_reach_them():
    model = build_model("bert", "tiny", "vanilla", seed=0).eval()
    data = _batches(3)
    qm = quantize(model, paper_w8a8(), "mlm")
    qm.calibrate(data[:2], lambda m, b: model_output(m, b, "mlm"), progress=False)
    with torch.no_grad():
        frozen = model_output(model, data[2], "mlm")
    ranges, names = make_trainable(qm)
    assert {k for k, _ in names.values()} == {"act", "weight"} and len(ranges) == len(names)
    student = Student(model, ranges, "mlm")
    out = student(data[2])  # under autograd: the learned quantizers' trainable path
    torch.testing.assert_close(out.detach(), frozen, rtol=1e-4, atol=1e-4)
    out.float().pow(2).mean().backward()
    with_grad = [k for k, r in ranges.items() if any(p.grad is not None and bool((p.grad != 0).any())
                                                     for p in r.parameters())]
    assert len(with_grad) >= 0.8 * len(ranges)  # a few sites (e.g. all-positive ones at the grid) may get zero
    w = model.bert.encoder.layer[0].attention.self.query.weight
    assert w.grad is not None and bool((w.grad != 0).any())  # straight-through to the float weight
    qm.remove()


def _tiny_cfg(root, out, **kw):
    base = dict(model=str(root / "model"), out=str(out), data=str(root / "text.txt"), batch_size=4, seq_len=32,
                train_batches=3, calib_batches=2, eval_batches=2, steps=6, save_every=2, progress=False,
                real_int8=False, measure=False, lr=1e-3, range_lr=1e-2)
    base.update(kw)
    return FinetuneConfig(**base)


def test_killed_run_resumes_bit_identical(tiny_bert, tmp_path, monkeypatch):
    full = finetune(_tiny_cfg(tiny_bert, tmp_path / "full")).model_dir
    original = FinetuneRunDir.save_checkpoint

    def killed_after_step_4(self, accelerator, step):
        path = original(self, accelerator, step)
        if step == 4:
            raise KeyboardInterrupt  # the process dies right after its step-4 checkpoint
        return path

    monkeypatch.setattr(FinetuneRunDir, "save_checkpoint", killed_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        finetune(_tiny_cfg(tiny_bert, tmp_path / "cut"))
    monkeypatch.setattr(FinetuneRunDir, "save_checkpoint", original)
    assert not (tmp_path / "cut" / "DONE").exists()
    resumed = finetune(_tiny_cfg(tiny_bert, tmp_path / "cut", resume=True)).model_dir
    a, b = load_file(str(full / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and any("outlierfree_gate" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = load_file(str(full / "quant_ranges.safetensors")), load_file(str(resumed / "quant_ranges.safetensors"))
    assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)
    start = load_file(str(full / "model.safetensors"))
    orig = load_file(str(tiny_bert / "model" / "model.safetensors"))
    assert any(not torch.equal(start[k], orig[k]) for k in orig)  # it did train
    log = [json.loads(x) for x in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e["event"] == "train"] == [e["step"] for e in map(
        json.loads, (tmp_path / "full" / "log.jsonl").read_text().splitlines()) if e["event"] == "train"]
    # asking again for the finished run returns at once; other settings in that directory are refused
    again = finetune(_tiny_cfg(tiny_bert, tmp_path / "full"))
    assert again.already_finished and again.model_dir == full
    with pytest.raises(Exception, match="other settings"):
        finetune(_tiny_cfg(tiny_bert, tmp_path / "full", steps=7))


def test_learned_ranges_survive_save_load_and_reach_the_onnx_export(tiny_bert, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx
    from onnx import numpy_helper

    from outlierfree.export.onnx import export_onnx
    from outlierfree.quant.run import load_for_quant

    out = finetune(_tiny_cfg(tiny_bert, tmp_path / "r", method="qat", steps=4, range_lr=5e-2)).model_dir
    saved = load_ranges(out)
    assert saved is not None and saved.act and saved.weight and saved.act_matches(paper_w8a8().activation)

    def exported_scales(model_dir, sub):
        q = load_for_quant(model_dir, calib_batches=2, eval_batches=1, batch_size=4, seq_len=32,
                           data=str(tiny_bert / "text.txt"))
        with quantize(q.model, paper_w8a8(), q.task) as qm:
            qm.calibrate(q.batches.calib, lambda m, b: model_output(m, b, q.task), progress=False)
            acts = {n: (qq.lo, qq.hi) for n, qq in qm.act.items()}
            (tmp_path / sub).mkdir()
            export_onnx(qm, q.batches.calib[0], tmp_path / sub, q.task, with_float=False)
            used = set(qm.learned_used)
        g = onnx.load(str(tmp_path / sub / "model_int8.onnx")).graph
        consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        for n in g.node:
            if n.op_type == "Constant":
                consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        scales = {round(float(consts[n.input[1]]), 9) for n in g.node
                  if n.op_type == "QuantizeLinear" and n.input[1] in consts}
        return acts, used, scales

    acts, used, scales = exported_scales(out, "learned")
    assert used >= set(saved.act) and len(used) == len(saved.act) + len(saved.weight)
    for name, (lo, hi) in saved.act.items():  # the simulator quantizes every saved site on its saved range
        assert torch.equal(acts[name][0], lo) and torch.equal(acts[name][1], hi)
    learned_scales = {round(float(qparams(lo, hi, 8, False)[0]), 9) for lo, hi in saved.act.values()}
    assert learned_scales <= scales  # every learned activation range is a QDQ scale of the exported graph
    # the same weights without the learned ranges are calibrated again and export other scales
    (out / "quant_ranges.safetensors").rename(tmp_path / "x.safetensors")
    (out / "quant_ranges.json").rename(tmp_path / "x.json")
    _, used2, scales2 = exported_scales(out, "calibrated")
    assert not used2 and not learned_scales <= scales2


def test_layer_tokens_ordinary_leaves_exactly_the_framing_tokens_out_of_the_layer_loss(tiny_bert):
    """--layer-tokens ordinary: a student whose hidden states differ from the teacher's only at the framing tokens
    ([CLS] / [SEP]: its last LayerNorm's output moved there) has layer loss 0 with the flag and a positive one
    without it; the framing ids are the tokenizer's own ([CLS] and [SEP] for BERT)."""
    import torch.nn as nn

    from outlierfree.finetune.loop import _framing_ids
    from outlierfree.models.io import load_tokenizer

    tok = load_tokenizer(tiny_bert / "model")
    cfg = FinetuneConfig(model="m", out="o", method="qat", layer_weight=1.0, layer_tokens="ordinary")
    framing = _framing_ids(cfg, tok, None)
    assert sorted(framing.tolist()) == sorted({tok.cls_token_id, tok.sep_token_id})
    teacher = build_model("bert", "tiny", "vanilla", seed=0).eval()
    model = copy.deepcopy(teacher)
    batch = _batches(1, vocab=min(100, model.config.vocab_size))[0]
    cls, sep = tok.cls_token_id, tok.sep_token_id
    batch["input_ids"][:, 0] = cls
    batch["input_ids"][0, -1] = batch["input_ids"][2, 7] = sep  # a [SEP] inside a packed sequence counts too
    batch["input_ids"][1, 10] = sep
    last = [m for m in model.modules() if isinstance(m, nn.LayerNorm)][-1]
    at_frame = torch.isin(batch["input_ids"], framing).unsqueeze(-1)  # (B, T, 1)
    last.register_forward_hook(lambda mod, args, out: out + 3.0 * at_frame)
    student = Student(model, nn.ModuleDict(), "mlm")
    losses = {}
    for where in ("ordinary", "all"):
        c = FinetuneConfig(model="m", out="o", method="qat", layer_weight=1.0, layer_tokens=where)
        step = StepLoss(c, "mlm", student, model, teacher, None, framing if where == "ordinary" else None)
        losses[where] = float(step(batch)[1]["layers"].detach())
    assert losses["ordinary"] < 1e-7 < 1e-3 < losses["all"]


@pytest.mark.parametrize("penalty_on", ["quantized", "float"])
def test_penalty_on_float_reaches_the_weights_of_an_outlier_the_learned_ranges_clip(penalty_on):
    """Under QAT the penalty of the quantized forward reads residual sums whose outlier a learned range has already
    clipped, so no gradient reaches the weight making it; --penalty-on float reads the float forward, where the
    outlier is, and pushes that weight down."""
    model = build_model("bert", "tiny", "vanilla", seed=0).eval()
    teacher = copy.deepcopy(model).requires_grad_(False)
    data = _batches(3)
    qm = quantize(model, paper_w8a8(), "mlm")
    qm.calibrate(data[:2], lambda m, b: model_output(m, b, "mlm"), progress=False)
    ranges, _ = make_trainable(qm)
    dense = model.bert.encoder.layer[0].output.dense
    with torch.no_grad():
        dense.bias[5] += 200.0  # an outlier channel far outside every calibrated range
    cfg = FinetuneConfig(model="m", out="o", method="qat", penalty="infnorm", penalty_weight=1.0,
                         penalty_on=penalty_on, float_weight=1.0)
    step = StepLoss(cfg, "mlm", Student(model, ranges, "mlm"), model, teacher, qm)
    _, parts = step(data[2])
    parts["penalty"].backward()  # the penalty's own gradient (the float distillation also reaches the bias)
    grad = float(dense.bias.grad[5])
    if penalty_on == "float":
        assert float(parts["penalty"].detach()) > 20 and grad > 1e-3  # the float residual sums carry it; the bias is pushed
    else:
        assert float(parts["penalty"].detach()) < 20 and grad == 0.0  # clipped at the FFN output's range: no gradient
    assert not step.tap.tensors  # captured tensors are dropped after each step
    qm.remove()


def _cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err.strip()
    return e.value.code, err


@pytest.mark.parametrize("extra,words", [
    (["--steps", "0"], "--steps 0"),
    (["--method", "magic"], "unknown --method"),
    (["--outlier-penalty", "kurtosis"], "needs a weight"),
    (["--layer-tokens", "ordinary"], "applies to the layer loss"),
    (["--layer-weight", "1", "--layer-tokens", "first"], "unknown --layer-tokens"),
    (["--penalty-on", "float"], "applies to the outlier penalty"),
    (["--outlier-penalty", "infnorm", "--penalty-weight", "1", "--penalty-on", "both"], "unknown --penalty-on"),
    (["--outlier-penalty", "infnorm", "--penalty-weight", "1", "--penalty-on", "float"], "needs --float-weight"),
    (["--task-weight", "-1"], "--task-weight -1.0 is negative"),
])
def test_bad_flags_are_one_line_and_write_nothing(tiny_bert, tmp_path, capsys, extra, words):
    code, err = _cli(small_flags(tiny_bert, tmp_path / "o", *extra), capsys)
    assert code == 2 and words in err and len(err.splitlines()) == 1 and err.startswith("error:")
    assert not (tmp_path / "o").exists()


def test_data_too_short_unpatchable_and_foreign_out_are_one_line(tiny_bert, tmp_path, capsys):
    args = small_flags(tiny_bert, tmp_path / "o")
    args[args.index("--data") + 1] = str(tiny_bert / "short.txt")
    code, err = _cli(args, capsys)
    assert code == 2 and "not enough text" in err and "--data" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()

    from outlierfree.models.io import load_tokenizer, save_model

    # DeBERTa-v2 computes its disentangled attention itself, not through transformers' attention interface: no
    # retrofit; the error names --method qat, which needs no patch
    deberta = tmp_path / "deberta"
    import transformers as tf
    m = tf.DebertaV2ForMaskedLM(tf.DebertaV2Config(num_hidden_layers=1, num_attention_heads=2, hidden_size=32,
                                                   intermediate_size=64, vocab_size=400, max_position_embeddings=64))
    save_model(m, deberta, load_tokenizer(tiny_bert / "model"))
    args = small_flags(tiny_bert, tmp_path / "o2")
    args[1] = str(deberta)
    code, err = _cli(args, capsys)
    assert code == 2 and "cannot patch" in err and "--method qat" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o2").exists()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, err = _cli(small_flags(tiny_bert, foreign), capsys)
    assert code == 2 and "other files" in err and sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_clipped_retrofit_does_not_warn_of_dead_rows(tiny_bert, tmp_path, capsys):
    """A clipped retrofit whose final gamma would zero near-uniform rows (alpha 4: gamma = -4 / T) starts from the
    original softmax (gamma ramps up from 0), so the from-scratch warning "zeroes every near-uniform row ... at
    initialisation" does not apply and is not printed; the same alpha in a from-scratch model still warns."""
    from outlierfree.models.build import DeadAttentionWarning

    main(small_flags(tiny_bert, tmp_path / "o", "--steps", "1", "--method", "retrofit", "--attention", "clipped",
                     "--alpha", "4", "--no-measure"))
    err = capsys.readouterr().err
    assert (tmp_path / "o" / "model").is_dir() and "near-uniform" not in err
    with pytest.warns(DeadAttentionWarning, match="near-uniform"):
        build_model("bert", "tiny", {"variant": "clipped", "alpha": 4.0, "alpha_t": "row"}, seed=0)


def test_cli_end_to_end_card_and_quantize_reads_the_cured_model(tiny_bert, tmp_path, capsys):
    out = tmp_path / "cli"
    main(small_flags(tiny_bert, out, "--steps", "3", "--method", "retrofit+qat", "--no-real-int8"))
    model_dir = out / "model"
    card = (model_dir / "README.md").read_text()
    assert "retrofit+qat" in card and "original" in card and "fine-tuned" in card
    res = json.loads((model_dir / "finetune_result.json").read_text())
    assert res["after"]["learned_ranges_used"] > 0 and res["before"]["learned_ranges_used"] == 0
    assert res["after"]["simulated"]["perplexity"] > 0 and res["after"]["int8"] is None
    main(["quantize", str(model_dir), "--data", str(tiny_bert / "text.txt"), "--calib-batches", "2",
          "--eval-batches", "2", "--batch-size", "4", "--seq-len", "32", "--diag-batches", "0", "--quiet",
          "--out", str(tmp_path / "q")])
    q = json.loads((tmp_path / "q" / "quant.json").read_text())["runs"][0]
    assert q["quantized"]["perplexity"] > 0 and q["learned_ranges"] == res["after"]["learned_ranges_used"]
    # another run's directory is refused
    code, err = _cli(small_flags(tiny_bert, out, "--steps", "4"), capsys)
    assert code == 2 and "other settings" in err


def test_per_channel_weight_ranges_are_learned_simulated_and_run_in_real_int8(tiny_bert, tmp_path):
    pytest.importorskip("onnxruntime")
    result = finetune(_tiny_cfg(tiny_bert, tmp_path / "pc", method="qat", steps=2, weight_granularity="per_channel",
                                measure=True, real_int8=True))
    out = result.model_dir
    saved = load_ranges(out)
    per_channel = [lo for lo, _ in saved.weight.values() if lo.dim() == 1 and lo.numel() > 1]
    assert per_channel and saved.weight_spec.granularity == "per_channel"
    res = json.loads((out / "finetune_result.json").read_text())["after"]
    assert res == result.after  # the result is what the run wrote
    assert res["learned_ranges_used"] == len(saved.act) + len(saved.weight)
    # the export writes per-channel weights (export/onnx.py): ONNX Runtime runs the learned per-channel grid, and
    # its perplexity is the simulator's within the export's parity tolerance (tests/export: 1 %)
    assert "int8_note" not in res and res["int8"]["perplexity"] > 0
    assert res["int8"]["perplexity"] == pytest.approx(res["simulated"]["perplexity"], rel=0.01)


def test_grid_flags_learn_the_grids_the_export_uses_and_the_card_says_how(tiny_bert, tmp_path):
    """--symmetric-attention and --int8-head in a fine-tune: QAT learns the queries', keys' and values' ranges on
    symmetric grids (lo = -hi) and the masked LM head's weight ranges (the paper set leaves the head float
    otherwise); the real INT8 measurement runs that config in ONNX Runtime and agrees with the simulator; the card
    gives the quantize / export flags of the same grids."""
    pytest.importorskip("onnxruntime")
    from outlierfree.quant.run import load_for_quant

    result = finetune(_tiny_cfg(tiny_bert, tmp_path / "g", method="qat", steps=2, symmetric_attention=True,
                                int8_head=True, measure=True, real_int8=True))
    out = result.model_dir
    saved = load_ranges(out)
    q = load_for_quant(out, calib_batches=2, eval_batches=1, batch_size=4, seq_len=32, data=str(tiny_bert / "text.txt"))
    cfg = paper_w8a8().replace(symmetric_attention=True, int8_head=True)
    with quantize(q.model, cfg, q.task) as qm:
        qm.calibrate(q.batches.calib, lambda m, b: model_output(m, b, q.task), progress=False)
        sym = {n for n, qq in qm.act.items() if qq.spec.symmetric}
        used = set(qm.learned_used)
    assert sym and sym <= set(saved.act) and sym <= used
    for name in sym:  # learned on the symmetric grid: the range stays symmetric through training
        lo, hi = saved.act[name]
        assert torch.equal(lo, -hi), (name, lo, hi)
    asym = [n for n in saved.act if n not in sym and saved.act[n][0] < 0]
    assert asym and any(not torch.equal(saved.act[n][0], -saved.act[n][1]) for n in asym)
    assert any(name.startswith("cls.") for name in saved.weight), sorted(saved.weight)  # the head was trained too
    res = json.loads((out / "finetune_result.json").read_text())
    assert res["quant"]["symmetric_attention"] and res["quant"]["int8_head"]
    assert res["after"]["int8"]["perplexity"] == pytest.approx(res["after"]["simulated"]["perplexity"], rel=0.01)
    card = (out / "README.md").read_text()
    assert "outlierfree export DIR --out INT8_DIR --int8-head --symmetric-attention" in card


def _finetune_headless(tiny_bert, tmp_path, out, capsys, *flags):
    """``outlierfree finetune`` on the tiny BERT's encoder without its head (a BertModel saved beside its
    tokenizer) with ``flags``: (exit code, stderr)."""
    import shutil

    from transformers import BertConfig, BertModel

    enc = tmp_path / "enc"
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(tiny_bert / "model")).save_pretrained(enc)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (tiny_bert / "model" / f).exists():
            shutil.copy(tiny_bert / "model" / f, enc / f)
    capsys.readouterr()  # save_pretrained's progress bar
    return _cli(["finetune", str(enc), "--out", str(out), "--data", str(tiny_bert / "text.txt"), "--batch-size",
                 "4", "--seq-len", "32", "--train-batches", "3", "--calib-batches", "2", "--eval-batches", "2",
                 "--no-progress", *flags], capsys)


def test_distill_positions_masked_distils_exactly_the_scored_positions(tiny_bert, tmp_path, monkeypatch, capsys):
    """--distill-positions masked: the output loss (and the float forward's) of a masked LM sees the positions its
    perplexity scores (labels != -100) and no others; on a model that is not a masked LM it is a one-line error
    that writes nothing."""
    import outlierfree.finetune.loop as loop

    seen, real = [], loop.distill_loss

    def spy(student, teacher, task, mask=None):
        seen.append(mask.clone())
        return real(student, teacher, task, mask)

    monkeypatch.setattr(loop, "distill_loss", spy)
    batches = []
    real_order = loop.batch_order
    monkeypatch.setattr(loop, "batch_order", lambda step, n, seed: batches.append(real_order(step, n, seed))
                        or batches[-1])
    cfg = _tiny_cfg(tiny_bert, tmp_path / "m", method="qat", steps=2, distill_positions="masked", float_weight=1.0)
    finetune(cfg)
    from outlierfree.quant.run import load_for_quant

    q = load_for_quant(cfg.model, calib_batches=cfg.train_batches, eval_batches=cfg.eval_batches,
                       batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed, data=cfg.data)
    assert len(seen) == 4  # two steps, quantized and float forward each
    for i, mask in enumerate(seen):
        labels = q.batches.calib[batches[i // 2]]["labels"]
        scored = (labels != -100).long()
        assert 0 < int(scored.sum()) < int(q.batches.calib[batches[i // 2]]["attention_mask"].sum())
        assert torch.equal(mask, scored)
    # an encoder has no masked positions: one line, exit 2, no directory
    out = tmp_path / "enc-run"
    code, err = _finetune_headless(tiny_bert, tmp_path, out, capsys, "--distill-positions", "masked")
    assert code == 2 and "--distill-positions masked needs a masked language model" in err and err.count("\n") == 0
    assert not out.exists()


def test_task_weight_adds_the_models_own_loss_of_the_student_output(tiny_bert):
    """--task-weight w adds w x the masked-LM loss of the student's (quantized) output on the batch's own labels:
    the step's loss grows by exactly that, and the part equals the model's own masked-LM loss of that output."""
    from outlierfree.train.losses import masked_lm_loss_sum

    model = build_model("bert", "tiny", "vanilla", seed=0).eval()
    teacher = copy.deepcopy(model).requires_grad_(False)
    data = _batches(3)
    for b in data:  # a masked LM's batch: some positions masked and labelled
        b["labels"] = torch.full_like(b["input_ids"], -100)
        b["labels"][:, 2::5] = b["input_ids"][:, 2::5]
    qm = quantize(model, paper_w8a8(), "mlm")
    qm.calibrate(data[:2], lambda m, b: model_output(m, b, "mlm"), progress=False)
    ranges, _ = make_trainable(qm)
    totals = {}
    for w in (0.0, 0.5):
        cfg = FinetuneConfig(model="m", out="o", method="qat", task_weight=w)
        loss, parts = StepLoss(cfg, "mlm", Student(model, ranges, "mlm"), model, teacher, qm)(data[2])
        totals[w] = (float(loss.detach()), float(parts["task"].detach()))
    with torch.no_grad():
        nll, n = masked_lm_loss_sum(model_output(model, data[2], "mlm"), data[2]["labels"])
    own = float(nll / n)
    assert totals[0.0][1] == 0.0 and own > 1.0
    assert abs(totals[0.5][1] - own) < 1e-5
    assert abs(totals[0.5][0] - totals[0.0][0] - 0.5 * own) < 1e-5
    qm.remove()


def test_task_weight_on_an_encoder_is_one_line(tiny_bert, tmp_path, capsys):
    """A base encoder has no task head, so no loss of its own: one line, exit 2, nothing written."""
    out = tmp_path / "enc-run"
    code, err = _finetune_headless(tiny_bert, tmp_path, out, capsys, "--task-weight", "1")
    assert code == 2 and "has no task head" in err and err.count("\n") == 0
    assert not out.exists()


def test_seed_varies_training_batches_not_the_held_out_measurement(tiny_bert, tmp_path):
    """--seed changes the fine-tuning batches (their masks) but never the held-out batches the card measures, so
    runs of different seeds are compared on the same sequences and masks; those stay after the fine-tuning text."""
    from outlierfree.finetune.loop import _load

    q0 = _load(_tiny_cfg(tiny_bert, tmp_path / "a", seed=0))
    q1 = _load(_tiny_cfg(tiny_bert, tmp_path / "b", seed=1))
    assert len(q0.batches.eval) == len(q1.batches.eval) == 2
    for a, b in zip(q0.batches.eval, q1.batches.eval):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a["labels"], b["labels"]) for a, b in zip(q0.batches.calib, q1.batches.calib))
    train_rows = {tuple(r.tolist()) for b in q1.batches.calib for r in b["input_ids"]}
    assert not any(tuple(r.tolist()) in train_rows for b in q1.batches.eval for r in b["input_ids"])


def test_retrofit_qat_end_to_end_on_a_llama_decoder(tiny_bert, tmp_path, capsys):
    """A family the project does not train (Llama: RoPE, RMSNorm, grouped-query attention), with heads wider than
    their slice of the layer input (4 heads x 16 > d_model 32, as Gemma-3-270m's 4 x 256 > 640), is retrofitted
    (the gates read the whole layer input, with a notice), trained, saved, measured in real INT8 and loaded back
    with its gates."""
    import transformers as tf

    from outlierfree import OutlierfreeError
    from outlierfree.models.io import load_model, load_tokenizer, save_model

    torch.manual_seed(0)
    m = tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           hidden_size=32, head_dim=16, intermediate_size=64, vocab_size=400,
                                           max_position_embeddings=64))
    with pytest.raises(OutlierfreeError, match="gate_type='linear'"):  # the paper's per-head slices do not exist
        patch_model(copy.deepcopy(m), {"variant": "gated"}, strict=False)
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    patched = copy.deepcopy(m)
    cfg = FinetuneConfig(model="m", out="o", method="retrofit")
    patch_model(patched, retrofit_for(patched, cfg), strict=False)
    with torch.no_grad():  # the linear gates start closed-form at 1 too: the original's outputs at step 0
        torch.testing.assert_close(patched(ids).logits, m(ids).logits, rtol=1e-5, atol=1e-5)
    save_model(m, tmp_path / "llama", load_tokenizer(tiny_bert / "model"))
    args = small_flags(tiny_bert, tmp_path / "o", "--steps", "3", "--method", "retrofit+qat", "--gate-lr", "0.05",
                       "--outlier-penalty", "infnorm", "--penalty-weight", "1e-3", "--layer-weight", "1")
    args[1] = str(tmp_path / "llama")
    main(args)
    assert "gate_type linear" in capsys.readouterr().err
    # the penalty and the layer loss read RMSNorm's inputs and outputs (they read nothing before: LayerNorm only)
    steps = [json.loads(l) for l in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    steps = [e for e in steps if e["event"] == "train"]
    assert steps and all(e["penalty"] > 0 and e["layers"] > 0 for e in steps)
    res = json.loads((tmp_path / "o" / "model" / "finetune_result.json").read_text())
    assert "gated(linear" in (tmp_path / "o" / "model" / "README.md").read_text()
    after = res["after"]
    assert after["int8"] is not None and after["learned_ranges_used"] > 0
    assert after["int8"]["perplexity"] == pytest.approx(after["simulated"]["perplexity"], rel=0.02)
    cured = load_model(tmp_path / "o" / "model")
    gates = {n: p for n, p in cured.named_parameters() if "outlierfree_gate" in n}
    assert len(gates) == 2 * 2 and any(p.abs().sum() > 0 for p in gates.values())  # 2 layers: weight + bias each
    assert cured.config.outlierfree["variant"] == "gated" and cured.config.outlierfree["gate_type"] == "linear"
