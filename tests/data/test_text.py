"""Text data: sources, split, tokenizers and their cache, MLM packing and masking, CLM blocks, bad input."""

import json

import pytest
import torch

from outlierfree.data import text as T
from outlierfree.errors import OutlierfreeError

DOCS = [
    "The cat sat on the mat. It was happy, very happy! Then it slept.",
    "Paris is the capital of France. It has 2 million people.",
    "Bananas are yellow. Apples are red or green. Cherries are red.",
    "Water boils at 100 degrees. Ice melts at 0 degrees.",
] * 5 + [f"Document number {i} talks about topic {i}. It ends here." for i in range(40)]


@pytest.fixture(scope="module")
def wordpiece():
    return T.train_tokenizer(DOCS, "wordpiece", 400)


def test_split_is_deterministic_disjoint_and_order_free():
    docs = [f"doc {i} " + "x" * (i % 7) for i in range(2000)]
    tr, va = T.split_documents(docs, 0.1)
    tr2, va2 = T.split_documents(list(reversed(docs)), 0.1)
    assert set(va) == set(va2) and set(tr) == set(tr2)  # order does not matter
    assert not set(tr) & set(va) and len(tr) + len(va) == len(docs)
    assert 0.07 < len(va) / len(docs) < 0.13  # hash split: about the asked fraction
    assert T.split_documents(docs, 0.0)[1] == []


def test_sentences_are_split_at_sentence_ends_only():
    s = T.split_sentences("Mr. smith went home. He slept. 3.5 apples? Yes! \"Quoted.\" end")
    assert s == ["Mr. smith went home.", "He slept.", "3.5 apples?", "Yes!", "\"Quoted.\" end"]


def test_mlm_packing_keeps_sentence_boundaries(wordpiece):
    tok = wordpiece
    seqs = T.pack_mlm(DOCS, tok, 32)
    assert seqs.shape[1] == 32 and seqs.dtype.name == "int32"
    assert (seqs[:, 0] == tok.cls_token_id).all()
    # the stream without [CLS] equals the sentences, each followed by [SEP]
    expect = []
    for d in DOCS:
        for s in T.split_sentences(d):
            expect += tok(s, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    body = seqs[:, 1:].reshape(-1).tolist()
    assert body == expect[: len(body)]
    assert len(expect) - len(body) < 31  # only the last partial sequence is dropped
    # every sentence end "." is followed by [SEP]
    dot = tok.convert_tokens_to_ids(".")
    flat = seqs[:, 1:].reshape(-1)
    ends = [i for i in range(len(flat) - 1) if flat[i] == dot and flat[i + 1] == tok.sep_token_id]
    assert len(ends) >= 0.9 * sum(len(T.split_sentences(d)) for d in DOCS) * len(body) / len(expect) - 2


def test_clm_blocks_are_the_eos_separated_stream():
    tok = T.train_tokenizer(DOCS, "bpe", 400)
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (1, 2, 2)  # OPT's ids
    blocks = T.pack_clm(DOCS, tok, 16)
    stream = []
    for d in DOCS:
        stream += [2] + tok(d, add_special_tokens=False)["input_ids"]
    assert blocks.reshape(-1).tolist() == stream[: blocks.size]
    assert tok.decode(tok(DOCS[0], add_special_tokens=False)["input_ids"]) == DOCS[0]  # byte-level round trip


def test_masking_rates_specials_and_determinism():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (200, 128))
    ids[:, 0], ids[:, 50] = 2, 3  # [CLS], [SEP]
    inputs, labels = T.mask_tokens(ids, [0, 1, 2, 3, 4], 4, 1000, g, 0.15)
    sel = labels != -100
    assert sel.float().mean().item() == pytest.approx(0.15 * 126 / 128, abs=0.005)
    assert not sel[:, 0].any() and not sel[:, 50].any()  # specials never selected
    assert (labels[sel] == ids[sel]).all() and (inputs[~sel] == ids[~sel]).all()
    masked = (inputs[sel] == 4).float().mean().item()
    kept = (inputs[sel] == ids[sel]).float().mean().item()
    assert masked == pytest.approx(0.8, abs=0.01) and kept == pytest.approx(0.1 + 0.9 / 995 * 0.1, abs=0.01)
    assert not torch.isin(inputs[sel & (inputs != 4)], torch.tensor([0, 1, 2, 3])).any()  # random: non-special
    again = T.mask_tokens(ids, [0, 1, 2, 3, 4], 4, 1000, torch.Generator().manual_seed(0), 0.15)
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)


def test_local_sources_file_folder_glob(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("First para.\n\nSecond para.\n")
    (tmp_path / "a" / "two.txt").write_text("line one\nline two\n")
    (tmp_path / "a" / "skip.md").write_text("not text")
    assert T.load_documents(str(tmp_path / "a" / "one.txt")) == ["First para.", "Second para."]
    assert T.load_documents(str(tmp_path / "a")) == ["First para.", "Second para.", "line one", "line two"]
    assert T.load_documents(str(tmp_path / "a" / "t*.txt")) == ["line one", "line two"]


@pytest.mark.parametrize("case", ["missing", "empty_dir", "no_match", "latin1", "empty_file"])
def test_bad_sources_are_one_line_errors(tmp_path, case):
    arg = {"missing": str(tmp_path / "nope.txt"), "empty_dir": str(tmp_path), "no_match": str(tmp_path / "*.txt"),
           "latin1": str(tmp_path / "l.txt"), "empty_file": str(tmp_path / "e.txt")}[case]
    if case == "latin1":
        (tmp_path / "l.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    if case == "empty_file":
        (tmp_path / "e.txt").write_text("\n\n  \n")
    with pytest.raises(OutlierfreeError) as e:
        T.load_documents(arg)
    msg = str(e.value)
    assert "\n" not in msg and "; " in msg
    if case == "latin1":
        assert "not UTF-8" in msg and "0xe9" in msg


def test_datasets_saved_to_disk_and_load_dataset_json(tmp_path):
    import datasets

    rows = {"text": ["Alpha doc. Two.", "", "Beta doc."], "id": [1, 2, 3]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    assert T.load_documents(str(tmp_path / "ds")) == ["Alpha doc. Two.", "Beta doc."]
    with open(tmp_path / "d.jsonl", "w") as f:
        for t in ("One json doc.", "Another one."):
            f.write(json.dumps({"body": t}) + "\n")
    assert T.load_documents(f"hf:json:{tmp_path / 'd.jsonl'}", text_column="body") == ["One json doc.", "Another one."]
    with pytest.raises(OutlierfreeError, match="no column 'text'"):
        T.load_documents(f"hf:json:{tmp_path / 'd.jsonl'}")


def test_validation_text_is_never_trained_on(tmp_path):
    import re

    docs = [f"Common words appear in document {i}. The end of it." for i in range(300)]
    docs += [f"Zyxwvut {i} is a rare word." for i in range(300, 310)]
    train, val = T.split_documents(docs, 0.1)
    (tmp_path / "c.txt").write_text("\n\n".join(docs))
    data = T.prepare_text("mlm", str(tmp_path / "c.txt"), seq_len=16, vocab_size=300, val_fraction=0.1)
    assert (data.n_train_docs, data.n_val_docs) == (len(train), len(val))

    def numbers(rows):  # the document numbers in the decoded stream of a split ([CLS] dropped: a chunk boundary)
        text = data.tokenizer.decode(rows[:, 1:].reshape(-1).tolist(), skip_special_tokens=True)
        return {int(n) for n in re.findall(r"(?:document|zyxwvut|zy ##x\S*) (\d+)", text.replace(" ##", ""))}

    val_numbers = {int(re.findall(r"\d+", d)[0]) for d in val}
    train_seen = numbers(data.train)
    assert len(train_seen) > 200 and not train_seen & val_numbers
    assert numbers(data.val) <= val_numbers and numbers(data.val)
    # the tokenizer never saw the validation documents: their numbers are not in its vocabulary
    # (a number that starts a training number, like 28 in 280, may be a piece of it)
    train_numbers = [str(n) for n in range(310) if n not in val_numbers]
    only_val = {str(n) for n in val_numbers if not any(t.startswith(str(n)) for t in train_numbers)}
    assert only_val and not only_val & set(data.tokenizer.get_vocab())


def test_tokenizer_and_packed_data_are_cached(tmp_path, monkeypatch):
    (tmp_path / "c.txt").write_text("\n\n".join(DOCS))
    a = T.prepare_text("mlm", str(tmp_path / "c.txt"), seq_len=16, vocab_size=300)

    def boom(*args, **kw):
        raise AssertionError("retrained")

    monkeypatch.setattr(T, "train_tokenizer", boom)
    monkeypatch.setattr(T, "pack_mlm", boom)
    b = T.prepare_text("mlm", str(tmp_path / "c.txt"), seq_len=16, vocab_size=300)
    assert torch.equal(a.train, b.train) and a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    with pytest.raises(AssertionError, match="retrained"):  # another vocabulary size is another cache entry
        T.prepare_text("mlm", str(tmp_path / "c.txt"), seq_len=16, vocab_size=301)


def test_saved_tokenizer_loads_with_auto_tokenizer(tmp_path, wordpiece):
    from transformers import AutoTokenizer

    wordpiece.save_pretrained(str(tmp_path / "tok"))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"), local_files_only=True)
    s = "The cat sat on the mat."
    assert loaded(s)["input_ids"] == wordpiece(s)["input_ids"]
    assert loaded(s)["input_ids"][0] == loaded.cls_token_id and loaded(s)["input_ids"][-1] == loaded.sep_token_id
    tok, _ = T.get_tokenizer([], "wordpiece", 300, tokenizer=str(tmp_path / "tok"))
    assert tok.get_vocab() == wordpiece.get_vocab()
    with pytest.raises(OutlierfreeError, match="does not exist"):
        T.get_tokenizer([], "wordpiece", 300, tokenizer=str(tmp_path / "none"))
