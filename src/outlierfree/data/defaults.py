"""Data defaults shared by training and every command that feeds a model data (analyze, quantize, export, doctor,
reproduce). One place, so a default cannot drift between the command that trains a model and the commands that
measure it: a model trained with the defaults is evaluated on exactly the documents its training held out.
"""

from __future__ import annotations

VAL_FRACTION_TEXT = 0.02  # training's --val-fraction for text: the documents whose text hash falls below it
VAL_FRACTION_IMAGES = 0.1  # training's --val-fraction for an image folder without train/ and val/ subfolders
MLM_PROBABILITY = 0.15  # BERT's masked fraction
SEQ_LEN = 128  # tokens per text sequence when neither a flag nor the training record gives one
TEXT_COLUMN = "text"  # the text column of a (saved or Hugging Face) dataset
HF_SPLIT = "train"  # the split of a Hugging Face dataset that is read
SEED = 0
BATCH_SIZE = 8
ANALYZE_BATCHES = 8  # analyze --batches on a validation split
QUANT_CALIB_BATCHES = 16  # quantize --calib-batches (the paper's setting)
QUANT_EVAL_BATCHES = 4  # quantize --eval-batches on a validation split (keeps a 12-layer model under 2 minutes)
# the MLM mask of batch i is drawn from a generator seeded with seed * MASK_SEED_STRIDE + 2 i (+1 for
# evaluation batches): float and quantized passes, and every command, see the same masked positions
MASK_SEED_STRIDE = 1_000_003
FIRST_DOCUMENT_CHUNK = 64  # a split's documents are tokenised 64, 128, 256... at a time until there are enough


def val_fraction(images: bool) -> float:
    """Training's default validation fraction for images or text."""
    return VAL_FRACTION_IMAGES if images else VAL_FRACTION_TEXT


def mask_seed(seed: int, index: int, evaluation: bool) -> int:
    """The seed of the MLM mask generator of calibration (or evaluation) batch ``index``."""
    return seed * MASK_SEED_STRIDE + index * 2 + int(evaluation)
