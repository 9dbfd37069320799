"""Training callbacks: data position (exact resume), step checkpoints, throughput, and a resume-safe CSV log."""

from __future__ import annotations

import csv
import random
import time
from pathlib import Path

import lightning as L
import torch

from evlp.errors import EvlpError
from evlp.train.checkpoint import checkpoint_name, list_checkpoints


class DataPosition(L.Callback):
    """Tells the training shards which epoch and batch to start from, and saves that position in checkpoints.

    Lightning cannot resume an iterable dataset mid-epoch by itself. We count the batches consumed in the current
    epoch; a resumed run configures the shards to start right after them (the shards reproduce the same stream,
    augmentations included, see ``evlp.data.shards``). Python's and torch's RNG states travel along.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self.epoch = 0
        self.batches_in_epoch = 0
        self._restored = False

    def _configure(self, trainer, start_batch: int) -> None:
        self.dataset.configure(self.epoch, start_batch, trainer.global_rank, trainer.world_size)

    def on_train_start(self, trainer, pl_module) -> None:
        # Called after a checkpoint restore; a fresh run starts at (0, 0).
        self._configure(trainer, self.batches_in_epoch)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # Not called by Lightning when it resumes mid-epoch, which is what on_train_start handles.
        if self._restored:
            self._restored = False
            return
        self.epoch, self.batches_in_epoch = trainer.current_epoch, 0
        self._configure(trainer, 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches_in_epoch += 1

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
            "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_in_epoch = state["epoch"], state["batches_in_epoch"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        self._restored = True


class StepCheckpoint(L.Callback):
    """Every ``every_n_steps`` optimizer steps and at the end: ``model-{step}-{loss}-train.ckpt``, atomically.

    ``loss`` is the mean training loss since the previous checkpoint (not one noisy step). A checkpoint is only
    written while every loss so far was finite; NaN/inf stops the run and points at the last good checkpoint.
    Only the ``keep_last`` newest checkpoints are kept.
    """

    def __init__(self, folder: Path, every_n_steps: int, keep_last: int = 2):
        self.folder = Path(folder)
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self._loss_sum = None
        self._loss_count = 0
        self.last_saved_step = -1
        self.last_path: Path | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._loss_sum = loss.detach() if self._loss_sum is None else self._loss_sum + loss.detach()
        self._loss_count += 1
        step = trainer.global_step
        if (batch_idx + 1) % trainer.log_every_n_steps == 0:
            self.check_finite(trainer, pl_module)
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self.last_saved_step:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self.last_saved_step and self._loss_count:
            self.save(trainer, pl_module)

    def check_finite(self, trainer, pl_module) -> None:
        if bool(pl_module.nonfinite):  # one host sync per log interval or checkpoint, never per step
            last = f"; the last good checkpoint is {self.last_path}" if self.last_path else "; no checkpoint was saved"
            raise EvlpError(f"training loss became NaN or inf before step {trainer.global_step}; stopped{last}")

    def save(self, trainer, pl_module) -> None:
        self.check_finite(trainer, pl_module)
        step = trainer.global_step
        mean_loss = (self._loss_sum / self._loss_count).item() if self._loss_count else float("nan")
        path = self.folder / checkpoint_name(step, mean_loss)
        trainer.save_checkpoint(path)
        self._loss_sum, self._loss_count = None, 0
        self.last_saved_step, self.last_path = step, path
        if trainer.is_global_zero and self.keep_last > 0:
            for _, old in list_checkpoints(self.folder)[: -self.keep_last]:
                old.unlink(missing_ok=True)


class Throughput(L.Callback):
    """Logs pairs/s, the share of step time spent waiting for data and, on GPU, MFU, at the log interval.

    Step time is measured from one ``on_train_batch_start`` to the next; data time is the gap between a batch's end
    and the next batch's start (the loader's ``next()``). Synchronisation happens only at the log interval.
    """

    def __init__(self, flops_per_pair: float | None = None, peak_flops: float | None = None):
        self.flops_per_pair = flops_per_pair
        self.peak_flops = peak_flops
        self._window_start = None
        self._pairs = 0
        self._data_time = 0.0
        self._last_end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self._data_time += now - self._last_end
        if self._window_start is None:
            self._window_start, self._pairs, self._data_time = now, 0, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._pairs += batch["image"].shape[0] * trainer.world_size
        self._last_end = time.perf_counter()
        if (batch_idx + 1) % trainer.log_every_n_steps:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._window_start
        pairs_per_s = self._pairs / max(elapsed, 1e-9)
        metrics = {"perf/pairs_per_s": pairs_per_s, "perf/data_share": self._data_time / max(elapsed, 1e-9)}
        if self.flops_per_pair and self.peak_flops:
            metrics["perf/mfu"] = pairs_per_s * self.flops_per_pair / (self.peak_flops * trainer.world_size)
        pl_module.log_dict(metrics, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)
        self._window_start = None
        self._last_end = None


class MetricsCSV(L.Callback):
    """Appends every logged scalar to ``metrics.csv`` as ``step,epoch,name,value`` rows.

    The long format survives resumes: rows logged after the checkpoint a run resumes from are dropped once at the
    start, then rows are only ever appended.
    """

    FIELDS = ["step", "epoch", "name", "value"]

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        kept = []
        if self.path.exists():
            with self.path.open() as f:
                kept = [r for r in csv.DictReader(f) if int(r["step"]) <= trainer.global_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.FIELDS)
            writer.writeheader()
            writer.writerows(kept)

    def _append(self, trainer, prefixes: tuple) -> None:
        if not trainer.is_global_zero:
            return
        rows = [
            {"step": trainer.global_step, "epoch": trainer.current_epoch, "name": k, "value": float(v)}
            for k, v in trainer.logged_metrics.items() if k.startswith(prefixes)
        ]
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.FIELDS).writerows(rows)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.log_every_n_steps == 0:
            self._append(trainer, ("train/", "perf/", "lr"))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._append(trainer, ("val/",))
