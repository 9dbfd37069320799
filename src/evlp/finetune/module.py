"""What every fine-tuning LightningModule shares: AdamW over its parameter groups, the warm-up schedule, and the
corpus-level gathering of validation outputs.

A task module subclasses :class:`FinetuneModule`, implements ``training_step`` and ``validation_step`` (which returns
or stores per-batch outputs) and logs its metrics, computed once over the whole evaluation set, in
``on_validation_epoch_end``. Only ``param_groups`` needs overriding for layer-wise lr decay.
"""

from __future__ import annotations

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from evlp.train.optim import SCHEDULES, param_groups


class FinetuneModule(L.LightningModule):
    def __init__(self, cfg: DictConfig, /, **hparams):  # positional-only: `cfg=` is free for an hparam
        """``hparams``: more plain containers to keep in checkpoints, e.g. ``cfg=`` the pretraining run's config,
        which ``evlp eval`` rebuilds a fine-tuned S-SMKE student from."""
        super().__init__()
        self.cfg = cfg
        # Plain containers only, so checkpoints load with weights_only=True.
        self.save_hyperparameters({"finetune_cfg": OmegaConf.to_container(cfg, resolve=True), **hparams})

    def param_groups(self) -> list[dict]:
        """AdamW groups; the default is one lr for all with decay / no-decay split."""
        return param_groups(self, self.cfg.optim.weight_decay)

    def configure_optimizers(self):
        o = self.cfg.optim
        groups = self.param_groups()
        for group in groups:
            group["lr"] = o.lr * group.get("lr_scale", 1.0)
        fused = o.fused if o.fused is not None else torch.cuda.is_available() and self.device.type == "cuda"
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused)
        if o.schedule not in SCHEDULES:
            from evlp.errors import EvlpError

            raise EvlpError(f"optim.schedule={o.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        total = int(self.trainer.estimated_stepping_batches)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, SCHEDULES[o.schedule](total, o.warmup_fraction))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": "lr"}}

    def gather_outputs(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a per-process tensor of validation outputs over all processes (rows in rank order)."""
        if self.trainer is None or self.trainer.world_size == 1:
            return tensor
        gathered = self.all_gather(tensor)  # (W, N, ...)
        return gathered.flatten(0, 1)

    def gather_samples(self, index: torch.Tensor, *outputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-sample validation outputs of every process, each sample once, in sample-index order:
        ``(index, *outputs)``, so corpus-level metrics see the whole set exactly once."""
        index = self.gather_outputs(index)
        rows = first_of_each(index)
        return (index[rows], *(self.gather_outputs(t)[rows] for t in outputs))


def first_of_each(index: torch.Tensor) -> torch.Tensor:
    """Rows that keep the first occurrence of each sample index, in index order: a DistributedSampler pads the last
    ranks with repeated samples, which must not count twice."""
    order = torch.argsort(index, stable=True)
    keep = torch.ones_like(order, dtype=torch.bool)
    keep[1:] = index[order][1:] != index[order][:-1]
    return order[keep]
