"""Which folders a run writes: ``<log_dir>/<run_name>`` and ``<model_path>/<run_name>``, never another run's.

A run whose folders already hold files continues them only when asked to (``resume=latest`` or a checkpoint path);
any other run gets the first free name ``<run_name>-2``, ``<run_name>-3``, ... and says so in one line, with the
command that would have continued the earlier run. ``evlp train`` and ``evlp finetune`` both choose their folders here.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

log = logging.getLogger("evlp")


def _holds_files(folder: Path) -> bool:
    return folder.exists() and (not folder.is_dir() or any(folder.iterdir()))


def run_folders(cfg: DictConfig, name: str | None = None) -> tuple[Path, Path]:
    """``(log folder, checkpoint folder)`` of run ``name`` (default: ``cfg.run_name``)."""
    name = name or cfg.run_name
    return Path(cfg.log_dir) / name, Path(cfg.model_path) / name


def claim_run_folders(cfg: DictConfig) -> tuple[Path, Path]:
    """The run's ``(log folder, checkpoint folder)``; renames the run (``cfg.run_name``) when its folders hold an
    earlier run's files and ``cfg.resume`` is not set.

    Only rank 0 ever writes into these folders, so in a multi-process run the other ranks' choice (made from the same
    file system, possibly a moment later) never matters."""
    if cfg.resume is not None or not any(map(_holds_files, run_folders(cfg))):
        return run_folders(cfg)
    earlier = cfg.run_name
    n = 2
    while any(map(_holds_files, run_folders(cfg, f"{earlier}-{n}"))):
        n += 1
    cfg.run_name = f"{earlier}-{n}"
    if rank_zero_only.rank == 0:
        log.warning("%s already holds the run %s: this run is %s (to continue %s instead, rerun with run_name=%s "
                    "resume=latest)", next(f for f in run_folders(cfg, earlier) if _holds_files(f)), earlier,
                    cfg.run_name, earlier, earlier)
    return run_folders(cfg)
