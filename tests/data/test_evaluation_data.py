"""The shared evaluation-data layer (outlierfree.data.evaluation): the sequences a model trained here is measured
on are those of the builders it replaced (tests/data/fixtures/golden.json, captured from the old
analysis/inputs.py and quant/data.py), a whole text for a model not trained on it is chunked and never split
or dropped, and analyze and quantize see the same pixels."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import models as M  # noqa: E402

from outlierfree.data.evaluation import chunk_text, model_batches, special_frame  # noqa: E402
from outlierfree.errors import OutlierfreeError  # noqa: E402
from outlierfree.models.io import load_model, load_tokenizer  # noqa: E402

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
    from outlierfree.quant.data import make_batches

    model, tok = load_model(zoo["bert"]), load_tokenizer(zoo["bert"])
    b = make_batches(model, zoo["bert"], tok, 2, 2, 4, None, seed, None)
    gold = GOLDEN[f"quant_text_{seed}"]
    for got, want in ((b.calib, gold["calib"]), (b.eval, gold["eval"])):
        assert [{k: v.tolist() for k, v in x.items()} for x in got] == want  # ids, masked ids, labels, mask
    assert {k: v for k, v in b.info.items() if k != "data"} == gold["info"]
    # --data naming the training data (another spelling of the same path) is still the model's own split
    again = make_batches(model, zoo["bert"], tok, 2, 2, 4, None, seed, str(zoo["corpus"].parent / "." /
                                                                             zoo["corpus"].name))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(again.eval, b.eval))


def test_quantize_pixels_of_a_vit_trained_here_are_unchanged(zoo):
    from outlierfree.quant.data import make_batches

    b = make_batches(load_model(zoo["vit"]), zoo["vit"], None, 2, 1, 2, None, 0, None)
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
