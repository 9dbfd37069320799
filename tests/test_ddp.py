"""Real DDP on CPU: ``evlp train`` and ``evlp finetune`` (GLUE MRPC) as 2 processes through Lightning's DDP on gloo
(real processes, the real gradient all-reduce and feature gathers) give the same losses, validation metrics and
weights as one process with the whole batch. Dropout is off (``model.text_tower.dropout=0``): it is the only
randomness that depends on how a batch is split. The fine-tuning validation set (13 pairs) does not split evenly,
so Lightning's DistributedSampler repeats a pair on the second process; the metrics still equal one process's, which
sees every pair exactly once.

These tests start ``evlp`` as a subprocess (Lightning's DDP launcher re-runs the command for rank 1) and take
~20-40 s each on 2 cores; the one-process runs are in-process."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from evlp.config import load_config
from evlp.finetune.runner import LAST, run_finetune
from evlp.train.checkpoint import list_checkpoints, load_training_checkpoint
from evlp.train.recipe import run_pretraining
from tests.test_train import TINY, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["eval.retrieval=false", "eval.zeroshot=false", "eval.zeroshot_callback=null", "eval.retrieval_callback=null"]
# 64 pairs, 4 global batches of 16 an epoch: 6 steps cross an epoch boundary (and a validation); the bank of 40
# wraps around during the third push.
PRETRAIN = ["data.quickstart.num_train=64", "loss.memory_bank_size=40", "model.text_tower.dropout=0",
            "trainer.max_steps=6", "trainer.max_epochs=-1", "trainer.checkpoint_every_n_steps=3",
            "trainer.accelerator=cpu", "trainer.precision=64-true", *QUIET]
# Sums run in another order on 2 processes. In float32, Adam turns those last-bit differences of near-zero gradients
# into weight differences up to ~lr per step, so the pretraining runs are compared in float64 (64-true), where they
# agree to 1e-9; GLUE's loss is computed in float32 (per_sample_loss), so 1e-5 there.
FLOAT64, FLOAT32 = 1e-9, 1e-5


def evlp_cli(*args: str) -> None:
    run = subprocess.run([sys.executable, "-m", "evlp.cli", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]


def logged(run_dir: Path) -> dict[str, dict[int, float]]:
    """``{name: {step: value}}`` of metrics.csv; every (name, step) must appear once."""
    with (run_dir / "metrics.csv").open() as f:
        rows = [(r["name"], int(r["step"]), float(r["value"])) for r in csv.DictReader(f)]
    repeated = [key for key, n in Counter((name, step) for name, step, _ in rows).items() if n > 1]
    assert not repeated, f"logged more than once: {repeated}"
    out: dict[str, dict[int, float]] = {}
    for name, step, value in rows:
        out.setdefault(name, {})[step] = value
    return out


def assert_same_curves(one: dict, two: dict, names: list[str], tol: float) -> None:
    for name in names:
        assert one[name].keys() == two[name].keys() and one[name], name
        for step in one[name]:
            assert two[name][step] == pytest.approx(one[name][step], rel=tol, abs=tol), (name, step)


def assert_same_weights(a: Path, b: Path, tol: float) -> None:
    one, two = load_training_checkpoint(a)["state_dict"], load_training_checkpoint(b)["state_dict"]
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=tol, atol=tol, msg=lambda m: f"{key}: {m}")


def test_evlp_train_on_two_processes_equals_one_process_with_the_whole_batch(tmp_path):
    run_pretraining(tiny_cfg(tmp_path / "one", *PRETRAIN, "data.batch_size=16"))
    evlp_cli("train", "--config", "quickstart", f"base_dir={tmp_path / 'two'}", *TINY, *PRETRAIN,
             "data.batch_size=8", "trainer.devices=2")

    one, two = (logged(tmp_path / run / "logs" / "quickstart") for run in ("one", "two"))
    assert sorted(one["train/loss"]) == list(range(6))
    assert_same_curves(one, two, ["train/loss", "train/kd_loss", "train/itc_loss", "val/loss"], FLOAT64)
    checkpoints = [list_checkpoints(tmp_path / run / "models" / "quickstart") for run in ("one", "two")]
    assert [s for s, _ in checkpoints[0]] == [s for s, _ in checkpoints[1]] == [3, 6]
    # student, memory bank (pushed in the same order), bank pointer and fill
    assert_same_weights(checkpoints[0][-1][1], checkpoints[1][-1][1], FLOAT64)


def test_glue_fine_tuning_on_two_processes_equals_one_process_and_scores_each_sample_once(tmp_path):
    from tests.test_finetune_glue import FAST, make_glue_task

    run_pretraining(tiny_cfg(tmp_path / "pre", "trainer.max_steps=1", "trainer.max_epochs=-1",
                             "model.text_tower.dropout=0", *QUIET))
    checkpoint = list_checkpoints(tmp_path / "pre" / "models" / "quickstart")[-1][1]
    make_glue_task(tmp_path / "data", "mrpc", sizes={"train": 16, "validation": 13, "test": 4})
    # 16 pairs, 2 global batches of 8 an epoch, 2 epochs: two validations over 13 pairs
    common = [f"model.model_path={checkpoint}", f"data_path={tmp_path / 'data'}", *FAST, "model.dropout=0",
              "data.limit_train_samples=null", "data.eval_batch_size=4", "trainer.max_steps=4",
              "trainer.max_epochs=2"]
    run_finetune(load_config("fine_tuning/mrpc", [f"base_dir={tmp_path / 'one'}", *common, "data.batch_size=8"]))
    evlp_cli("finetune", "--config", "fine_tuning/mrpc", f"base_dir={tmp_path / 'two'}", *common,
             "data.batch_size=4", "trainer.devices=2")

    one, two = (logged(tmp_path / run / "logs" / "glue_mrpc") for run in ("one", "two"))
    assert sorted(one["train/loss"]) == list(range(4)) and sorted(one["val/f1"]) == [1, 3]
    assert_same_curves(one, two, ["train/loss", "val/loss", "val/f1", "val/accuracy"], FLOAT32)
    assert_same_weights(tmp_path / "one" / "models" / "glue_mrpc" / LAST,
                        tmp_path / "two" / "models" / "glue_mrpc" / LAST, FLOAT32)
