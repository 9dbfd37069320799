"""Which folders a run writes: ``<log_dir>/<run_name>`` and ``<model_path>/<run_name>``, never another run's.

A run whose folders already hold files continues them only when asked to (``resume=latest`` or a checkpoint path);
any other run gets the first free name ``<run_name>-2``, ``<run_name>-3``, ... and says so in one line, with the
command that would have continued the earlier run. ``evlp train`` and ``evlp finetune`` both choose their folders here.

Every process of a multi-process run must pick the same name, though only rank 0 writes: the others load the best
checkpoint from the folder they picked. Lightning starts ranks > 0 as child processes of rank 0 once rank 0 has
written into its folders, so the children take rank 0's choice from the environment they inherit. Launchers that
start every rank at once (torchrun, SLURM) give each rank the same view, except for the files a sibling wrote since
the ranks started, which ranks > 0 therefore ignore.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

log = logging.getLogger("evlp")

CLAIM_ENV = "EVLP_CLAIMED_RUN"  # rank 0's choice, for the ranks Lightning starts as its child processes
_STARTED = time.time()  # files a sibling rank wrote after this are not an earlier run's


def _sibling_rank() -> bool:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) > 0


def _holds_files(folder: Path) -> bool:
    if not folder.exists():
        return False
    if not folder.is_dir():
        return True
    if _sibling_rank():
        return any(f.stat().st_mtime < _STARTED for f in folder.iterdir())
    return any(folder.iterdir())


def _claim_key(cfg: DictConfig, asked: str) -> dict:
    return {"log_dir": str(Path(cfg.log_dir).resolve()), "model_path": str(Path(cfg.model_path).resolve()),
            "asked": asked}


def _inherited_name(cfg: DictConfig) -> str | None:
    """The name rank 0 chose, when this process is a rank Lightning started as rank 0's child for this run."""
    try:
        claim = json.loads(os.environ.get(CLAIM_ENV, ""))
    except ValueError:
        return None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 or claim.get("pid") != os.getppid():
        return None
    return claim["run_name"] if claim.get("key") == _claim_key(cfg, cfg.run_name) else None


def run_folders(cfg: DictConfig, name: str | None = None) -> tuple[Path, Path]:
    """``(log folder, checkpoint folder)`` of run ``name`` (default: ``cfg.run_name``)."""
    name = name or cfg.run_name
    return Path(cfg.log_dir) / name, Path(cfg.model_path) / name


def claim_run_folders(cfg: DictConfig) -> tuple[Path, Path]:
    """The run's ``(log folder, checkpoint folder)``; renames the run (``cfg.run_name``) when its folders hold an
    earlier run's files and ``cfg.resume`` is not set."""
    inherited = _inherited_name(cfg)
    if inherited is not None:
        cfg.run_name = inherited
        return run_folders(cfg)
    earlier = cfg.run_name
    if cfg.resume is None and any(map(_holds_files, run_folders(cfg))):
        n = 2
        while any(map(_holds_files, run_folders(cfg, f"{earlier}-{n}"))):
            n += 1
        cfg.run_name = f"{earlier}-{n}"
    os.environ[CLAIM_ENV] = json.dumps({"pid": os.getpid(), "key": _claim_key(cfg, earlier), "run_name": cfg.run_name})
    if cfg.run_name != earlier and rank_zero_only.rank == 0:
        log.warning("%s already holds the run %s: this run is %s (to continue %s instead, rerun with run_name=%s "
                    "resume=latest)", next(f for f in run_folders(cfg, earlier) if _holds_files(f)), earlier,
                    cfg.run_name, earlier, earlier)
    return run_folders(cfg)
