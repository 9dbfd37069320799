"""Checkpoint files: atomic writes, the original's names, finding the latest one to resume from.

Names follow the original: ``<model_path>/<run_name>/model-{step}-{loss:.4f}-train.ckpt``. A checkpoint is written
to a temporary file in the same folder (``.<name>.<random>.tmp``), flushed to disk, renamed over its final name, and
then the folder itself is flushed, so that the rename survives a power loss too. A process killed mid-write never
leaves a truncated file under a real checkpoint name and never replaces a good one; the temporary file it leaves is
removed when the same run starts again (``remove_stale_temporaries``, called by the checkpoint callbacks).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from evlp.errors import EvlpError
from evlp.pretrained.towers import fit_problems, load_exact

log = logging.getLogger("evlp")

CHECKPOINT_RE = re.compile(r"^model-(\d+)-(-?[\d.]+|nan|inf)-(train|val)\.ckpt$")
TEMPORARY_GLOB = ".*.ckpt.*.tmp"  # what atomic_torch_save writes before the rename


def checkpoint_name(step: int, loss: float, kind: str = "train") -> str:
    return f"model-{step}-{loss:.4f}-{kind}.ckpt"


def atomic_torch_save(obj: Any, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk. A no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary checkpoint files an interrupted write left in ``folder`` (this run's checkpoint folder,
    nothing else); call it before the run writes its first checkpoint. Returns what was removed."""
    removed = []
    if Path(folder).is_dir():
        for tmp in sorted(Path(folder).glob(TEMPORARY_GLOB)):
            size = tmp.stat().st_size
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
            log.info("removed %s (%.1f MB), left by a checkpoint write that was interrupted", tmp, size / 1e6)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO with an atomic write; loading stays ``weights_only`` where possible."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Optional[Any] = None) -> None:
        atomic_torch_save(checkpoint, Path(path))

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict:
        return load_training_checkpoint(path, map_location=map_location or "cpu")


def load_training_checkpoint(path, map_location="cpu") -> dict:
    """Read an evlp training checkpoint without running code from it (``weights_only=True``)."""
    from evlp.pretrained.files import first_line, quiet_torch_load, sniff, unpickling_refused

    path = Path(path)
    if not path.is_file():
        raise EvlpError(f"checkpoint {path} does not exist")
    try:
        if sniff(path) == "safetensors":  # an empty file, an HTML page, a plain pickle ... are named by sniff
            raise EvlpError(f"{path} is a safetensors file, not a training checkpoint (.ckpt)")
    except EvlpError as e:
        raise EvlpError(f"cannot read checkpoint: {e}") from None
    try:
        with quiet_torch_load():
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # a foreign pickle: refused, never loaded unsafely
        raise EvlpError(f"cannot read checkpoint: {unpickling_refused(path, e)}") from None
    except Exception as e:  # a truncated or corrupt file
        raise EvlpError(f"cannot read checkpoint {path} as an evlp training checkpoint: {first_line(e)}") from None


def list_checkpoints(folder: Path, kind: str = "train") -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoints in ``folder``, oldest first."""
    found = []
    if Path(folder).is_dir():
        for p in Path(folder).iterdir():
            m = CHECKPOINT_RE.match(p.name)
            if m and m.group(3) == kind:
                found.append((int(m.group(1)), p))
    return sorted(found)


def checked_resume_state(path: Path, module: torch.nn.Module, skip_prefix: str) -> dict:
    """The checkpoint ``resume=`` names, read once, after checking that it is a pretraining checkpoint of this
    run's model (every tensor of ``module`` but those under ``skip_prefix``, the teacher, at the same shape): one
    line otherwise, never Lightning's traceback from deep inside ``fit``."""
    ckpt = load_training_checkpoint(path)
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or "global_step" not in ckpt or "optimizer_states" not in ckpt:
        raise EvlpError(f"resume={path}: not an evlp pretraining checkpoint (no model state, step or optimizer "
                        f"state in it); resume= continues a run from one of its own checkpoints")
    expected = {k: v for k, v in module.state_dict().items() if not k.startswith(skip_prefix)}
    problems = fit_problems(expected, state)
    if problems:
        raise EvlpError(f"resume={path}: the checkpoint does not fit this run's model ({'; '.join(problems)}); "
                        f"resume with the settings it was trained with (--config <its run folder>/config.yaml)")
    return ckpt


def init_student_from(student: torch.nn.Module, source: str) -> str:
    """Load the student weights of a training checkpoint or an `evlp export` folder into ``student`` (weights only:
    nothing of the optimizer, the schedule, the step or the memory bank); returns the line saying what was loaded."""
    from evlp.api import load_model  # builds the source's model: imported only when asked (evlp.api imports a lot)

    loaded = load_model(source)
    state = loaded.model.state_dict()
    load_exact(student, state, f"init_from={source} (this run's model settings and tokenizer must be those of the "
                               f"run that made it)")
    step = f" of step {loaded.step}" if loaded.step is not None else ""
    values = sum(v.numel() for v in state.values())
    return (f"init_from: the student's weights ({len(state)} tensors, {values / 1e6:.1f}M values) from the {loaded.kind}"
            f"{step} {loaded.source}; optimizer, schedule, step and memory bank start fresh")


def resolve_resume(resume: Optional[str], folder: Path) -> Optional[Path]:
    """``None`` -> start fresh; ``latest`` -> newest checkpoint in the run's folder (fresh if none); else a path."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(folder)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.is_file():
        raise EvlpError(f"resume={resume}: no such checkpoint; use resume=latest or the path of a .ckpt file")
    return path
