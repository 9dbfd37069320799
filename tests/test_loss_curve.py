"""A pinned loss curve: the quickstart architecture trained for 20 steps on fixed data, through the real
``PretrainModule`` (teacher, both ITC levels, distillation with a memory bank that wraps around, AdamW with
warm-up + cosine) under Lightning, compared step by step to numbers stored below.

Every value the run depends on is set here, not read from ``quickstart.yaml`` or the config defaults, so that a
change to a packaged config leaves this test alone and a change to the S-SMKE math (the model, the losses, the
optimiser's parameter groups, the schedule) breaks it. The data are fixed tensors made here (uint8 images normalised on
the device as in training, token ids with padding), 4 batches of 32 pairs of 16 classes, cycled.

Tolerance: 1e-4 absolute. Runs with 1 and 2 CPU threads differ by up to 1e-6 here (float32 sums in another order,
amplified a little by Adam). Mutations of evlp's code (those of tests/test_reference_step.py) move the curve by, at
its largest step: dropping either ITC term 1.8, unmasked unwritten bank rows 1.5, detached student KD vectors 1.0,
detached ITC text keys 0.24, GELU before the fc1 CLS 0.04, one token type for both modalities 3.3e-4 (the token-type
scale starts at 1e-5), no fc_norm before the KD head 3.1e-4.

When the math changes on purpose, regenerate the numbers and paste them over ``EXPECTED`` (docs/testing.md):

    python -m tests.test_loss_curve        # prints EXPECTED for the code as it is now
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from evlp.config import RunConfig
from evlp.train.module import PretrainModule

STEPS, BATCH, BATCHES, TEXT_LEN = 20, 32, 4, 24

# The quickstart's architecture and optimisation, pinned. The memory bank is smaller than the quickstart's 4096 so
# that it fills and wraps around within the 20 steps (640 pushes into 256 rows).
PINNED = {
    "seed": 0,
    "model": {
        "embed_dim": 128, "depth": 2, "num_heads": 4, "mlp_ratio": 4.0, "dropout": 0.0,
        "shared_layer_scale": 0.2, "tte_layer_scale": 1e-5,
        "image_tower": {"kind": "data2vec2", "path": None, "depth": 2, "width": 128, "num_heads": 4,
                        "img_size": 64, "patch_size": 16},
        "text_tower": {"kind": "bert", "path": None, "depth": 2, "width": 128, "num_heads": 4, "max_positions": 32,
                       "dropout": 0.1},
        "teacher": {"kind": "beitv2", "path": None, "depth": 2, "width": 128, "num_heads": 4, "img_size": 64,
                    "patch_size": 16},
    },
    "loss": {"memory_bank_size": 256, "kd_temperature": 0.07, "init_temperature": 0.07, "max_logit_scale": 100.0},
    "data": {"batch_size": BATCH, "max_text_len": TEXT_LEN, "image_size": 64},
    "optim": {"lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.01, "warmup_fraction": 0.1,
              "fused": False},
    "trainer": {"precision": "32-true", "accumulate_grad_batches": 1, "gradient_clip_val": None},
}

# (train/loss, train/kd_loss, train/itc_loss) after each of the 20 steps.
EXPECTED = [
    (7.019915, 3.514310, 3.505604),
    (7.648737, 4.151644, 3.497094),
    (8.033094, 4.535008, 3.498085),
    (8.332079, 4.827688, 3.504390),
    (8.449463, 4.966799, 3.482664),
    (8.596598, 5.090050, 3.506547),
    (8.596546, 5.100031, 3.496515),
    (8.558562, 5.059244, 3.499318),
    (8.605530, 5.111210, 3.494319),
    (8.508628, 5.034349, 3.474278),
    (8.533272, 5.043075, 3.490197),
    (8.420890, 4.973863, 3.447027),
    (8.415388, 4.977613, 3.437774),
    (8.394001, 4.956555, 3.437445),
    (8.373798, 4.970305, 3.403493),
    (8.260136, 4.912005, 3.348131),
    (8.345222, 4.946264, 3.398958),
    (8.281471, 4.916602, 3.364869),
    (8.306443, 4.947006, 3.359437),
    (8.271885, 4.905076, 3.366809),
]
TOLERANCE = 1e-4


def fixed_batches() -> list[dict]:
    """Pairs that can be learned: each shows one of 16 classes, the image as a class colour over noise, the caption
    as the class's two words among random ones."""
    g = torch.Generator().manual_seed(1234)
    colours = torch.randint(0, 256, (16, 3), generator=g)
    words = torch.randint(1000, 30000, (16, 2), generator=g)
    batches = []
    for _ in range(BATCHES):
        classes = torch.randint(0, 16, (BATCH,), generator=g)
        lengths = torch.randint(6, TEXT_LEN + 1, (BATCH,), generator=g)
        padding = torch.arange(TEXT_LEN)[None, :] >= lengths[:, None]
        text = torch.randint(1000, 30000, (BATCH, TEXT_LEN), generator=g)
        text[:, 0], text[:, 1:3] = 101, words[classes]  # [CLS], the class's words
        text = text.masked_fill(padding, 0)
        noise = torch.randint(-40, 41, (BATCH, 3, 64, 64), generator=g)
        images = (colours[classes][:, :, None, None] + noise).clamp(0, 255).to(torch.uint8)
        batches.append({"image": images, "text": text, "padding_mask": padding})
    return batches


class Record(L.Callback):
    def __init__(self):
        self.rows: list[tuple[float, float, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        metrics = trainer.callback_metrics
        self.rows.append((float(outputs["loss"]), float(metrics["train/kd_loss"]), float(metrics["train/itc_loss"])))


def loss_curve() -> list[tuple[float, float, float]]:
    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), PINNED)
    L.seed_everything(cfg.seed, verbose=False)
    module = PretrainModule(cfg, load_weights=False)
    batches = fixed_batches()
    loader = torch.utils.data.DataLoader([batches[i % BATCHES] for i in range(STEPS)], batch_size=None)
    record = Record()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=cfg.trainer.precision, max_steps=STEPS,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[record])
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == STEPS and int(module.kd_loss.bank_filled) == 256
    return record.rows


def test_the_quickstart_loss_curve_is_pinned():
    got = loss_curve()
    assert len(got) == len(EXPECTED) == STEPS
    for step, (row, expected) in enumerate(zip(got, EXPECTED)):
        for name, value, want in zip(("loss", "kd_loss", "itc_loss"), row, expected):
            assert value == pytest.approx(want, abs=TOLERANCE), (
                f"step {step} train/{name} = {value:.6f}, pinned {want:.6f}: if the S-SMKE math changed on purpose, "
                f"regenerate EXPECTED with `python -m tests.test_loss_curve` (docs/testing.md)")


if __name__ == "__main__":
    print("EXPECTED = [")
    for row in loss_curve():
        print("    (" + ", ".join(f"{v:.6f}" for v in row) + "),")
    print("]")
