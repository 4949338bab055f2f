"""A training run's directory, ``OUT/``, and its protocol: what makes a run resumable and a finished run final.

    OUT/log.jsonl       one JSON event per line (start, train, eval, outliers, checkpoint, resume, done)
    OUT/checkpoint/     the last complete checkpoint: weights (safetensors), optimizer, scheduler, every process's
                        RNG states (accelerate's save_state), and trainer_state.json (step, config, log position)
    OUT/tokenizer/      the run's own tokenizer (a resumed run reads it rather than train a new one)
    OUT/model/          the final model, with train_config.json and train_result.json
    OUT/DONE            written last: the run finished; asking for the same run again returns at once

Checkpoints are written into ``OUT/.checkpoint.tmp`` and renamed, the old one removed only after the new one is in
place (a kill between the two renames leaves ``OUT/.checkpoint.old``, which :meth:`RunDir.checkpoint` also
accepts). On resume the log is cut back to where the checkpoint was written, so a killed and resumed run's log
reads as an uninterrupted one's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import OutlierfreeError, require
from ..records import LOG_FILE, append_log, check_dir_path, make_dir, write_json
from .config import TrainConfig, config_difference

CHECKPOINT = "checkpoint"
STATE_FILE = "trainer_state.json"
DONE_FILE = "DONE"
MODEL_DIR = "model"
TOKENIZER_DIR = "tokenizer"


class RunDir:
    """``OUT/`` of one run. Only the main process writes (``main``); every process may read."""

    def __init__(self, out: str | os.PathLike, identity: dict[str, Any], main: bool = True, console: Any = None):
        self.out, self.identity, self.main, self.console = Path(out).expanduser(), identity, main, console
        check_dir_path(self.out)  # a file in the way (from --out or a config file): one line before the data work
        self.log_path = self.out / LOG_FILE
        self.model_dir = self.out / MODEL_DIR

    # ---- before training ------------------------------------------------------------------------------------
    def finished(self) -> bool:
        """True when ``OUT/DONE`` says this same run finished; a finished run with other settings is an error."""
        if not (self.out / DONE_FILE).is_file():
            return False
        prev = _saved_identity(self.model_dir)
        diff = config_difference(prev, self.identity) if prev is not None else ["(no train_config.json)"]
        require(not diff, f"{str(self.out)!r} holds a finished run with other settings ({'; '.join(diff[:3])})",
                "pass another --out, or delete the directory to train again")
        return True

    def checkpoint(self) -> Path | None:
        """The last complete checkpoint (also the one left by a kill between two renames), or None."""
        for name in (CHECKPOINT, f".{CHECKPOINT}.old"):
            p = self.out / name
            if (p / STATE_FILE).is_file():
                return p
        return None

    def resume_state(self, resume: bool) -> tuple[Path, dict[str, Any]] | None:
        """(checkpoint, its trainer state) to resume from, or None for a fresh run. A checkpoint without
        ``resume``, or made with other settings, is a one-line error."""
        ckpt = self.checkpoint()
        if ckpt is None:
            return None
        require(resume, f"{str(self.out)!r} already holds a checkpoint of an unfinished run",
                "pass --resume to continue it, or another --out")
        state = read_state(ckpt)
        diff = config_difference(state.get("config", {}), self.identity)
        require(not diff, f"the checkpoint in {str(self.out)!r} was made with other settings ({'; '.join(diff[:3])}"
                f"{'; ...' if len(diff) > 3 else ''})", "resume with the same settings (see "
                f"{ckpt / STATE_FILE}), or pass another --out")
        return ckpt, state

    def own_tokenizer(self) -> Path | None:
        """The run's saved tokenizer (trained again, a tokenizer could differ: see data.text), if any."""
        p = self.out / TOKENIZER_DIR
        return p if p.is_dir() else None

    def begin(self, state: dict[str, Any] | None, tokenizer: Any) -> None:
        """Make the directory (only now: bad data or settings must not leave one behind). Resuming: cut the log
        back to the checkpoint. Fresh: an empty log, no stale model or checkpoint, the tokenizer saved."""
        if not self.main:
            return
        make_dir(self.out)
        if state is not None:  # drop what a killed run logged after its last checkpoint
            with open(self.log_path, "a+b") as f:
                f.truncate(int(state.get("log_bytes", 0)))
            return
        self.log_path.write_text("")
        for stale in (self.out / f".{CHECKPOINT}.tmp", self.model_dir, self.out / TOKENIZER_DIR):
            shutil.rmtree(stale, ignore_errors=True)
        if tokenizer is not None:
            from ..records import atomic_dir

            with atomic_dir(self.out / TOKENIZER_DIR) as tmp:
                tokenizer.save_pretrained(str(tmp))

    # ---- during training ------------------------------------------------------------------------------------
    def log(self, event: dict[str, Any], show: str | None = None) -> None:
        """Append one event to ``log.jsonl`` (the package's one log writer) and optionally print ``show``."""
        if not self.main:
            return
        append_log(self.log_path, event)
        if show and self.console is not None:
            self.console.print(show)

    def restore(self, accelerator: Any, resumed: tuple[Path, dict[str, Any]] | None) -> int:
        """Load a checkpoint found by :meth:`resume_state` into ``accelerator`` (weights, optimizer, scheduler, RNG)
        and log the resume; the step to continue from, 0 for a fresh run."""
        if not resumed:
            return 0
        accelerator.load_state(str(resumed[0]))
        start = int(resumed[1]["step"])
        self.log({"event": "resume", "step": start}, f"resumed from {resumed[0]} at step {start}")
        return start

    def save_checkpoint(self, accelerator: Any, step: int) -> Path:
        """Write weights, optimizer, scheduler and RNG states of every process, plus step and log position, into
        ``OUT/.checkpoint.tmp``; then rename it to ``OUT/checkpoint``. Every process must call this."""
        tmp, final, old = self.out / f".{CHECKPOINT}.tmp", self.out / CHECKPOINT, self.out / f".{CHECKPOINT}.old"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        with _quiet("accelerate"):  # it warns that tied weights are stored once, which is what we want
            accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if self.main:
            self.log({"event": "checkpoint", "step": step})
            log_bytes = self.log_path.stat().st_size if self.log_path.exists() else 0
            state = {"step": step, "config": self.identity, "log_bytes": log_bytes,
                     "world_size": accelerator.num_processes, "time": time.time()}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    # ---- after training -------------------------------------------------------------------------------------
    def finish(self, model: Any, tokenizer: Any, extra_json: dict[str, Any], summary: dict[str, Any],
               event: dict[str, Any]) -> Path:
        """Save the final model (with ``extra_json`` files beside it), log ``event`` (the "done" event), then
        write ``DONE`` (holding ``summary``). Main process only."""
        from transformers.utils import logging as hf_logging

        from ..models.io import save_model

        hf_logging.disable_progress_bar()  # one shard: a bar would only add noise to the log
        save_model(model, self.model_dir, tokenizer, extra_json=extra_json)
        self.log(event, f"[green]done: model saved to {self.model_dir}[/green]")
        write_json(self.out / DONE_FILE, summary)  # atomic: DONE is there whole or not at all
        return self.model_dir


def read_state(ckpt: Path) -> dict[str, Any]:
    """The trainer state saved in a checkpoint."""
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise OutlierfreeError(f"the checkpoint {str(ckpt)!r} is unreadable ({e})",
                               "delete it to start over, or pass another --out") from e


def _saved_identity(model_dir: Path) -> dict[str, Any] | None:
    """The identity of the finished run's train_config.json (read by the package's one reader of training
    records), or None when it is missing or unreadable."""
    from ..data.training_record import read_training_record

    try:
        record = read_training_record(model_dir)
    except OutlierfreeError:  # a malformed image_normalisation.json: the settings cannot be compared
        return None
    if record is None or not record.trained_here:
        return None
    try:
        return TrainConfig.from_dict(dict(record.config)).identity()
    except OutlierfreeError:
        return None


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Raise logger ``name`` to ERROR inside the block."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
