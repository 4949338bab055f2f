"""The shared evaluation-data layer (outlierfree.data.evaluation): the sequences a model trained here is measured
on are those of the builders it replaced (tests/data/fixtures/golden.json, captured from the old
analysis/inputs.py and the quantization commands), a whole text for a model not trained on it is chunked and never split
or dropped, and analyze and quantize see the same pixels."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import evalzoo as M

from outlierfree.data.evaluation import chunk_text, model_batches, special_frame
from outlierfree.errors import OutlierfreeError
from outlierfree.models.io import load_model, load_tokenizer

GOLDEN = json.loads((M.FIXTURES / "golden.json").read_text())


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    corpus = M.write_corpus(root / "corpus.txt")
    return {"root": root, "corpus": corpus, "bert": M.trained_bert(root, corpus),
            "external": M.external_bert(root), "vit": M.trained_vit(root, M.image_folder(root))}


def _tensors(rows):
    return [{k: torch.tensor(v) for k, v in b.items()} for b in rows]


# ---- a model trained here: the same sequences as before ---------------------------------------------------
@pytest.mark.parametrize("seed, packing", [(0, "auto"), (1, "auto"), (0, "documents")])
def test_analyze_split_of_a_model_trained_here_is_unchanged(zoo, seed, packing):
    from outlierfree.analysis.inputs import text_batches

    model, tok = load_model(zoo["bert"]), load_tokenizer(zoo["bert"])
    evals, desc = text_batches(model, tok, None, 2, 4, 32, seed, packing, model_path=zoo["bert"])
    gold = GOLDEN[f"analyze_text_{seed}_{packing}"]
    assert [b.inputs["input_ids"].tolist() for b in evals] == gold["ids"]
    assert [b.mask.tolist() for b in evals] == gold["mask"]
    assert (desc["sequences"], desc["tokens"]) == (gold["sequences"], gold["tokens"])
    assert "validation split" in desc["source"] and "fraction 0.1" in desc["source"]


@pytest.mark.parametrize("seed", [0, 3])
def test_quantize_split_of_a_model_trained_here_is_unchanged(zoo, seed):
    from outlierfree.data.evaluation import model_batches

    model, tok = load_model(zoo["bert"]), load_tokenizer(zoo["bert"])
    b = model_batches(model, zoo["bert"], tok, 2, 2, 4, None, seed, None)
    gold = GOLDEN[f"quant_text_{seed}"]
    for got, want in ((b.calib, gold["calib"]), (b.eval, gold["eval"])):
        assert [{k: v.tolist() for k, v in x.items()} for x in got] == want  # ids, masked ids, labels, mask
    assert {k: v for k, v in b.info.items() if k != "data"} == gold["info"]
    # --data naming the training data (another spelling of the same path) is still the model's own split
    again = model_batches(model, zoo["bert"], tok, 2, 2, 4, None, seed, str(zoo["corpus"].parent / "." /
                                                                             zoo["corpus"].name))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(again.eval, b.eval))


def test_quantize_pixels_of_a_vit_trained_here_are_unchanged(zoo):
    from outlierfree.data.evaluation import model_batches

    b = model_batches(load_model(zoo["vit"]), zoo["vit"], None, 2, 1, 2, None, 0, None)
    gold = GOLDEN["quant_vit"]
    assert [M.digest(x["pixel_values"]) for x in b.calib] == gold["calib"]
    assert [M.digest(x["pixel_values"]) for x in b.eval] == gold["eval"]
    assert [x["labels"].tolist() for x in b.calib + b.eval] == gold["labels"]


def test_packing_ignores_truncation_left_on_by_an_earlier_call():
    # analysis's one-document-per-sequence path calls tokenizer(..., truncation=True, max_length=T), which leaves
    # truncation on in the Rust tokenizer; packing with the same tokenizer object afterwards must not be cut
    from outlierfree.data.text import pack_mlm

    tok = M.tokenizer()
    docs = [" ".join(M.WORDS * 3) + "."]
    before = pack_mlm(docs, tok, 16)
    tok(docs[0], truncation=True, max_length=8)
    assert (pack_mlm(docs, tok, 16) == before).all() and len(before) > 2


# ---- a whole text for a model not trained on it -------------------------------------------------------------
def _bodies(seqs, tok):
    """The text tokens of chunked sequences: each without the tokenizer's special tokens around it."""
    prefix, suffix = special_frame(tok)
    return [t for s in seqs for t in s[len(prefix):len(s) - len(suffix)]]


def _stream(docs, tok):
    """The documents' tokens joined by [SEP]: what chunking must reproduce, token for token."""
    out = []
    for i, d in enumerate(docs):
        out += ([tok.sep_token_id] if i else []) + tok(d, add_special_tokens=False)["input_ids"]
    return out


def test_whole_text_of_an_external_model_is_chunked_and_nothing_dropped(zoo):
    from outlierfree.analysis.inputs import text_batches

    model, tok = load_model(zoo["external"]), load_tokenizer(zoo["external"])
    evals, desc = text_batches(model, tok, str(zoo["corpus"]), None, 4, 32, model_path=zoo["external"])
    docs = M.paragraphs()
    stream = _stream(docs, tok)
    seqs = [row[m].tolist() for b in evals for row, m in zip(b.inputs["input_ids"], b.mask)]
    assert _bodies(seqs, tok) == stream  # every document, in order: no 2 % split, no truncation
    assert all(len(s) == 32 for s in seqs[:-1]) and 0 < len(seqs[-1]) <= 32
    assert all(s[0] == tok.cls_token_id and s[-1] == tok.sep_token_id for s in seqs)
    assert desc["sequences"] == len(seqs) == -(-len(stream) // 30) and "whole text" in desc["source"]


def test_one_line_file_and_one_long_paragraph(zoo, tmp_path, monkeypatch):
    from outlierfree.data import evaluation as E

    model, tok = load_model(zoo["external"]), load_tokenizer(zoo["external"])
    one = tmp_path / "one.txt"
    one.write_text("The cat sat on a mat.")  # a single short line, no newline
    b = model_batches(model, zoo["external"], tok, 0, None, 4, 32, data=str(one), purpose="analyze")
    assert len(b.eval) == 1 and b.eval[0]["input_ids"].tolist() == [tok("The cat sat on a mat.")["input_ids"]]
    # one paragraph of ~60k characters, tokenised in pieces (made small here so the cut is exercised many times)
    monkeypatch.setattr(E, "PIECE_CHARS", 1000)
    para = " ".join(M.paragraphs(300))
    long = tmp_path / "long.txt"
    long.write_text(para)
    b = model_batches(model, zoo["external"], tok, 0, None, 8, 64, data=str(long), purpose="analyze")
    seqs = [row[m.bool()].tolist() for x in b.eval for row, m in zip(x["input_ids"], x["attention_mask"])]
    assert _bodies(seqs, tok) == tok(para, add_special_tokens=False)["input_ids"]  # pieces cut before spaces
    assert len(seqs) > 100 and all(len(s) == 64 for s in seqs[:-1])


def test_max_sequences_bounds_the_text_and_stops_reading(zoo, tmp_path, monkeypatch):
    from outlierfree.data import evaluation as E

    model, tok = load_model(zoo["external"]), load_tokenizer(zoo["external"])
    calls = []
    real = E.chunk_text
    monkeypatch.setattr(E, "chunk_text", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    b = model_batches(model, zoo["external"], tok, 0, None, 4, 32, data=str(zoo["corpus"]), purpose="analyze",
                      max_sequences=10)
    assert sum(len(x["input_ids"]) for x in b.eval) == 10 and calls == [10]
    assert [len(x["input_ids"]) for x in b.eval] == [4, 4, 2] and "--max-sequences" in b.info["source"]
    # chunk_text itself stops tokenising once it has enough: a limit of 3 on a huge text is quick
    assert len(real(["word " * 2_000_000], tok, 32, 3)) == 3
    # for a model evaluated on its own validation split the flag has no meaning: one-line error
    with pytest.raises(OutlierfreeError, match="--max-sequences applies to a whole text"):
        model_batches(load_model(zoo["bert"]), zoo["bert"], load_tokenizer(zoo["bert"]), 1, 1, 4, 32,
                      max_sequences=10)


def test_calibration_and_evaluation_never_overlap(zoo):
    from outlierfree.data.evaluation import model_batches

    model, tok = load_model(zoo["external"]), load_tokenizer(zoo["external"])
    b = model_batches(model, zoo["external"], tok, 2, None, 4, 32, 0, str(zoo["corpus"]))
    assert b.info["whole_text"] and b.info["calib_split"] == "text sequences 1-8"

    def rows(batches):  # the original tokens (masked positions restored from the MLM labels)
        out = []
        for x in batches:
            ids = torch.where(x["labels"] != -100, x["labels"], x["input_ids"])
            out += [r[m.bool()].tolist() for r, m in zip(ids, x["attention_mask"])]
        return out

    calib, ev = rows(b.calib), rows(b.eval)
    seqs = chunk_text(M.paragraphs(), tok, 32)
    assert calib == seqs[:8] and ev == seqs[8:]  # the first sequences calibrate, all the others evaluate
    assert (b.eval[-1]["labels"][b.eval[-1]["attention_mask"] == 0] == -100).all()  # padding is never scored
    # asking for a number of evaluation batches takes them right after the calibration sequences
    two = model_batches(model, zoo["external"], tok, 2, 2, 4, 32, 0, str(zoo["corpus"]))
    assert rows(two.eval) == seqs[8:16]
    with pytest.raises(OutlierfreeError, match="too few for 2 calibration batches"):
        model_batches(model, zoo["external"], tok, 2, 2, 4, 32, 0, str(zoo["corpus"]), max_sequences=12)


@pytest.mark.parametrize("which, data", [("bert", None), ("external", "corpus")])
def test_mask_draws_score_the_same_sequences_under_the_masks_of_successive_seeds(zoo, which, data):
    """--mask-draws K: a masked LM's evaluation batches come K times, draw d exactly the batches one draw with
    eval_seed base + d gives (draw 0: the single draw's), the same sequences under other masks; calibration is
    untouched. Both paths: a model's own validation split and a whole text."""
    model, tok = load_model(zoo[which]), load_tokenizer(zoo[which])
    src = str(zoo["corpus"]) if data else None
    one = model_batches(model, zoo[which], tok, 2, 2, 4, 32, 3, src)
    three = model_batches(model, zoo[which], tok, 2, 2, 4, 32, 3, src, mask_draws=3)
    assert len(three.eval) == 3 * len(one.eval) and three.info["mask_draws"] == 3
    assert all(torch.equal(x[k], y[k]) for x, y in zip(three.calib, one.calib) for k in x)
    for d in range(3):
        want = model_batches(model, zoo[which], tok, 2, 2, 4, 32, 3, src, eval_seed=3 + d).eval
        got = three.eval[d * len(one.eval):(d + 1) * len(one.eval)]
        assert all(torch.equal(x[k], y[k]) for x, y in zip(got, want) for k in ("input_ids", "labels", "attention_mask"))
    firsts, seconds = three.eval[0], three.eval[len(one.eval)]
    assert not torch.equal(firsts["labels"], seconds["labels"])  # other positions ...
    unmask = lambda b: torch.where(b["labels"] != -100, b["labels"], b["input_ids"])  # noqa: E731
    assert torch.equal(unmask(firsts), unmask(seconds))  # ... of the same sequences
    with pytest.raises(OutlierfreeError, match="--mask-draws"):
        model_batches(model, zoo[which], tok, 2, 2, 4, 32, 3, src, mask_draws=0)


def test_a_text_the_model_never_trained_on_is_used_whole(zoo, tmp_path):
    # a model trained here, given another text: it never saw that text, so all of it is evaluation data
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(M.paragraphs(10, seed=5)))
    model, tok = load_model(zoo["bert"]), load_tokenizer(zoo["bert"])
    b = model_batches(model, zoo["bert"], tok, 0, None, 4, 32, data=str(other), purpose="analyze")
    seqs = [r[m.bool()].tolist() for x in b.eval for r, m in zip(x["input_ids"], x["attention_mask"])]
    assert _bodies(seqs, tok) == _stream(M.paragraphs(10, seed=5), tok)


# ---- images: the same pixels in every command ---------------------------------------------------------------
def test_analyze_and_quantize_see_the_same_pixels(zoo):
    from outlierfree.analysis.inputs import image_batches
    from outlierfree.data.images import load_images, normalise
    from outlierfree.data.evaluation import model_batches

    model = load_model(zoo["vit"])
    evals, desc = image_batches(model, None, 1, 4, 0, model_path=zoo["vit"])  # the record's data: the folder
    quant = model_batches(model, zoo["vit"], None, 1, 1, 4, None, 0, None)
    a = evals[0].inputs["pixel_values"]
    q = quant.eval[0]["pixel_values"]
    order = lambda x: x[x.flatten(1).sum(1).argsort()]  # analysis draws the 4 images in another order
    assert a.shape == q.shape == (4, 1, 28, 28) and torch.equal(order(a), order(q))
    raw = load_images(str(zoo["root"] / "images"), 28).val_x[:4]  # quantize evaluates the validation images in order
    assert torch.equal(normalise(raw, (0.5,), (0.25,)), q)  # with image_normalisation.json, not the folder's stats
    assert desc["normalisation"] == quant.info["normalisation"] == {"mean": [0.5], "std": [0.25]}
    # the background keys still come from the raw images (the golden ones of the old builder)
    assert [b.keys["background"].tolist() for b in evals] == GOLDEN["analyze_vit_background"]


# ---- the commands ----------------------------------------------------------------------------------------------
def _cli(args, capsys):
    from outlierfree.cli import main

    code = 0
    try:
        main(args)
    except SystemExit as e:  # click exits on errors (and may on success)
        code = e.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_analyze_and_quantize_read_a_whole_text_file(zoo, tmp_path, capsys):
    one = tmp_path / "one.txt"
    one.write_text("A single line of text, which ends without a newline.")
    code, out, err = _cli(["analyze", str(zoo["external"]), "--data", str(one), "--seq-len", "32", "--out",
                           str(tmp_path / "a")], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "a" / "report.json").read_text())["reports"][0]
    assert rep["sequences"] == 1 and "whole text" in rep["data"]["source"]
    code, out, err = _cli(["quantize", str(zoo["external"]), "--data", str(zoo["corpus"]), "--seq-len", "32",
                           "--batch-size", "4", "--calib-batches", "2", "--max-sequences", "20", "--diag-batches",
                           "0", "--quiet", "--out", str(tmp_path / "q")], capsys)
    assert code == 0, err
    q = json.loads((tmp_path / "q" / "quant.json").read_text())
    assert q["data"]["whole_text"] and q["data"]["sequences"] == 20
    assert q["runs"][0]["calib_batches"] == 2 and q["runs"][0]["eval_batches"] == 3  # 12 sequences: 4 + 4 + 4
    assert "later text batches" in out and "first sequences" in (tmp_path / "q" / "quant.md").read_text()


@pytest.mark.parametrize("command, flags, message", [
    ("analyze", ["--data", "{tmp}/empty.txt"], "no text in"),
    ("analyze", ["--data", "{tmp}/missing.txt"], "does not exist"),
    ("analyze", ["--data", "{tmp}/one.txt", "--seq-len", "128"],
     "--seq-len 128 exceeds the model's 64 positions; pass --seq-len <= 64"),
    ("analyze", ["--data", "{tmp}/one.txt", "--max-sequences", "0"], "--max-sequences must be at least 1"),
    ("quantize", ["--data", "{tmp}/empty.txt"], "no text in"),
    ("quantize", ["--data", "{tmp}/missing.txt"], "does not exist"),
    ("quantize", ["--data", "{tmp}/one.txt", "--seq-len", "128"], "exceeds the model's 64 positions"),
    ("quantize", ["--data", "{tmp}/one.txt"], "gives 1 sequences of 32 tokens, too few for 16 calibration"),
    ("quantize", ["--data", "{tmp}/one.txt", "--mask-draws", "0"], "--mask-draws must be at least 1"),
])
def test_bad_data_is_one_line_exit_2(zoo, tmp_path, capsys, command, flags, message):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    (tmp_path / "one.txt").write_text("One line.")
    flags = [f.format(tmp=tmp_path) for f in flags]
    seq = [] if "--seq-len" in flags else ["--seq-len", "32"]
    extra = ["--quiet"] if command == "quantize" else []
    code, _, err = _cli([command, str(zoo["external"]), *flags, *seq, *extra, "--out", str(tmp_path / "o")],
                          capsys)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "o").exists()


# ---- numbers of a model trained here stay what they were ------------------------------------------------------
def test_numbers_of_a_model_trained_here_are_those_of_the_old_batches(zoo, tmp_path, capsys):
    """analyze and quantize through their commands give exactly the numbers of the same model measured on the
    old builders' batches (golden.json): the data layer changed nothing for a model trained here."""
    from outlierfree.analysis.analyze import analyze_model
    from outlierfree.analysis.inputs import text_batch
    from outlierfree.analysis.run import AnalyzeRequest, analyze_checkpoint
    from outlierfree.quant.config import configs_from_flags
    from outlierfree.quant.evaluate import evaluate_quantized

    tok = load_tokenizer(zoo["bert"])
    rep = analyze_checkpoint(AnalyzeRequest(str(zoo["bert"]), batches=2, batch_size=4, seq_len=32, progress=False))
    gold = GOLDEN["analyze_text_0_auto"]
    old = [text_batch(torch.tensor(i), torch.tensor(m), tok) for i, m in zip(gold["ids"], gold["mask"])]
    ref = analyze_model(load_model(zoo["bert"]), old, progress=False)
    assert rep["headline"] == ref["headline"] and rep["sequences"] == 8

    code, _, err = _cli(["quantize", str(zoo["bert"]), "--calib-batches", "2", "--eval-batches", "2",
                           "--batch-size", "4", "--diag-batches", "0", "--quiet", "--out", str(tmp_path / "q")], capsys)
    assert code == 0, err
    got = json.loads((tmp_path / "q" / "quant.json").read_text())["runs"][0]
    cfg = configs_from_flags()[0]  # the command's defaults
    q = GOLDEN["quant_text_0"]
    want = evaluate_quantized(load_model(zoo["bert"]), tok, _tensors(q["calib"]), _tensors(q["eval"]), cfg, "mlm",
                              diagnostics=False, progress=False)
    for k in ("perplexity", "output_sqnr_db"):
        assert got["quantized"][k] == want["quantized"][k] and got["float"].get(k) == want["float"].get(k)
