"""Loading refuses to invent weights: a checkpoint without its task head falls back to the base model (with a
one-line notice), a checkpoint missing weights of the model itself is an error, and a complete one loads silently."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForMaskedLM, BertModel

import outlierfree as of
from outlierfree import OutlierfreeError
from outlierfree.cli import cli
from outlierfree.models.build import attention_config_of, build_model
from outlierfree.models.io import save_model

MLM_HEAD = "cls.predictions.transform.dense.weight"


def claim_mlm(d):
    """Make config.json name ``BertForMaskedLM``, as sentence-embedding checkpoints of encoders often do."""
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["BertForMaskedLM"]
    (d / "config.json").write_text(json.dumps(cfg, indent=2))


def edit_weights(d, fn):
    sd = load_file(str(d / "model.safetensors"))
    fn(sd)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny checkpoints with a tokenizer and a text file: complete, encoder-only (with and without a pooler),
    a gated encoder-only one, one with a missing encoder tensor and one with a wrong shape."""
    from outlierfree.data.text import train_tokenizer

    root = tmp_path_factory.mktemp("loading")
    words = "the cat sat on a mat while a dog ran in the park and birds sang in the tall green trees".split()
    g = torch.Generator().manual_seed(0)
    paras = [" ".join(words[j] for j in torch.randint(len(words), (30,), generator=g).tolist()).capitalize() + "."
             for _ in range(60)]
    (root / "text.txt").write_text("\n\n".join(paras))
    tok = train_tokenizer(paras, "wordpiece", 300)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=len(tok), max_position_embeddings=64)
    torch.manual_seed(0)
    save_model(BertModel(cfg), root / "encoder", tok)
    claim_mlm(root / "encoder")
    save_model(BertModel(cfg, add_pooling_layer=False), root / "encoder_nopool", tok)
    claim_mlm(root / "encoder_nopool")
    save_model(BertForMaskedLM(cfg), root / "complete", tok)
    gated = build_model("bert", "tiny", "gated", seed=0, vocab_size=len(tok)).bert.eval()
    save_model(gated, root / "gated_encoder", tok)  # the encoder of a gated model, without its MLM head
    claim_mlm(root / "gated_encoder")
    ids = torch.randint(5, len(tok), (2, 10), generator=g)
    torch.save({"ids": ids, "hidden": hidden(gated, ids), "gates": sum("outlierfree_gate" in n for n, _ in
                                                                      gated.named_parameters())}, root / "gated.pt")
    for name, fn in (("holed", lambda sd: sd.pop("encoder.layer.1.attention.self.query.weight")),
                     ("misshapen", lambda sd: sd.update({"encoder.layer.0.output.dense.weight": torch.zeros(32, 60)}))):
        shutil.copytree(root / "encoder", root / name)
        edit_weights(root / name, fn)
    return root


def hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def test_encoder_only_checkpoint_falls_back_to_the_base_model_with_a_notice(ckpts, capsys):
    model = of.load_model(ckpts / "encoder")
    err = capsys.readouterr().err
    assert type(model).__name__ == "BertModel" and not model.training
    assert err.count("\n") == 1 and err.startswith(f"notice: {ckpts / 'encoder'} has no weights for the masked-LM "
                                                   "head (")
    assert MLM_HEAD in err and "5 tensors" in err and "decoder" not in err  # the tied decoder is not "missing"
    assert err.rstrip().endswith("loaded the encoder as BertModel, so metrics compare hidden states")
    # every weight is the file's: the same hidden states as the encoder loaded directly
    ids = torch.randint(5, model.config.vocab_size, (2, 10))
    ref = BertModel.from_pretrained(ckpts / "encoder")
    torch.testing.assert_close(hidden(model, ids), hidden(ref.eval(), ids))
    torch.testing.assert_close(model.pooler.dense.weight, ref.pooler.dense.weight)


def test_fallback_without_pooler_gets_no_random_pooler(ckpts, capsys):
    model = of.load_model(ckpts / "encoder_nopool")
    assert type(model).__name__ == "BertModel" and model.pooler is None
    assert capsys.readouterr().err.count("notice:") == 1


def test_fallback_keeps_an_outlierfree_variant(ckpts, capsys):
    model = of.load_model(ckpts / "gated_encoder")
    assert "notice:" in capsys.readouterr().err
    assert type(model).__name__ == "BertModel" and attention_config_of(model).variant == "gated"
    ref = torch.load(ckpts / "gated.pt")
    assert ref["gates"] > 0 and sum("outlierfree_gate" in n for n, _ in model.named_parameters()) == ref["gates"]
    torch.testing.assert_close(hidden(model, ref["ids"]), ref["hidden"])  # gates loaded, not re-initialised


def test_missing_encoder_weight_is_an_error(ckpts):
    with pytest.raises(OutlierfreeError) as e:
        of.load_model(ckpts / "holed")
    msg = str(e.value)
    assert "lacks 1 tensor of the base model of BertForMaskedLM" in msg
    assert "bert.encoder.layer.1.attention.self.query.weight" in msg and "\n" not in msg
    with pytest.raises(OutlierfreeError, match="attention.self.query.weight"):
        of.load_model(ckpts / "holed", BertModel)  # the base class itself lacks it too


def test_mismatched_shape_is_an_error(ckpts):
    with pytest.raises(OutlierfreeError, match=r"1 tensor has another shape \(bert.encoder.layer.0.output.dense"
                                               r".weight: \(32, 60\) in the file, \(32, 64\) in the model\)"):
        of.load_model(ckpts / "misshapen")


def test_explicit_class_needing_invented_weights_is_an_error(ckpts, capsys):
    with pytest.raises(OutlierfreeError) as e:
        of.load_model(ckpts / "encoder", BertForMaskedLM)
    assert "no weights for the masked-LM head of BertForMaskedLM" in str(e.value)
    assert "pass model_class=BertModel or allow_fallback=True" in str(e.value)
    with pytest.raises(OutlierfreeError, match="masked-LM head"):
        of.load_model(ckpts / "encoder", allow_fallback=False)
    assert capsys.readouterr().err == ""
    model = of.load_model(ckpts / "encoder", BertForMaskedLM, allow_fallback=True)
    assert type(model).__name__ == "BertModel" and "notice:" in capsys.readouterr().err
    model = of.load_model(ckpts / "encoder", BertModel)  # asking for the base class: complete, no notice
    assert type(model).__name__ == "BertModel" and capsys.readouterr().err == ""


def test_complete_checkpoint_loads_as_before_without_notice(ckpts, capsys):
    model = of.load_model(ckpts / "complete")
    assert type(model).__name__ == "BertForMaskedLM"
    assert capsys.readouterr().err == ""
    ref = BertForMaskedLM.from_pretrained(ckpts / "complete").eval()
    ids = torch.randint(5, model.config.vocab_size, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_quantize_cli_on_encoder_only_checkpoint_reports_cosine(ckpts):
    out = ckpts / "quant"
    r = CliRunner().invoke(cli, ["quantize", str(ckpts / "encoder"), "--data", str(ckpts / "text.txt"), "--bits",
                                 "w8a8", "--calib-batches", "1", "--eval-batches", "1", "--diag-batches", "0",
                                 "--batch-size", "2", "--seq-len", "16", "--quiet", "--out", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    notices = [line for line in r.stderr.splitlines() if line.startswith("notice:")]
    assert len(notices) == 1 and "masked-LM head" in notices[0] and "as BertModel" in notices[0]
    assert "float cosine" in r.stdout and "perplexity" not in r.stdout
    rep = json.loads((out / "quant.json").read_text())
    assert rep["task"] == "encoder" and rep["model_class"] == "BertModel"
    q = rep["runs"][0]
    assert q["float"]["cosine"] == pytest.approx(1.0) and 0 < q["quantized"]["cosine"] <= 1.0 + 1e-6
    assert "perplexity" not in q["float"]


def _tiny_gguf(path, vocab=64, d=32, layers=2, heads=4, kv=2, ff=64):
    """A random Llama written as a GGUF file (float32 tensors) with the gguf package, as llama.cpp would."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    r = np.random.RandomState(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(d // heads)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([1] * vocab)

    def t(*shape):
        return (r.randn(*shape) * 0.05).astype(np.float32)

    hd = d // heads
    w.add_tensor("token_embd.weight", t(vocab, d))
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    w.add_tensor("output.weight", t(vocab, d))
    for i in range(layers):
        p = f"blk.{i}."
        for name, shape in (("attn_q", (d, d)), ("attn_k", (kv * hd, d)), ("attn_v", (kv * hd, d)),
                            ("attn_output", (d, d)), ("ffn_gate", (ff, d)), ("ffn_up", (ff, d)),
                            ("ffn_down", (d, ff))):
            w.add_tensor(p + name + ".weight", t(*shape))
        w.add_tensor(p + "attn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(d, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_model_loaded_from_gguf_saves_as_an_ordinary_checkpoint(tmp_path):
    """transformers marks a GGUF-loaded model "quantized with gguf" and refuses save_pretrained; its weights are
    dequantized floats, so load_model drops the marker: a fine-tuned GGUF model (``finetune gemma.gguf``) saves."""
    from outlierfree.models.io import load_model, save_model

    m = load_model(_tiny_gguf(tmp_path / "tiny.gguf"))
    assert getattr(m, "hf_quantizer", None) is None and not getattr(m.config, "quantization_config", None)
    save_model(m, tmp_path / "saved")
    again = load_model(tmp_path / "saved")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, again(ids).logits)
