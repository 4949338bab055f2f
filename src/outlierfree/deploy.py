"""Run a directory written by ``outlierfree export``: texts (or pixel arrays) in, the model's outputs out.

    from outlierfree.deploy import load
    model = load("runs/minilm-int8")                 # ONNX Runtime or OpenVINO, whichever the export chose
    hidden = model(["A sentence.", "Another one."])  # (2, T, H) float32 numpy array (encoders: last hidden state)
    emb = model.embed(["A sentence."])               # encoders: mean-pooled, L2-normalised sentence embeddings

Needs only numpy, tokenizers and the runtime (onnxruntime or openvino): no torch, no transformers. The directory
holds the INT8 model (``model.onnx``, and ``openvino_model.xml`` / ``.bin`` when exported for OpenVINO), the
tokenizer (``tokenizer.json``), ``config.json``, ``ranges.json`` (the calibrated quantization grids), a card
(``README.md``) and ``export.json``, whose ``deploy`` entry says what the graph takes and returns.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import OutlierfreeError, require

RUNTIMES = ("onnxruntime", "openvino")


class Deployed:
    """A loaded export: call it on texts (text models) or a float32 array ``(B, C, H, W)`` (image models).

    Attributes: ``runtime`` (``onnxruntime`` or ``openvino``), ``task`` (``mlm``, ``clm``, ``encoder``, ``image``,
    ...), ``inputs`` (the graph's input names), ``max_length`` (texts are truncated to it)."""

    def __init__(self, path: Path, meta: dict[str, Any], runtime: str, threads: int):
        self.path = path
        self.task = meta["task"]
        self.inputs: list[str] = list(meta["inputs"])
        self.max_length = int(meta.get("max_length") or 512)
        self.runtime = runtime
        self.tokenizer = _tokenizer(path) if "input_ids" in self.inputs else None
        if runtime == "onnxruntime":
            from .export.ort import session

            sess = session(path / meta["files"]["onnxruntime"], threads=threads)
            self._run = lambda feed: sess.run(None, feed)[0]
        else:
            from .export.openvino import compile_model

            compiled = compile_model(path / meta["files"]["openvino"], threads=threads)
            self._run = lambda feed: np.array(compiled(feed)[0])

    def encode(self, texts: str | Sequence[str]) -> dict[str, np.ndarray]:
        """The graph's inputs for ``texts``: token ids and attention mask (int64, ``(B, T)``), padded to the longest
        text and truncated to ``max_length``."""
        require(self.tokenizer is not None, f"{self.path} is an image model", "pass a float32 array (B, C, H, W)")
        texts = [texts] if isinstance(texts, str) else list(texts)
        require(len(texts) > 0 and all(isinstance(t, str) for t in texts), "expected a text or a list of texts",
                "pass e.g. ['A sentence.']")
        enc = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)  # (B, T)
        feed = {"input_ids": ids, "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.array([e.type_ids for e in enc], dtype=np.int64)
        return {k: v for k, v in feed.items() if k in self.inputs}

    def __call__(self, x: str | Sequence[str] | np.ndarray) -> np.ndarray:
        """The model's output: the last hidden state ``(B, T, H)`` of an encoder, logits ``(B, T, V)`` of a
        language model, ``(B, classes)`` of an image classifier."""
        if self.tokenizer is None:
            pixels = np.asarray(x, dtype=np.float32)
            require(pixels.ndim == 4, f"expected pixel values (B, C, H, W), got shape {pixels.shape}",
                    "pass a float32 array of preprocessed images")
            return self._run({self.inputs[0]: pixels})
        return self._run(self.encode(x))

    def embed(self, texts: str | Sequence[str]) -> np.ndarray:
        """Sentence embeddings ``(B, H)``: the last hidden state mean-pooled over real tokens, L2-normalised (as
        sentence-transformers does for all-MiniLM-L6-v2)."""
        require(self.task == "encoder", f"embed() is for encoders; this model's task is {self.task}",
                "call the model itself for its outputs")
        feed = self.encode(texts)
        h = self._run(feed)  # (B, T, H)
        m = feed["attention_mask"][..., None].astype(np.float32)  # (B, T, 1)
        e = (h * m).sum(1) / np.maximum(m.sum(1), 1.0)
        return e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


def available_runtimes() -> list[str]:
    """The runtimes installed here, in order of preference."""
    return [r for r in RUNTIMES if importlib.util.find_spec(r) is not None]


def load(path: str | Path, runtime: str | None = None, threads: int = 0) -> Deployed:
    """Load an ``outlierfree export`` directory; ``runtime``: ``onnxruntime`` or ``openvino`` (default: the one the
    export was made for, else whichever is installed and has a model file); ``threads`` 0 = the runtime's choice."""
    path = Path(path)
    meta_path = path / "export.json"
    require(meta_path.is_file(), f"{path} has no export.json", "pass a directory written by `outlierfree export`")
    meta = json.loads(meta_path.read_text()).get("deploy")
    require(meta is not None, f"{meta_path} has no deploy entry (an export from before deployable directories)",
            "export the model again with `outlierfree export`")
    have = [r for r in available_runtimes() if r in meta["files"]]
    if runtime is None:
        require(bool(have), f"none of the runtimes {path} was exported for ({', '.join(meta['files'])}) is installed",
                "pip install onnxruntime (or openvino)")
        runtime = meta["runtime"] if meta["runtime"] in have else have[0]
    require(runtime in RUNTIMES, f"unknown runtime {runtime!r}", "use onnxruntime or openvino")
    require(runtime in meta["files"], f"{path} has no {runtime} model",
            f"load it with runtime={next(iter(meta['files']))!r}, or export with --runtime {runtime}")
    require(runtime in available_runtimes(), f"{runtime} is not installed", f"pip install {runtime}")
    return Deployed(path, meta, runtime, threads)


def _tokenizer(path: Path) -> Any:
    """The exported ``tokenizer.json`` with padding to the longest text and truncation to the export's length."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise OutlierfreeError("tokenizers is not installed", "pip install tokenizers") from None
    f = path / "tokenizer.json"
    require(f.is_file(), f"{path} has no tokenizer.json", "export the model again (it writes the tokenizer)")
    tok = Tokenizer.from_file(str(f))
    meta = json.loads((path / "export.json").read_text())["deploy"]
    pad = meta.get("pad_token_id")  # none: id 0 (masked out, so its value does not matter)
    tok.enable_padding(pad_id=int(pad or 0), pad_token=meta.get("pad_token") or "[PAD]",
                       direction=meta.get("padding_side", "right"))
    tok.enable_truncation(max_length=int(meta.get("max_length") or 512))
    return tok
