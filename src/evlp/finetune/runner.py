"""The fine-tuning recipe, top to bottom: config -> task (data, model from the pretrained checkpoint) -> Lightning fit
with the best checkpoint kept -> the best weights evaluated -> run folder.

Run manual::

    evlp finetune --config fine_tuning/imagenet base_dir=/data model.model_path=/data/models/S-SMKE/model-...ckpt
    evlp finetune --config fine_tuning/imagenet ... model.linear_classifier=True        # linear evaluation
    evlp finetune --config fine_tuning/mrpc base_dir=/data model.model_path=...         # one GLUE task
    evlp finetune --config fine_tuning/retrieval_coco base_dir=/data model.model_path=...
    evlp finetune --config fine_tuning/mrpc ... resume=latest                           # continue after a stop

Outputs: ``<log_dir>/<run_name>/`` holds config.yaml, metrics.csv, TensorBoard events, results.json (the best
checkpoint's metrics and the protocol), curves.png and report.md. Checkpoints go to ``<model_path>/<run_name>/``:
``model-{step}-{val_loss:.4f}-val.ckpt`` is the best by the task's metric (the only one kept), ``last.ckpt`` the state
after the latest validation, which ``resume=latest`` continues from. Folders that hold an earlier run are continued
only with ``resume=``; otherwise the run is renamed ``<run_name>-2``, ... (``evlp.train.runs``).
"""

from __future__ import annotations

import importlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from evlp.config import save_config
from evlp.errors import EvlpError
from evlp.finetune.config import TASKS, task_family
from evlp.train.callbacks import BestCheckpoint, CSVLogger
from evlp.train.checkpoint import AtomicCheckpointIO, load_training_checkpoint
from evlp.train.recipe import resolve_precision
from evlp.train.report import plot_curves
from evlp.train.runs import claim_run_folders

log = logging.getLogger("evlp")

LAST = "last.ckpt"


@dataclass
class FinetuneTask:
    """What a task family builds for the runner (``evlp.finetune.<family>.build_task(cfg)``)."""

    module: L.LightningModule
    train_loader: torch.utils.data.DataLoader
    val_loaders: object  # a DataLoader or a list of them (MNLI: matched and mismatched)
    monitor: str  # the logged metric that picks the best checkpoint, e.g. "val/accuracy"
    headline: dict[str, str]  # the seed README's columns -> metric keys, e.g. {"F1": "val/f1"}
    summary: str  # the one line saying what was loaded from the pretrained checkpoint
    protocol: dict = field(default_factory=dict)  # dataset, split, sizes, resolution ... for results.json
    mode: str = "max"
    # Extra evaluation of the best weights after training (retrieval: the Karpathy test split), returning metrics.
    final_eval: Callable[[L.LightningModule], dict] | None = None


class RandomState(L.Callback):
    """Carries the random state (torch, CUDA, numpy, Python) in checkpoints, so a resumed run draws the same shuffle,
    augmentations and mixup as the uninterrupted one. A checkpoint is written after a validation, at an epoch's end;
    the state is restored when the next epoch starts, before its data iterator draws the loader seeds."""

    def __init__(self):
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        # numpy's state as plain Python values: checkpoints load with weights_only=True, which refuses numpy arrays.
        numpy_state = (kind, keys.tolist(), int(pos), int(has_gauss), float(cached))
        state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        self._pending = state

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is None:
            return
        torch.set_rng_state(self._pending["torch"])
        random.setstate(self._pending["python"])
        kind, keys, pos, has_gauss, cached = self._pending["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        if "cuda" in self._pending and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self._pending["cuda"])
        self._pending = None


def shuffle_as_ddp_does(loader: DataLoader, seed: int) -> DataLoader:
    """A shuffled training loader for one process, reshuffled each epoch as Lightning's DistributedSampler does under
    DDP (a permutation seeded by ``seed + epoch``), so that W processes with batch B see together, step by step,
    the batches one process with batch B*W sees. Other samplers are kept."""
    if not isinstance(loader.sampler, RandomSampler):
        return loader
    sampler = DistributedSampler(loader.dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, drop_last=loader.drop_last,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
                      persistent_workers=loader.persistent_workers, worker_init_fn=loader.worker_init_fn,
                      prefetch_factor=loader.prefetch_factor)


def build_task(cfg: DictConfig) -> FinetuneTask:
    if cfg.task not in TASKS:
        raise EvlpError(f"task={cfg.task!r} does not exist; expected one of {', '.join(TASKS)}")
    family = importlib.import_module(f"evlp.finetune.{task_family(cfg.task)}")
    return family.build_task(cfg)


def _resume_path(cfg: DictConfig, folder: Path) -> Path | None:
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":
        last = folder / LAST
        return last if last.is_file() else None
    path = Path(cfg.resume)
    if not path.is_file():
        raise EvlpError(f"resume={cfg.resume}: no such checkpoint; use resume=latest or the path of a .ckpt file")
    return path


FINETUNE_PANELS = [("loss", ["train/loss", "val/loss"]), ("learning rate", ["lr"])]


def run_finetune(cfg: DictConfig) -> dict:
    """Fine-tune, evaluate the best checkpoint, write the run folder; returns ``results.json``'s content."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    task = build_task(cfg)  # every input error surfaces here, before training
    run_dir, checkpoint_dir = claim_run_folders(cfg)
    resume_from = _resume_path(cfg, checkpoint_dir)
    log.info(task.summary)

    t = cfg.trainer
    # A module that optimises manually (retrieval's gradient cache) clips its gradients itself: Lightning refuses
    # Trainer(gradient_clip_val=...) with manual optimisation.
    manual = not task.module.automatic_optimization
    csv_logger = CSVLogger(run_dir / "metrics.csv")
    if cfg.resume is not None:  # this run's own log: drop what was logged after the checkpoint (all, if none)
        csv_logger.truncate_after(load_training_checkpoint(resume_from)["global_step"] if resume_from else 0)
    best = BestCheckpoint(checkpoint_dir, task.monitor, task.mode, last=LAST)
    callbacks = [best, RandomState(), LearningRateMonitor(logging_interval="step")]
    if t.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, min(t.log_every_n_steps, 10))))
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        precision=resolve_precision(t.precision),
        max_epochs=t.max_epochs, max_steps=t.max_steps,
        log_every_n_steps=t.log_every_n_steps, check_val_every_n_epoch=t.val_every_n_epochs,
        limit_train_batches=t.limit_train_batches, limit_val_batches=t.limit_val_batches, num_sanity_val_steps=0,
        gradient_clip_val=None if manual else t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        callbacks=callbacks,
        logger=[csv_logger, TensorBoardLogger(save_dir=str(cfg.log_dir), name=cfg.run_name, version="")],
        enable_checkpointing=False,  # BestCheckpoint writes them (atomically, the original's names)
        enable_progress_bar=t.progress_bar, enable_model_summary=False,
        plugins=[AtomicCheckpointIO()], default_root_dir=str(run_dir),
    )
    if trainer.is_global_zero:
        save_config(cfg, run_dir / "config.yaml")
    # Under DDP Lightning gives each process its DistributedSampler share; one process shuffles the same way.
    train_loader = task.train_loader if trainer.world_size > 1 else shuffle_as_ddp_does(task.train_loader, cfg.seed)
    trainer.fit(task.module, train_dataloaders=train_loader, val_dataloaders=task.val_loaders,
                ckpt_path=str(resume_from) if resume_from else None)
    if best.validated_step != trainer.global_step and trainer.global_step > 0:
        # Training stopped between validations (max_steps inside an epoch): validate the final weights too.
        trainer.validate(task.module, dataloaders=task.val_loaders, verbose=False)
    if best.best_path is None:
        raise EvlpError(f"{cfg.run_name}: no validation gave a finite {task.monitor} (the loss diverged, or nothing "
                        f"was trained), so there is no best checkpoint; check the lr and the data")

    # The reported numbers are the best checkpoint's, measured again on its weights (not read from the log).
    state = load_training_checkpoint(best.best_path)["state_dict"]
    task.module.load_state_dict(state, strict=True)
    # A separate trainer without loggers, so this measurement does not enter the curves as one more validation.
    evaluator = L.Trainer(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
                          precision=resolve_precision(t.precision), limit_val_batches=t.limit_val_batches,
                          logger=False, enable_checkpointing=False, enable_progress_bar=t.progress_bar,
                          enable_model_summary=False)
    measured = evaluator.validate(task.module, dataloaders=task.val_loaders, verbose=False)
    metrics = {k: float(v) for part in measured for k, v in part.items()}
    if task.final_eval is not None:
        metrics.update(task.final_eval(task.module))

    results = {}
    if trainer.is_global_zero:
        results = {
            "task": cfg.task, "family": task_family(cfg.task), "run_name": cfg.run_name,
            "headline": {name: metrics.get(key) for name, key in task.headline.items()},
            "metrics": metrics,
            "best": best.summary(),
            "parameters": sum(p.numel() for p in task.module.parameters()),
            "protocol": task.protocol, "source": task.summary, "steps": trainer.global_step,
        }
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        write_finetune_report(run_dir, results, [*FINETUNE_PANELS, ("validation", [task.monitor])])
    return results


def write_finetune_report(run_dir: Path, results: dict, panels) -> None:
    has_curves = plot_curves(run_dir / "metrics.csv", run_dir / "curves.png", panels)
    rows = ["| metric | value |", "|---|---:|"]
    rows += [f"| {k} | {v:.4g} |" for k, v in sorted(results["metrics"].items())]
    best = results["best"]
    lines = [
        f"# {results['run_name']}: {results['task']}", "",
        f"Best checkpoint by {best['monitor']} = {best['value']:.4g} at step {best['step']}: `{best['checkpoint']}`;",
        f"its metrics, measured again on its weights:", "", *rows, "",
        f"Started from: {results['source']}.", "",
        "Protocol: " + "; ".join(f"{k}: {v}" for k, v in results["protocol"].items()),
    ]
    if has_curves:
        lines += ["", "![training curves](curves.png)"]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
