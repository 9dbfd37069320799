"""GLUE from the Hugging Face hub (``nyu-mll/glue``), saved with ``save_to_disk`` under ``glue/<task>/``.

Needs the optional ``datasets`` package (``pip install 'evlp[glue]'``). Load a task back with
``datasets.load_from_disk(f"{data_path}/glue/{task}")``: a ``DatasetDict`` with the hub's splits (train, validation,
test; MNLI has validation_matched / validation_mismatched and the test counterparts). A task is written to
``glue/<task>.tmp`` and renamed when complete, so an existing ``glue/<task>/`` is whole and is not fetched again.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from evlp.errors import EvlpError

REPO = "nyu-mll/glue"
TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")


def download_glue(data_path: str | os.PathLike, tasks: list[str] | None = None) -> list[str]:
    """Fetch ``tasks`` (all nine by default); returns one summary line per task."""
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise EvlpError("GLUE needs the datasets package: pip install 'evlp[glue]' (or datasets>=5.2)") from e
    root = Path(data_path) / "glue"
    lines = []
    for task in tasks or TASKS:
        if task not in TASKS:
            raise EvlpError(f"unknown GLUE task {task!r}; choose from {', '.join(TASKS)}")
        target = root / task
        if target.is_dir():
            lines.append(f"glue {task}: already in {target}")
            continue
        try:
            dataset = load_dataset(REPO, task)
        except (OSError, ConnectionError, ValueError) as e:
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EvlpError(f"cannot load GLUE task {task} from the hub ({REPO}): {text}") from e
        tmp = root / f"{task}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        dataset.save_to_disk(str(tmp))
        os.replace(tmp, target)
        sizes = ", ".join(f"{split} {len(rows):,}" for split, rows in dataset.items())
        lines.append(f"glue {task}: {sizes} rows in {target}")
    return lines
