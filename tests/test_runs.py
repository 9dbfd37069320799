"""Runs never touch each other: a run folder that holds an earlier run is continued only with ``resume=``, any other
run gets a fresh name; checkpoint pruning only ever considers the run's own checkpoints; report.md names only files
that exist. For ``evlp train`` and ``evlp finetune`` alike."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest

from evlp.cli import main
from evlp.finetune.runner import run_finetune
from evlp.train.checkpoint import list_checkpoints
from tests.api_support import toy_run  # noqa: F401
from tests.test_finetune_vision import imagenet_dir, vision_cfg  # noqa: F401
from tests.test_train import TINY


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file under the folders with the hash of its bytes."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def train(base_dir: Path, *extra: str) -> int:
    fast = ["eval.zeroshot=false", "eval.zeroshot_callback=null", "eval.retrieval_callback=null"]
    return main(["train", f"base_dir={base_dir}", *TINY, *fast, "trainer.checkpoint_every_n_steps=2", *extra])


def test_a_second_run_into_the_same_base_dir_gets_its_own_folders(tmp_path, caplog):
    assert train(tmp_path, "trainer.max_steps=6") == 0
    first = [tmp_path / "logs" / "quickstart", tmp_path / "models" / "quickstart"]
    before = snapshot(*first)
    assert [s for s, _ in list_checkpoints(first[1])] == [4, 6]

    # Fewer steps than the first run: with one shared folder its higher step numbers would win every pruning.
    with caplog.at_level(logging.WARNING, logger="evlp"):
        assert train(tmp_path, "trainer.max_steps=2") == 0
    assert snapshot(*first) == before  # nothing appended, overwritten or deleted
    notice = [r.getMessage() for r in caplog.records if "already holds the run quickstart" in r.getMessage()]
    assert len(notice) == 1 and "this run is quickstart-2" in notice[0]
    assert "run_name=quickstart resume=latest" in notice[0]
    second_logs, second_models = tmp_path / "logs" / "quickstart-2", tmp_path / "models" / "quickstart-2"
    assert [s for s, _ in list_checkpoints(second_models)] == [2]
    assert "run_name: quickstart-2" in (second_logs / "config.yaml").read_text()
    results = json.loads((second_logs / "results.json").read_text())
    assert results["steps"] == 2 and Path(results["checkpoint"]).is_file()
    assert {int(line.split(",")[0]) for line in (second_logs / "metrics.csv").read_text().splitlines()[1:]} <= {0, 1, 2}
    report = (second_logs / "report.md").read_text()
    assert "# quickstart-2" in report and f"`{results['checkpoint']}`" in report

    # a third run: the next free name; and with resume=latest the first run is continued in its own folders
    assert train(tmp_path, "trainer.max_steps=2") == 0
    assert (tmp_path / "models" / "quickstart-3").is_dir()
    assert train(tmp_path, "trainer.max_steps=8", "resume=latest") == 0
    assert not (tmp_path / "logs" / "quickstart-4").exists()
    assert [s for s, _ in list_checkpoints(first[1])] == [6, 8]
    assert json.loads((first[0] / "results.json").read_text())["steps"] == 8


def test_pruning_keeps_other_continuations_and_the_newest_checkpoint(tmp_path):
    assert train(tmp_path, "trainer.max_steps=6") == 0
    folder = tmp_path / "models" / "quickstart"
    (step4, old4), (_, old6) = list_checkpoints(folder)
    # Checkpoints of a later continuation of the run (higher steps) that this resume does not descend from: by step
    # number alone they are the newest two, and the checkpoints this resume writes would be pruned at once.
    later = [folder / "model-100-1.0000-train.ckpt", folder / "model-101-1.0000-train.ckpt"]
    for path in later:
        shutil.copy(old6, path)
    assert train(tmp_path, "trainer.max_steps=8", f"resume={old4}") == 0
    kept = {p.name for _, p in list_checkpoints(folder)}
    # written now: 6 and 8 (the newest two of this run); step 4 (this run's past) pruned; steps 100, 101 untouched
    assert {p.name for p in later} <= kept and old4.name not in kept
    assert len([name for name in kept if name.startswith(("model-6-", "model-8-"))]) >= 2
    results = json.loads((tmp_path / "logs" / "quickstart" / "results.json").read_text())
    assert Path(results["checkpoint"]).is_file() and "model-8-" in results["checkpoint"]


def test_report_never_names_a_checkpoint_that_is_gone(tmp_path):
    from omegaconf import OmegaConf

    from evlp.train.report import write_report

    cfg = OmegaConf.create({"run_name": "r"})
    write_report(cfg, tmp_path, {"steps": 3, "checkpoint": str(tmp_path / "model-3-1.0000-train.ckpt")})
    assert "no checkpoint kept" in (tmp_path / "report.md").read_text()


def test_finetune_runs_never_touch_each_other(toy_run, imagenet_dir, tmp_path, caplog):  # noqa: F811
    checkpoint, _ = toy_run
    common = [f"data_path={imagenet_dir}", "trainer.max_epochs=1"]
    run_finetune(vision_cfg("imagenet", tmp_path, checkpoint, *common))
    first = [tmp_path / "logs" / "imagenet_finetune", tmp_path / "models" / "imagenet_finetune"]
    before = snapshot(*first)
    with caplog.at_level(logging.WARNING, logger="evlp"):
        results = run_finetune(vision_cfg("imagenet", tmp_path, checkpoint, *common))
    assert snapshot(*first) == before
    assert results["run_name"] == "imagenet_finetune-2"
    assert any("this run is imagenet_finetune-2" in r.getMessage() for r in caplog.records)
    assert Path(results["best"]["checkpoint"]).parent == tmp_path / "models" / "imagenet_finetune-2"
    assert (tmp_path / "logs" / "imagenet_finetune-2" / "report.md").is_file()


def test_every_rank_of_a_multi_process_run_takes_rank_0s_name(tmp_path, monkeypatch):
    import os
    import time

    from omegaconf import OmegaConf

    from evlp.train import runs

    def cfg():
        return OmegaConf.create({"run_name": "mine", "resume": None, "log_dir": str(tmp_path / "logs"),
                                 "model_path": str(tmp_path / "models")})

    (tmp_path / "logs" / "mine").mkdir(parents=True)
    old = tmp_path / "logs" / "mine" / "metrics.csv"
    old.write_text("step\n")
    os.utime(old, (time.time() - 3600,) * 2)  # an earlier run's file
    monkeypatch.delenv(runs.CLAIM_ENV, raising=False)
    rank0 = cfg()
    runs.claim_run_folders(rank0)
    assert rank0.run_name == "mine-2"
    (tmp_path / "logs" / "mine-2").mkdir()
    (tmp_path / "logs" / "mine-2" / "config.yaml").write_text("run_name: mine-2\n")  # rank 0 starts writing

    # A rank Lightning starts as rank 0's child sees mine-2 taken, but takes rank 0's choice from its environment.
    monkeypatch.setattr(os, "getppid", lambda: os.getpid())
    monkeypatch.setenv("LOCAL_RANK", "1")
    child = cfg()
    runs.claim_run_folders(child)
    assert child.run_name == "mine-2"

    # A rank torchrun started beside rank 0 ignores what its siblings wrote since the ranks started.
    monkeypatch.delenv(runs.CLAIM_ENV)
    monkeypatch.setenv("RANK", "1")
    sibling = cfg()
    runs.claim_run_folders(sibling)
    assert sibling.run_name == "mine-2"
