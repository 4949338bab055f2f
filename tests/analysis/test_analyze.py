"""analyze_model on tiny models with planted outliers: a planted dimension is found, a planted no-op head is flagged,
statistics stream (batch by batch equals all at once), padding is never measured, and training is left as it was."""

import math

import pytest
import torch

from outlierfree.analysis import analyze_model, headline_metrics
from outlierfree.analysis.inputs import EvalBatch, text_batch
from outlierfree import hf_compat
from outlierfree.models.build import build_model

SEP, CLS = 3, 2


class StubTokenizer:
    """What the analysis reads from a tokenizer: special ids and id -> token."""

    all_special_ids = [0, 1, CLS, SEP, 4]

    def convert_ids_to_tokens(self, i):
        return {0: "[PAD]", 1: "[UNK]", CLS: "[CLS]", SEP: "[SEP]", 4: "[MASK]", 5: "."}.get(i, f"w{i}")


def _ids(B=4, T=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 500, (B, T), generator=g)  # (B, T)
    ids[:, 0] = CLS
    ids[:, 7::8] = SEP  # a [SEP] every 8 tokens
    return ids


def _bert(vocab=500):
    return build_model("bert", "tiny", "vanilla", seed=0, vocab_size=vocab, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)


def _site(rep, name):
    return next(s for s in rep["sites"] if s["name"] == name)


def _capture(model, module_path, batch):
    """float64 copy of a LayerNorm's input in a plain forward (the reference the streaming stats must match)."""
    got = {}
    mod = dict(model.named_modules())[module_path]

    def hook(m, args):
        got["x"] = args[0].detach().double()  # returns None: the forward is not changed

    h = mod.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(**batch)
    h.remove()
    return got["x"]


def test_planted_dimension_is_found_with_float64_numbers():
    model = _bert()
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.bias[17] = 50.0  # every token's FFN output gets +50 in dim 17
    ids = _ids()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rep = analyze_model(model, [text_batch(ids, torch.ones_like(ids, dtype=torch.bool), StubTokenizer())])
    name = "bert.encoder.layer.0.output.LayerNorm:input"
    site = _site(rep, name)
    assert site["top_dims"][0][0] == 17
    assert 17 in site["outlier_dims_abs"] and 17 in site["outlier_dims_rel"]
    assert rep["headline"]["max_inf_norm_site"] == name
    # the numbers against a float64 computation on the captured tensor
    x = _capture(model, "bert.encoder.layer.0.output.LayerNorm", batch)  # (B, T, d)
    inf = x.abs().flatten(1).amax(1)
    assert site["inf_norm_mean"] == pytest.approx(float(inf.mean()), rel=1e-5)
    assert site["inf_norm_max"] == pytest.approx(float(inf.max()), rel=1e-5)
    c = x.flatten(1) - x.flatten(1).mean(1, keepdim=True)
    kurt = (c ** 4).mean(1) / (c ** 2).mean(1) ** 2
    assert site["kurtosis_mean"] == pytest.approx(float(kurt.mean()), rel=1e-4)
    assert site["dim_max"][17] == pytest.approx(float(x[..., 17].abs().max()), rel=1e-5)
    # a vanilla tiny model has no outlier dimension elsewhere
    clean = analyze_model(_bert(), [batch], tokenizer=StubTokenizer())
    assert 17 not in _site(clean, name)["outlier_dims_abs"]


def test_planted_noop_head_is_flagged():
    model = _bert()
    d = model.config.hidden_size
    emb = model.bert.embeddings
    attn = model.bert.encoder.layer[0].attention.self
    with torch.no_grad():
        # dimension 0 of the embeddings marks [SEP] (after the embedding LayerNorm, it stands out for [SEP] only)
        for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
            table.weight[:, 0] = 0.0
        emb.word_embeddings.weight[SEP, 0] = 5.0
        # head 1 of layer 0: constant query, key reads dimension 0 -> every query attends to the [SEP] keys
        hs = slice(d // 2, d)
        attn.query.weight[hs] = 0.0
        attn.query.bias[hs] = 1.0
        attn.key.weight[hs] = 0.0
        attn.key.weight[hs, 0] = 10.0
        attn.key.bias[hs] = 0.0
    ids = _ids()
    rep = analyze_model(model, [text_batch(ids, torch.ones_like(ids, dtype=torch.bool), StubTokenizer())])
    heads = {(h["site"], h["head"]): h for h in rep["heads"]}
    planted = heads[("bert.encoder.layer.0.attention.self:probs", 1)]
    other = heads[("bert.encoder.layer.0.attention.self:probs", 0)]
    assert planted["delimiter"] > 0.95 and planted["noop_head"]
    assert not other["noop_head"] and other["delimiter"] < 0.5
    share = 5 / 32  # [CLS] + 4 [SEP] of 32 tokens
    assert planted["noop_share"] == pytest.approx(share)
    strongest = rep["noop"]["strongest"]
    assert (strongest["site"], strongest["head"]) == ("bert.encoder.layer.0.attention.self:probs", 1)
    ex = rep["noop"]["example"]
    assert ex["tokens"][7] == "[SEP]" and len(ex["probs"]) == 32
    maps = rep["noop"]["maps"]  # every head's map, for side-by-side comparisons of the same head
    assert len(maps["bert.encoder.layer.0.attention.self:probs"]) == 2
    assert maps["bert.encoder.layer.0.attention.self:probs"][1] == ex["probs"]
    assert maps["bert.encoder.layer.0.attention.self:probs"][0] != ex["probs"]
    # attention implementation restored after the probes
    assert hf_compat.attention_implementation(model) == "outlierfree"


def test_streaming_equals_one_batch_and_padding_is_ignored():
    model = _bert()
    ids = _ids(B=4, T=24, seed=5)
    full = torch.ones_like(ids, dtype=torch.bool)
    tok = StubTokenizer()
    one = analyze_model(model, [text_batch(ids, full, tok)])
    two = analyze_model(model, [text_batch(ids[:2], full[:2], tok), text_batch(ids[2:], full[2:], tok)])
    for a, b in zip(one["sites"], two["sites"]):
        assert a["name"] == b["name"]
        assert a["dim_max"] == pytest.approx(b["dim_max"], rel=1e-5, abs=1e-6)
        assert a["inf_norm_mean"] == pytest.approx(b["inf_norm_mean"], rel=1e-5)
        assert a["kurtosis_mean"] == pytest.approx(b["kurtosis_mean"], rel=1e-4)
        assert sum(a["log10_hist"]["counts"]) + a["log10_hist"]["zeros"] == a["values"]
        assert a["values"] == b["values"]
    # padding: sequence 1 cut to 10 real tokens, padded with junk; its numbers must equal the unpadded run
    padded = ids[:2].clone()
    mask = full[:2].clone()
    padded[1, 10:] = 499
    mask[1, 10:] = False
    rep_pad = analyze_model(model, [text_batch(padded, mask, tok)])
    rep_cut = analyze_model(model, [text_batch(ids[1:2, :10], full[1:2, :10], tok)])
    name = "bert.encoder.layer.1.output.LayerNorm:input"
    s_pad, s_cut = _site(rep_pad, name), _site(rep_cut, name)
    assert s_pad["values"] == (24 + 10) * model.config.hidden_size
    # the padded run's maximum over its two sequences is at least the cut sequence's value, and its second
    # sequence's figures equal the cut run's: recompute from the streaming per-sequence numbers
    rep_first = analyze_model(model, [text_batch(ids[:1], full[:1], tok)])
    mean_pad = s_pad["inf_norm_mean"]
    expected = (_site(rep_first, name)["inf_norm_mean"] + s_cut["inf_norm_mean"]) / 2
    assert mean_pad == pytest.approx(expected, rel=1e-4)


def test_opt_flattened_ffn_and_gated_variant():
    model = build_model("opt", "tiny", "gated", seed=0, vocab_size=300)
    ids = torch.randint(4, 300, (2, 16))
    rep = analyze_model(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    fc2 = _site(rep, "model.decoder.layers.0.fc2:output")
    assert fc2["kind"] == "ffn_output" and fc2["dim"] == 64 and fc2["sequences"] == 2
    assert rep["headline"]["max_inf_norm"] > 0 and len(rep["heads"]) == 4
    from outlierfree.analysis.analyze import Headline

    h = Headline.of(rep)  # the typed record reproduce and doctor read
    assert (h.max_inf_norm, h.max_inf_norm_site, h.avg_kurtosis, h.noop_heads) == (
        rep["headline"]["max_inf_norm"], rep["headline"]["max_inf_norm_site"], rep["headline"]["avg_kurtosis"],
        rep["noop"]["flagged"])
    assert Headline.of({}).max_inf_norm is None and Headline.of({}).to_dict()["noop_heads"] is None


def test_headline_metrics_contract():
    model = build_model("vit", "tiny", "clipped", seed=0)
    model.train()
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    batch = {"pixel_values": torch.randn(4, 1, 28, 28), "labels": torch.zeros(4, dtype=torch.long)}
    h = headline_metrics(model, batch)
    for key in ("max_inf_norm", "max_inf_norm_site", "avg_kurtosis", "max_kurtosis"):
        assert h[key] is not None
    assert h["max_inf_norm_site"].endswith(":input") and "layernorm" in h["max_inf_norm_site"]
    assert math.isfinite(h["max_inf_norm"]) and h["max_kurtosis"] >= h["avg_kurtosis"]
    assert model.training
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before
    # equal to the full analysis's headline on the same batch
    rep = analyze_model(model, [batch])
    assert rep["headline"]["max_inf_norm"] == pytest.approx(h["max_inf_norm"], rel=1e-6)


def test_no_batches_is_a_user_error():
    from outlierfree.errors import OutlierfreeError

    with pytest.raises(OutlierfreeError, match="no evaluation batches"):
        analyze_model(_bert(), [])
    with pytest.raises(OutlierfreeError, match="no sites"):
        analyze_model(_bert(), [EvalBatch({"input_ids": _ids()}, torch.ones(4, 32, dtype=torch.bool), [])],
                      kinds=("gate",))


def test_top_activations_keep_one_row_per_site_and_token():
    from outlierfree.analysis.stats import TopActivations

    top = TopActivations(k=2)
    for seq, (value, token) in enumerate([(5.0, "<bos>"), (9.0, "<bos>"), (7.0, "."), (1.0, "the")]):
        top.add(value, {"site": "a:input", "sequence": seq, "position": 0, "token": token})
    rows = top.rows()
    assert [(r["value"], r["token"], r["sequence"]) for r in rows] == [(9.0, "<bos>", 1), (7.0, ".", 2)]


def test_noop_plot_shows_the_reference_head_in_every_model(tmp_path):
    from outlierfree.analysis.report import noop_panels, plot_noop_head

    def rep(strongest, mass, maps=None, heads=()):
        nz = {"strongest": {"site": strongest[0], "head": strongest[1], "noop": mass},
              "example": {"tokens": ["a", "b"], "probs": [[1.0, 0.0], [1.0, 0.0]]}}
        if maps is not None:
            nz["maps"] = maps
        return {"noop": nz, "heads": [{"site": s, "head": h, "noop": m} for s, h, m in heads]}

    same = [[0.5, 0.5], [0.5, 0.5]]
    vanilla = rep(("L2", 1), 0.48)
    gated = rep(("L0", 0), 0.62, maps={"L0": [same], "L2": [same, [[0.0, 1.0], [0.0, 1.0]]]},
                heads=[("L0", 0, 0.62), ("L2", 1, 0.07)])
    other_arch = rep(("X", 0), 0.3)  # no maps (or no such site): its own strongest head
    p = noop_panels([vanilla, gated, other_arch], ["vanilla", "gated", "other"])
    assert [(q["site"], q["head"]) for q in p] == [("L2", 1), ("L2", 1), ("X", 0)]
    assert p[1]["probs"] == [[0.0, 1.0], [0.0, 1.0]] and p[1]["noop"] == 0.07 and "same head" in p[1]["how"]
    assert p[2]["how"] == "strongest no-op head" and p[2]["noop"] == 0.3
    assert plot_noop_head([vanilla, gated], ["vanilla", "gated"], tmp_path / "n.png")
    assert (tmp_path / "n.png").stat().st_size > 0
