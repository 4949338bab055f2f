"""Released checkpoints (package data): one directory per checkpoint, each a model directory that
``outlierfree.load_model`` reads, with its card (``README.md``), training log, spec and numbers.

Made by ``outlierfree release RUN_DIR --out src/outlierfree/released/NAME`` from a finished ``reproduce`` run; listed
by :func:`outlierfree.reproduce.release.available`; measured by the main job (``reproduce --preset quick``).
"""
