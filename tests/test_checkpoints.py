"""Checkpoint writes as the trainer does them: through ``AtomicCheckpointIO`` (file flushed, renamed, folder flushed),
a real training process killed in the middle of a save, and the leftover temporary file removed when the same run
starts again (and nothing outside the run's checkpoint folder)."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L

from evlp.train.callbacks import BestCheckpoint
from evlp.train.checkpoint import AtomicCheckpointIO, list_checkpoints, load_training_checkpoint
from evlp.train.recipe import run_pretraining
from tests.test_train import tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
RUN = ["trainer.max_steps=6", "trainer.max_epochs=-1", "trainer.checkpoint_every_n_steps=2", "eval.retrieval=false",
       "eval.zeroshot_callback=null", "eval.retrieval_callback=null",
       "eval.zeroshot=false"]


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def test_the_trainer_writes_atomically_and_flushes_the_folder_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file"
        events.append((kind, _fd_path(fd)))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(src), str(dst)))
        real_replace(src, dst)

    class Plugin(L.Callback):
        def on_train_start(self, trainer, module):
            events.append(("plugin", trainer.strategy.checkpoint_io))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run_pretraining(tiny_cfg(tmp_path, *RUN), extra_callbacks=[Plugin()])

    folder = tmp_path / "models" / "quickstart"
    (_, plugin), = [e for e in events if e[0] == "plugin"]
    assert isinstance(plugin, AtomicCheckpointIO)
    renames = [e for e in events if e[0] == "rename" and Path(e[2]).parent == folder]
    # every 2 steps, and the best validation checkpoint (the first validation, after the epoch of 3 steps)
    assert [Path(dst).name.split("-")[1] for _, _, dst in renames] == ["2", "3", "4", "6"]
    assert [Path(dst).name.endswith("-val.ckpt") for _, _, dst in renames] == [False, True, False, False]
    for _, tmp, final in renames:
        assert Path(tmp).parent == folder and Path(tmp).name.startswith(f".{Path(final).name}.")
        i = events.index(("rename", tmp, final))
        # the file's content is on disk before it gets its name, and the new name is on disk right after
        assert events[i - 1] == ("fsync file", tmp)
        assert events[i + 1] == ("fsync folder", str(folder))


# A training process whose second checkpoint write stops half way (the bytes it has written are flushed), says so
# in a marker file and waits to be killed. The stall is in torch.save, below any checkpoint IO plugin: a plugin that
# wrote straight to the final name would leave a truncated checkpoint there.
CHILD = r"""
import io, os, sys, time
import torch
from evlp.train.recipe import run_pretraining
from tests.test_train import tiny_cfg

marker, base, *overrides = sys.argv[1:]
real_save, saves = torch.save, []

def stalling_save(obj, f, *args, **kwargs):
    if not (isinstance(obj, dict) and "global_step" in obj and "state_dict" in obj):
        return real_save(obj, f, *args, **kwargs)
    saves.append(obj["global_step"])
    if len(saves) < 2:
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer)
    f.write(buffer.getvalue()[: buffer.tell() // 2])
    f.flush()
    with open(marker, "w") as m:
        m.write(str(obj["global_step"]))
    time.sleep(600)

torch.save = stalling_save
run_pretraining(tiny_cfg(base, *overrides))
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_process_killed_mid_save_keeps_the_last_good_checkpoint_and_the_next_start_cleans_up(tmp_path):
    folder = tmp_path / "models" / "quickstart"
    other_run = tmp_path / "models" / "other"  # another run's leftovers are not this run's to delete
    other_run.mkdir(parents=True)
    foreign = other_run / ".model-9-1.0000-train.ckpt.abc123.tmp"
    foreign.write_bytes(b"not ours")
    marker = tmp_path / "stalled"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(marker), str(tmp_path), *RUN], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert child.poll() is None, f"the training process ended early: {child.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "the training process never reached its second checkpoint"
            time.sleep(0.2)
        good = folder / next(p.name for p in folder.iterdir() if p.name.startswith("model-2-"))
        before = sha256(good)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    assert marker.read_text() == "3"  # the second checkpoint: the best validation one, after the first epoch

    # The last good checkpoint is untouched and complete; the interrupted one exists only as its temporary file.
    assert [step for step, _ in list_checkpoints(folder)] == [2]
    assert sha256(good) == before and load_training_checkpoint(good)["global_step"] == 2
    leftovers = sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))
    assert len(leftovers) == 1 and leftovers[0].startswith(".model-3-") and "-val.ckpt." in leftovers[0]

    # The same run, started again, removes it and continues from step 2.
    results = run_pretraining(tiny_cfg(tmp_path, *RUN, "resume=latest"))
    assert results["steps"] == 6
    assert not list(folder.glob("*.tmp"))
    assert [step for step, _ in list_checkpoints(folder)] == [4, 6]
    assert foreign.read_bytes() == b"not ours"


def test_fine_tuning_removes_stale_temporaries_of_its_own_folder_only(tmp_path):
    folder, elsewhere = tmp_path / "glue_mrpc", tmp_path / "other"
    for d in (folder, elsewhere):
        d.mkdir()
        (d / ".model-3-0.5000-val.ckpt.x1y2.tmp").write_bytes(b"partial")
        (d / ".last.ckpt.z9.tmp").write_bytes(b"partial")
    (folder / "last.ckpt").write_bytes(b"a real checkpoint")
    BestCheckpoint(folder, "val/f1", "max").setup(SimpleNamespace(is_global_zero=True), None, "fit")
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    assert len(list(elsewhere.iterdir())) == 2
    BestCheckpoint(elsewhere, "val/f1", "max").setup(SimpleNamespace(is_global_zero=False), None, "fit")
    assert len(list(elsewhere.iterdir())) == 2  # only the process that writes checkpoints cleans up
