"""Lightning module for S-SMKE pretraining: student + frozen teacher + losses, one step read top to bottom.

    target = normalize(teacher(image).CLS)                       # no grad, teacher always in eval mode
    img, txt = student(image), student(text)
    kd  = ContrastiveDistillation([img.kd, txt.kd] vs [target of the global batch ‖ memory bank], scale 1/0.07)
    itc = ½ (CLIP(img.x_interm, txt.x_interm, s0) + CLIP(img.x, txt.x, s1))    # s0, s1 learnable, clamped ≤ 100
    loss = kd + itc

Validation uses in-batch KD (no bank) and logs ``val/loss`` = KD as the original did, plus the ITC terms. Every
process validates on the whole validation set (the shards are not split for evaluation), so validation losses use
the process's own batch and do not gather: a gather would repeat each batch W times among the candidates.
The teacher is never saved: checkpoints hold the student, the memory bank and the training state only.
"""

from __future__ import annotations


import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from evlp.data.transforms import normalize_images
from evlp.losses import ContrastiveDistillationLoss, ContrastiveLoss, fp32_or_wider
from evlp.models.build import build_student, build_teacher
from evlp.train.optim import build_optimizer, scaled_lr, warmup_cosine

TEACHER_PREFIX = "teacher."


class PretrainModule(L.LightningModule):
    def __init__(self, cfg: DictConfig, tokenizer=None, load_weights: bool = True):
        super().__init__()
        self.cfg = cfg
        self.save_hyperparameters({"cfg": OmegaConf.to_container(cfg, resolve=True)})
        self.teacher = build_teacher(cfg.model.teacher, load_weights)
        self.student = build_student(
            cfg.model, kd_dim=self.teacher.width, init_temperature=cfg.loss.init_temperature,
            tokenizer=tokenizer, load_weights=load_weights,
        )
        self.itc_loss = ContrastiveLoss()
        self.kd_loss = ContrastiveDistillationLoss(self.teacher.width, cfg.loss.memory_bank_size)
        # Fixed KD scale: a buffer, not a parameter (the original's Parameter never reached the optimizer).
        self.register_buffer("kd_logit_scale", torch.tensor(1 / cfg.loss.kd_temperature), persistent=False)
        # Sticky on-device flag so NaN/inf is noticed without a host sync every step (checked at log/save time).
        self.register_buffer("nonfinite", torch.zeros((), dtype=torch.bool), persistent=False)

    # -- the step -----------------------------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # Training images come from the loader as uint8 (evlp.data.transforms.TrainTransform(normalize=False)):
        # normalised here, on the device, before any callback or step sees them. Float images pass unchanged.
        images = batch.get("image") if isinstance(batch, dict) else None
        if isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
            images = normalize_images(images)
            trainer = getattr(self, "_trainer", None)
            if trainer is not None:  # what the precision plugin does to float inputs before the transfer (*-true)
                images = trainer.precision_plugin.convert_input(images)
            batch["image"] = images
        return batch

    def _losses(self, batch: dict, train: bool) -> dict:
        images, text, padding_mask = batch["image"], batch["text"], batch["padding_mask"]
        with torch.no_grad():
            target = F.normalize(fp32_or_wider(self.teacher(images)), dim=-1)  # (B, Dt)
        self.student.clamp_logit_scales(self.cfg.loss.max_logit_scale)
        img, txt = self.student(images, text, padding_mask)
        kd = self.kd_loss(
            F.normalize(fp32_or_wider(img["kd"]), dim=-1), F.normalize(fp32_or_wider(txt["kd"]), dim=-1), target,
            self.kd_logit_scale, use_memory_bank=train, gather=train,
        )
        scales = self.student.logit_scales.exp()
        itc_interm = self.itc_loss(img["x_interm"], txt["x_interm"], scales[0], gather=train)
        itc = self.itc_loss(img["x"], txt["x"], scales[1], gather=train)
        itc_loss = (itc_interm["loss"] + itc["loss"]) / 2
        return {
            "loss": kd["loss"] + itc_loss if train else kd["loss"],
            "kd_loss": kd["loss"], "kd_image_loss": kd["image_loss"], "kd_text_loss": kd["text_loss"],
            "kd_acc": (kd["image_acc"] + kd["text_acc"]) / 2,
            "itc_loss": itc_loss,
            "x_itc_acc": (itc["image_acc"] + itc["text_acc"]) / 2,
            "x_interm_itc_acc": (itc_interm["image_acc"] + itc_interm["text_acc"]) / 2,
            "logit_scale": scales[1].detach(),
        }

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self._losses(batch, train=True)
        self.nonfinite |= ~torch.isfinite(out["loss"].detach())
        batch_size = batch["image"].shape[0]
        # Means over the global batch, as the original logged them (one process holds only its slice).
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=batch_size, sync_dist=True)
        self.log_dict({f"train/{k}": v for k, v in out.items() if k != "loss"}, batch_size=batch_size,
                      sync_dist=True)
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self._losses(batch, train=False)
        self.log_dict({f"val/{k}": v for k, v in out.items()}, batch_size=batch["image"].shape[0], sync_dist=True)

    # -- optimisation -------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.cfg.optim
        global_batch = self.cfg.data.batch_size * self.trainer.world_size * self.trainer.accumulate_grad_batches
        lr = o.lr if o.lr is not None else scaled_lr(o.base_lr, global_batch)
        optimizer = build_optimizer(self.student, lr, o.betas, o.eps, o.weight_decay, o.fused)
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, o.warmup_fraction))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": "lr"}}

    # -- the teacher stays out of checkpoints -------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith(TEACHER_PREFIX)}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # Checkpoints carry no teacher: keep the one built from its own weight file, load everything else strictly.
        state_dict = dict(state_dict)
        for key, value in self.teacher.state_dict().items():
            state_dict.setdefault(TEACHER_PREFIX + key, value)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
