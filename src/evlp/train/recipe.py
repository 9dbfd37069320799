"""The pretraining recipe, top to bottom: config -> data -> model -> Lightning fit -> evaluation -> run folder.

Run manual::

    evlp train                                        # the embedded quickstart on CPU (a few minutes)
    evlp train --config training/s_smke base_dir=/data          # the thesis recipe on every visible GPU
    torchrun --nproc_per_node 8 -m evlp.cli train --config training/s_smke base_dir=/data trainer.devices=8
    srun evlp train --config training/s_smke base_dir=/data trainer.num_nodes=2 trainer.devices=4   # SLURM
    evlp train --config training/s_smke base_dir=/data resume=latest               # continue after a stop

Outputs: ``<log_dir>/<run_name>/`` holds config.yaml, metrics.csv, TensorBoard events, results.json, curves.png,
retrieval_examples.png and report.md; checkpoints go to ``<model_path>/<run_name>/model-{step}-{loss:.4f}-train.ckpt``
(the newest, for resume) and, with validation data, ``model-{step}-{val_loss:.4f}-val.ckpt`` (the lowest ``val/loss``
so far, as the original kept).
Folders that hold an earlier run are continued only with ``resume=``; otherwise the run is renamed ``<run_name>-2``,
... (``evlp.train.runs``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from evlp.config import save_config
from evlp.data.shards import make_loader
from evlp.flops import pair_flops, peak_flops
from evlp.models.build import check_weight_files
from evlp.train.callbacks import (BestCheckpoint, CSVLogger, DataPosition, SkippedSamples, StepCheckpoint,
                                  Throughput)
from evlp.train.checkpoint import AtomicCheckpointIO, checked_resume_state, init_student_from, resolve_resume
from evlp.train.data import build_datasets, build_tokenizer, prepare_run_data
from evlp.train.eval_callbacks import benchmark_callbacks
from evlp.train.evaluate import evaluate_pretrained
from evlp.train.module import TEACHER_PREFIX, PretrainModule
from evlp.train.report import write_report
from evlp.train.runs import claim_run_folders

log = logging.getLogger("evlp")


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def several_processes(t: DictConfig) -> bool:
    """Whether ``cfg.trainer`` asks for more than one process (several GPUs, CPU processes or nodes)."""
    if t.num_nodes > 1:
        return True
    devices = t.devices
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices) > 1
    if isinstance(devices, str) and "," in devices:  # GPU indices, "0,1"
        return len([d for d in devices.split(",") if d.strip()]) > 1
    if str(devices) in ("auto", "-1"):  # every visible GPU; one process on CPU
        return t.accelerator != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() > 1
    return int(devices) > 1


def build_strategy(cfg: DictConfig):
    t = cfg.trainer
    if t.strategy != "auto":
        return t.strategy
    if several_processes(t):
        from lightning.pytorch.strategies import DDPStrategy

        # The memory bank is a buffer written identically on every rank: re-broadcasting it (DDP's default) would
        # send ~200 MB from rank 0 every step for nothing.

        return DDPStrategy(gradient_as_bucket_view=True, static_graph=True, broadcast_buffers=False)
    return "auto"


def run_pretraining(cfg: DictConfig, extra_callbacks=()) -> dict:
    """Train, evaluate and write the run folder; returns the content of ``results.json`` (rank 0)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    check_weight_files(cfg.model)  # fail before any work on a missing weight file
    run_dir, checkpoint_dir = claim_run_folders(cfg)
    resume_from = resolve_resume(cfg.resume, checkpoint_dir)

    run_data = prepare_run_data(cfg)
    hf_tokenizer = build_tokenizer(cfg, run_data)
    text_tokenizer, train_set, val_set = build_datasets(cfg, run_data, hf_tokenizer)
    module = PretrainModule(cfg, tokenizer=hf_tokenizer)
    resumed = checked_resume_state(resume_from, module, TEACHER_PREFIX) if resume_from else None
    if cfg.init_from is not None:  # a resumed run's checkpoint holds its weights already
        line = (f"init_from={cfg.init_from} ignored: resuming from {resume_from}" if resumed
                else init_student_from(module.student, cfg.init_from))
        if rank_zero_only.rank == 0:
            print(line, file=sys.stderr)
    if cfg.trainer.grad_checkpointing:
        module.student.set_grad_checkpointing()
    if cfg.trainer.compile:
        module.student.compile()
        module.teacher.compile()

    t = cfg.trainer
    csv_logger = CSVLogger(run_dir / "metrics.csv")
    if cfg.resume is not None:  # this run's own log: drop what was logged after the checkpoint (all, if none)
        csv_logger.truncate_after(resumed["global_step"] if resumed else 0)
    checkpoints = StepCheckpoint(checkpoint_dir, t.checkpoint_every_n_steps, t.keep_last_checkpoints)
    skipped = SkippedSamples(train_set)
    best = BestCheckpoint(checkpoint_dir, "val/loss", "min") if val_set is not None else None
    callbacks = [
        DataPosition(train_set),  # before StepCheckpoint: a checkpoint must include the batch it was saved after
        skipped,
        checkpoints,
        *([best] if best is not None else []),
        Throughput(pair_flops(module.student, module.teacher, cfg.data.max_text_len).total, peak_flops(t.accelerator)),
        LearningRateMonitor(logging_interval="step"),
        *benchmark_callbacks(cfg, text_tokenizer, val_set),
        *extra_callbacks,
    ]
    if t.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, min(t.log_every_n_steps, 10))))
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(cfg),
        precision=resolve_precision(t.precision),
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_every_n_steps,
        check_val_every_n_epoch=None if t.val_every_n_steps else 1,
        limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=0,
        gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        callbacks=callbacks,
        logger=[csv_logger, TensorBoardLogger(save_dir=str(cfg.log_dir), name=cfg.run_name, version="")],
        enable_checkpointing=False,  # StepCheckpoint writes the checkpoints (atomically, original names)
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # the shards split themselves across ranks
        default_root_dir=str(run_dir),
    )
    if trainer.is_global_zero:
        save_config(cfg, run_dir / "config.yaml")
    workers = cfg.data.num_workers
    trainer.fit(
        module,
        train_dataloaders=make_loader(train_set, workers, pin_memory=torch.cuda.is_available()),
        val_dataloaders=make_loader(val_set, min(workers, 2)) if val_set is not None else None,
        ckpt_path=str(resume_from) if resume_from else None,
    )

    results = {}
    if trainer.is_global_zero:
        device = module.device
        module.student.eval()
        results = evaluate_pretrained(cfg, module.student, text_tokenizer, val_set, device, run_dir)
        results["checkpoint"] = str(checkpoints.last_path) if checkpoints.last_path else None
        if best is not None:
            results["best_checkpoint"] = best.summary()  # the lowest val/loss; null values if no validation ran
        results["steps"] = trainer.global_step
        results["skipped_samples"] = skipped.totals  # by reason, all ranks: {} when every sample was usable
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        write_report(cfg, run_dir, results)
    return results


def quiet_third_party_logs() -> None:
    """Silence Lightning notices that are expected here and would bury the progress bar."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # the frozen teacher, on purpose
    warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")  # shards split themselves
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)
