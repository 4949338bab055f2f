"""Training data: the offline Wikipedia corpus, local text, Hugging Face datasets, Fashion-MNIST, image folders.

    from outlierfree.data import prepare_text, load_images
    text = prepare_text("mlm", seq_len=128)          # TextData: train/val (N, T) tensors + tokenizer
    images = load_images(None, image_size=28)        # ImageData: Fashion-MNIST uint8 tensors + normalisation
"""

from .images import ImageData, augment, load_fashion_mnist, load_image_folder, load_images, normalise, read_idx
from .text import (TextData, load_documents, mask_tokens, pack_clm, pack_mlm, prepare_text, split_documents,
                   split_sentences, train_tokenizer)

__all__ = ["TextData", "ImageData", "prepare_text", "load_documents", "split_documents", "split_sentences",
           "train_tokenizer", "pack_mlm", "pack_clm", "mask_tokens", "load_images", "load_fashion_mnist",
           "load_image_folder", "read_idx", "normalise", "augment"]
