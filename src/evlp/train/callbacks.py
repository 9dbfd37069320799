"""Training callbacks: data position (exact resume), step checkpoints, the best validation checkpoint, throughput,
skipped samples, and a resume-safe CSV log."""

from __future__ import annotations

import csv
import logging
import random
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from evlp.errors import EvlpError
from evlp.train.checkpoint import checkpoint_name, list_checkpoints, remove_stale_temporaries

log = logging.getLogger("evlp")


class DataPosition(L.Callback):
    """Tells the training shards which epoch and batch to start from, and saves that position in checkpoints.

    Lightning cannot resume an iterable dataset mid-epoch by itself. We count the batches consumed in the current
    epoch; a resumed run configures the shards to start right after them (the shards reproduce the same stream,
    augmentations included, see ``evlp.data.shards``). Python's and torch's RNG states travel along.

    Timing matters with loader workers, which get a copy of the dataset when Lightning creates the iterator: for
    the first epoch that happens before ``on_train_start``, so the dataset is configured in ``setup`` (fresh run,
    also fixing ``len()`` for the real world size) and in ``load_state_dict`` (resume); later epochs are configured
    in ``on_train_epoch_start``, which Lightning calls before it creates that epoch's iterator.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self.epoch = 0
        self.batches_in_epoch = 0
        self._rank, self._world_size = 0, 1
        self._pending_rng = None

    def _configure(self) -> None:
        self.dataset.configure(self.epoch, self.batches_in_epoch, self._rank, self._world_size)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._rank, self._world_size = trainer.global_rank, trainer.world_size
        self._configure()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # Lightning skips this hook for the epoch it resumes in (load_state_dict configured that one). It does call it
        # when resuming a checkpoint written at an epoch's end: the uninterrupted run captured the RNG before this
        # epoch's data iterator drew from it, so it is restored here, before that draw.
        self._restore_rng()
        self.epoch, self.batches_in_epoch = trainer.current_epoch, 0
        self._configure()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Mid-epoch: restored here rather than at load time, as creating the data iterator draws from torch's RNG,
        # which the uninterrupted run did before the checkpoint's state was captured.
        self._restore_rng()

    def _restore_rng(self) -> None:
        if self._pending_rng is not None:
            torch.set_rng_state(self._pending_rng["torch_rng"])
            random.setstate(self._pending_rng["python_rng"])
            self._pending_rng = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches_in_epoch += 1

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch, "batches_per_epoch": len(self.dataset),
            "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batches_in_epoch = state["epoch"], state["batches_in_epoch"]
        # A position only means something in the epoch it was taken in: another dataset, batch size or number of
        # processes makes epochs of another length (older checkpoints did not record it: then only past the end).
        saved, now = state.get("batches_per_epoch"), len(self.dataset)
        if (saved is not None and saved != now) or self.batches_in_epoch > now:
            epoch = f"an epoch of {saved} batches" if saved is not None else f"epoch {self.epoch}"
            raise EvlpError(f"resume: the checkpoint stopped after batch {self.batches_in_epoch} of {epoch}, but "
                            f"this run's data makes epochs of {now} batches: it was saved by a run on other data or "
                            f"with another data.batch_size or number of processes; resume with the same ones, or "
                            f"start a new run (another run_name, no resume=)")
        self._pending_rng = {"torch_rng": state["torch_rng"], "python_rng": state["python_rng"]}
        self._configure()


class StepCheckpoint(L.Callback):
    """Every ``every_n_steps`` optimizer steps and at the end: ``model-{step}-{loss}-train.ckpt``, atomically.

    A checkpoint due after an epoch's last batch is written at the end of that epoch, after its validation: Lightning
    resumes such a checkpoint at the start of the next epoch. Written from the last batch's end, Lightning (2.6)
    would resume it one epoch too far, with the data of the wrong epoch and one epoch fewer to train. (Resuming it,
    Lightning counts the loggers' step one too far instead, which ``on_train_batch_start`` corrects.)

    ``loss`` is the mean training loss since the previous checkpoint (not one noisy step). A checkpoint is only
    written while every loss so far was finite; NaN/inf stops the run and points at the last good checkpoint.
    Only the ``keep_last`` newest checkpoints of this run are kept: the ones this process wrote and, when it resumed,
    the folder's checkpoints up to the step it resumed from (the run's own past). Checkpoints past that step (another
    continuation of the run, e.g. after ``resume=`` an older checkpoint) and files of other names are never deleted,
    and neither is the checkpoint just written.
    """

    def __init__(self, folder: Path, every_n_steps: int, keep_last: int = 2):
        self.folder = Path(folder)
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        self._loss_sum = None
        self._loss_count = 0
        self.last_saved_step = -1
        self.last_path: Path | None = None
        self.written: list[Path] = []  # this process's checkpoints, oldest first
        self.start_step = 0
        self._due_at_epoch_end = False
        self._resumed = False

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_step = trainer.global_step  # > 0 after a resume

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.is_global_zero:  # the only process that writes checkpoints
            remove_stale_temporaries(self.folder)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._resumed = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._resumed:
            # The step metrics.csv and TensorBoard rows carry is Lightning's count of batches that stepped, which
            # equals global_step with one optimizer, but which Lightning restores one too high from a checkpoint
            # written at an epoch's end (it assumes the count was saved before that batch's increment).
            trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step
            self._resumed = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._loss_sum = loss.detach() if self._loss_sum is None else self._loss_sum + loss.detach()
        self._loss_count += 1
        step = trainer.global_step
        if (batch_idx + 1) % trainer.log_every_n_steps == 0:
            self.check_finite(trainer, pl_module)
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self.last_saved_step:
            if batch_idx + 1 == trainer.num_training_batches:
                self._due_at_epoch_end = True
            else:
                self.save(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._due_at_epoch_end:
            self._due_at_epoch_end = False
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
        mean_loss = float("nan")
        if self._loss_count:  # the mean over every process's batches (the step losses are each process's slice)
            mean_loss = float(trainer.strategy.reduce(self._loss_sum / self._loss_count, reduce_op="mean"))
        path = self.folder / checkpoint_name(step, mean_loss)
        trainer.save_checkpoint(path, weights_only=False)
        self._loss_sum, self._loss_count = None, 0
        self.last_saved_step, self.last_path = step, path
        self.written = [p for p in self.written if p != path] + [path]
        if trainer.is_global_zero and self.keep_last > 0:
            past = [p for s, p in list_checkpoints(self.folder) if s <= self.start_step and p not in self.written]
            for old in (past + self.written)[: -self.keep_last]:
                old.unlink(missing_ok=True)


class BestCheckpoint(L.Callback):
    """After each validation, when ``monitor`` improved: the new best ``model-{step}-{val_loss:.4f}-val.ckpt`` in
    place of the previous best (pretraining: ``val/loss``, minimised, as the original's second ModelCheckpoint;
    fine-tuning: the task's metric). With ``last``, that file (e.g. ``last.ckpt``) is also rewritten after every
    validation, for resume. Written atomically; the best so far travels in checkpoints, so a resumed run keeps it."""

    def __init__(self, folder: Path, monitor: str, mode: str, last: str | None = None):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.folder = Path(folder)
        self.monitor, self.mode, self.last = monitor, mode, last
        self.best_value: float | None = None
        self.best_path: Path | None = None
        self.best_step: int | None = None
        self.validated_step: int | None = None  # the step of the latest validation

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero:  # the only process that writes checkpoints
            remove_stale_temporaries(self.folder)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            raise EvlpError(f"the run never logged its monitor metric {self.monitor} (logged: "
                            f"{', '.join(sorted(metrics))})")
        self.validated_step = trainer.global_step
        value = float(metrics[self.monitor])
        better = self.best_value is None or (value > self.best_value if self.mode == "max" else value < self.best_value)
        # Saving is collective: every process must take the same decision, rank 0's.
        if trainer.strategy.broadcast(better and value == value, src=0):  # NaN never becomes the best
            loss = float(metrics.get("val/loss", float("nan")))
            path = self.folder / checkpoint_name(trainer.global_step, loss, "val")
            trainer.save_checkpoint(path, weights_only=False)
            if trainer.is_global_zero and self.best_path is not None and self.best_path != path:
                self.best_path.unlink(missing_ok=True)
            self.best_value, self.best_path, self.best_step = value, path, trainer.global_step
        if self.last is not None:
            trainer.save_checkpoint(self.folder / self.last, weights_only=False)

    def summary(self) -> dict:
        """What results.json records: the monitor, its best value, that checkpoint's step and path."""
        return {"monitor": self.monitor, "value": self.best_value, "step": self.best_step,
                "checkpoint": str(self.best_path) if self.best_path else None}

    def state_dict(self) -> dict:
        return {"best_value": self.best_value, "best_path": str(self.best_path) if self.best_path else None,
                "best_step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        self.best_value, self.best_step = state["best_value"], state["best_step"]
        self.best_path = Path(state["best_path"]) if state["best_path"] else None


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


class SkippedSamples(L.Callback):
    """Totals of the training samples the loader skipped, by reason (``evlp.data.shards.SKIP_REASONS``).

    Logged as ``data/skipped`` and ``data/skipped_<reason>`` at the log interval; at the end summed over ranks into
    ``totals`` (for results.json) and, when any, one warning line. The totals travel in checkpoints, so a resumed
    run keeps counting from where it stopped.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self.before: dict[str, int] = {}  # counted by the run this one resumed (rank 0's, as checkpoints hold)
        self.totals: dict[str, int] = {}

    def _counts(self) -> dict[str, int]:
        counts = dict(self.before)
        for reason, n in self.dataset.skipped().items():
            counts[reason] = counts.get(reason, 0) + n
        return counts

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.log_every_n_steps:
            return
        counts = self._counts()
        metrics = {"data/skipped": float(sum(n for r, n in counts.items() if r != "unreadable_shard")),
                   **{f"data/skipped_{reason}": float(n) for reason, n in counts.items()}}
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer, pl_module) -> None:
        from evlp.data.shards import SKIP_REASONS

        local = self.dataset.skipped()
        if trainer.is_global_zero:
            local = self._counts()
        counts = torch.tensor([local.get(reason, 0) for reason in SKIP_REASONS], device=pl_module.device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        self.totals = {reason: int(n) for reason, n in zip(SKIP_REASONS, counts.tolist()) if n}
        if self.totals and trainer.is_global_zero:
            samples = sum(n for reason, n in self.totals.items() if reason != "unreadable_shard")
            log.warning("the training data loader skipped %d samples: %s", samples,
                        ", ".join(f"{n} {reason}" for reason, n in self.totals.items()))

    def state_dict(self) -> dict:
        return {"skipped": self._counts()}

    def load_state_dict(self, state: dict) -> None:
        self.before = dict(state.get("skipped", {}))


class CSVLogger(Logger):
    """Lightning logger writing every logged scalar to ``metrics.csv`` as ``step,epoch,name,value`` rows.

    The long format keeps one file across resumes and across metrics that appear later (validation): a resumed
    run first drops the rows logged after its checkpoint (``truncate_after``), then only appends.
    """

    FIELDS = ["step", "name", "value"]

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)

    @property
    def name(self) -> str:
        return "csv"

    @property
    def version(self) -> str:
        return ""

    def truncate_after(self, step: int) -> None:
        """Keep the rows of the ``step`` optimizer steps a checkpoint holds (rows are numbered from 0), and the
        validation at ``step``: it evaluated the checkpoint's weights, and the resumed run does not repeat it."""
        kept = []
        if self.path.exists():
            with self.path.open() as f:
                kept = [r for r in csv.DictReader(f)
                        if int(r["step"]) < step or (int(r["step"]) == step and r["name"].startswith("val/"))]
        self._write(kept, "w")

    def _write(self, rows: list[dict], mode: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = mode == "w" or not self.path.exists()
        with self.path.open(mode if not new else "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        rows = [{"step": step, "name": k, "value": float(v)} for k, v in metrics.items() if k != "epoch"]
        self._write(rows, "a")

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # the resolved config is written to config.yaml by the recipe
