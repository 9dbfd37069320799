"""``evlp bench train``: time full S-SMKE training steps on synthetic inputs and compare with open_clip.

One timed step is what ``evlp train`` runs per batch (``PretrainModule.training_step`` + Lightning's optimisation):

    with autocast(bf16 on GPU):        teacher forward (no grad) -> student forward -> KD (memory bank) + 2 x ITC
    loss.backward(); AdamW.step(); zero_grad()

built from the config with random weights (``load_weights=False``) and the config's switches (``trainer.precision``,
``trainer.compile``, ``trainer.grad_checkpointing``). ``--vs open_clip`` builds an ``open_clip.CLIP`` with towers read
off the built student (ViT of the same patch size, width, depth, heads and MLP; text transformer of the same width,
depth, heads, vocabulary and sequence length; no teacher, no shared block) and times its step (forward, ``ClipLoss``,
backward, the same AdamW) on the same batch. The two are timed alternately in one process (ABBA order), so machine
noise hits both alike; each figure is the median over the timed steps.

Work is counted analytically (``evlp.flops``), with the same formula for both models; their ratio of achieved FLOP/s
says which step uses the hardware better, independent of how much work each model does per pair.
"""

from __future__ import annotations

import abc
import contextlib
import math
import resource
import statistics
import sys
import time
from typing import Callable

import torch
from omegaconf import DictConfig
from torch import nn

from evlp.errors import EvlpError
from evlp.flops import PairFlops, blocks_flops, pair_flops, patch_embed_flops, peak_flops_for
from evlp.train.module import PretrainModule
from evlp.train.optim import build_optimizer, scaled_lr

PRECISIONS = {"bf16-mixed": torch.bfloat16, "32-true": None, "32": None}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The config's ``trainer.precision`` as the recipe resolves it: ``auto`` is bf16-mixed on GPU, fp32 on CPU."""
    if precision == "auto":
        precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    if precision not in PRECISIONS:
        raise EvlpError(f"trainer.precision={precision} is not benchmarked; use one of auto, {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def synthetic_batch(cfg: DictConfig, batch_size: int, vocab_size: int, device: torch.device, seed: int = 0,
                    cls_id: int = 101, pad_id: int = 0) -> dict:
    """Random images and captions of the config's shapes: ``[CLS]`` + random word pieces, then padding to
    ``max_text_len`` after a random length of 4 tokens to full, so the attention masks are real. The default ids are
    BERT's [CLS] and [PAD]."""
    g = torch.Generator().manual_seed(seed)
    size, length = cfg.data.image_size, cfg.data.max_text_len
    lengths = torch.randint(min(4, length), length + 1, (batch_size, 1), generator=g)
    padding_mask = torch.arange(length) >= lengths  # (B, L), True at padding
    text = torch.randint(cls_id + 1, vocab_size, (batch_size, length), generator=g).masked_fill(padding_mask, pad_id)
    text[:, 0] = cls_id
    batch = {"image": torch.randn(batch_size, 3, size, size, generator=g), "text": text, "padding_mask": padding_mask}
    return {k: v.to(device) for k, v in batch.items()}


def state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes a model holds between steps: parameters, buffers and optimizer state (grads are freed by zero_grad)."""
    tensors = [*module.parameters(), *module.buffers()]
    tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


class TrainStep(abc.ABC):
    """A model, its optimizer and one training step: ``step(batch)``. Subclasses build the model and the loss."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    flops: PairFlops

    def __init__(self, cfg: DictConfig, device: torch.device, dtype: torch.dtype | None):
        self.cfg, self.device, self.dtype = cfg, device, dtype

    def _optimizer(self, model: nn.Module, batch_size: int) -> torch.optim.Optimizer:
        o = self.cfg.optim
        lr = o.lr if o.lr is not None else scaled_lr(o.base_lr, batch_size)
        return build_optimizer(model, lr, o.betas, o.eps, o.weight_decay, o.fused)

    @abc.abstractmethod
    def loss(self, batch: dict) -> torch.Tensor:
        """The training loss of one batch (each benchmarked model defines its own step)."""

    def step(self, batch: dict) -> None:
        # Lightning's bf16-mixed: autocast around the forward and the loss only; backward and AdamW outside it.
        autocast = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()
        with autocast:
            loss = self.loss(batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class EvlpStep(TrainStep):
    name = "evlp"

    def __init__(self, cfg: DictConfig, device: torch.device, dtype: torch.dtype | None, batch_size: int,
                 compile_backend: str = "inductor", tokenizer=None):
        super().__init__(cfg, device, dtype)
        self.module = PretrainModule(cfg, tokenizer=tokenizer, load_weights=False).to(device).train()
        self.model = self.module
        self.flops = pair_flops(self.module.student, self.module.teacher, cfg.data.max_text_len)
        # The same switches, in the same order, as evlp.train.recipe.
        if cfg.trainer.grad_checkpointing:
            self.module.student.set_grad_checkpointing()
        if cfg.trainer.compile:
            self.module.student.compile(backend=compile_backend)
            self.module.teacher.compile(backend=compile_backend)
        self.optimizer = self._optimizer(self.module.student, batch_size)

    @property
    def vocab_size(self) -> int:
        return self.module.student.text_tower.vocab_size

    def loss(self, batch: dict) -> torch.Tensor:
        # PretrainModule.training_step without self.log (there is no Trainer here), non-finite flag included.
        loss = self.module._losses(batch, train=True)["loss"]
        self.module.nonfinite |= ~torch.isfinite(loss.detach())
        return loss


def matching_open_clip(student: nn.Module, text_len: int, image_size: int) -> nn.Module:
    """An ``open_clip.CLIP`` whose towers have the shapes of ``student``'s towers (the shared block has no
    counterpart; its width becomes the embedding width)."""
    import open_clip

    image, text = student.image_tower, student.text_tower
    block, bert = image.blocks[0], text.bert.config
    vision_cfg = open_clip.CLIPVisionCfg(
        layers=len(image.blocks), width=image.width, head_width=image.width // block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / image.width, patch_size=image.patch_embed.patch_size[0],
        image_size=image_size,
    )
    text_cfg = open_clip.CLIPTextCfg(
        context_length=text_len, vocab_size=bert.vocab_size, width=bert.hidden_size,
        heads=bert.num_attention_heads, layers=text.depth, mlp_ratio=bert.intermediate_size / bert.hidden_size,
    )
    return open_clip.CLIP(embed_dim=student.embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg)


def open_clip_flops(model: nn.Module, text_len: int) -> PairFlops:
    """``evlp.flops``' formula applied to an open_clip CLIP: patch embedding + blocks of both towers, and the two
    projections, which open_clip applies to the pooled token only."""
    visual = model.visual
    patches = visual.grid_size[0] * visual.grid_size[1]
    projections = [visual.proj, model.text_projection]
    return PairFlops(student={
        "image_tower": patch_embed_flops(visual.conv1, patches)
                       + blocks_flops(visual.transformer.resblocks, patches + 1, visual.transformer.width),
        "text_tower": blocks_flops(model.transformer.resblocks, text_len, model.transformer.width),
        "projections": sum(2 * (p.weight if isinstance(p, nn.Linear) else p).numel() for p in projections),
    })


class OpenClipStep(TrainStep):
    name = "open_clip"

    def __init__(self, cfg: DictConfig, device: torch.device, dtype: torch.dtype | None, batch_size: int,
                 student: nn.Module, compile_backend: str = "inductor"):
        super().__init__(cfg, device, dtype)
        import open_clip

        self.model = matching_open_clip(student, cfg.data.max_text_len, cfg.data.image_size).to(device).train()
        self.flops = open_clip_flops(self.model, cfg.data.max_text_len)
        self.clip_loss = open_clip.ClipLoss()
        if cfg.trainer.grad_checkpointing:
            self.model.set_grad_checkpointing()
        if cfg.trainer.compile:
            self.model.compile(backend=compile_backend)
        self.optimizer = self._optimizer(self.model, batch_size)

    def loss(self, batch: dict) -> torch.Tensor:
        image_features, text_features, logit_scale = self.model(batch["image"], batch["text"])
        return self.clip_loss(image_features, text_features, logit_scale)

    def step(self, batch: dict) -> None:
        super().step(batch)
        with torch.no_grad():  # open_clip_train clamps after every step, as evlp does before it
            self.model.logit_scale.clamp_(0, math.log(100))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(models: list[TrainStep], batch: dict, steps: int, warmup: int) -> tuple[dict, dict]:
    """Warm up, then time ``steps`` steps of each model, alternating in ABBA order so that neither model always runs
    right after the other. -> ({name: [seconds]}, {name: peak bytes on CUDA during its timed steps})."""
    device = models[0].device
    for _ in range(warmup):
        for m in models:
            m.step(batch)
    _sync(device)
    times = {m.name: [] for m in models}
    peaks = {m.name: 0 for m in models}
    for i in range(steps):
        for m in (models if i % 2 == 0 else models[::-1]):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            m.step(batch)
            _sync(device)
            times[m.name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[m.name] = max(peaks[m.name], torch.cuda.max_memory_allocated(device))
    return times, peaks


def figures(model: TrainStep, seconds: list[float], batch_size: int, peak_bytes: float, peak: float | None) -> dict:
    step_s = statistics.median(seconds)
    pairs_per_s = batch_size / step_s
    achieved = pairs_per_s * model.flops.total  # FLOP/s
    return {
        "pairs_per_s": pairs_per_s,
        "step_ms": 1e3 * step_s,
        "gflops_per_pair": model.flops.gflops(),
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
        "peak_mem_gb": peak_bytes / 1e9,
    }


def resolve_device(device: str | None) -> torch.device:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvlpError("--device cuda: no CUDA device is visible to PyTorch")
    return device


def build_evlp_step(cfg: DictConfig, device: torch.device, dtype: torch.dtype | None, batch_size: int,
                    compile_backend: str) -> tuple[EvlpStep, dict]:
    """The evlp step with random weights (seeded by the config) and a synthetic batch of ``batch_size`` for it."""
    torch.manual_seed(cfg.seed)
    # The quickstart's text tower is sized by its own small vocabulary; other random towers get BERT's.
    from evlp.info import data_tokenizer

    tokenizer = data_tokenizer(cfg)
    evlp = EvlpStep(cfg, device, dtype, batch_size, compile_backend, tokenizer)
    ids = {} if tokenizer is None else {"cls_id": tokenizer.cls_token_id, "pad_id": tokenizer.pad_token_id}
    return evlp, synthetic_batch(cfg, batch_size, evlp.vocab_size, device, cfg.seed, **ids)


def run_bench(cfg: DictConfig, config_name: str, batch_size: int | None = None, steps: int = 20, warmup: int = 5,
              device: str | None = None, vs: str | None = None, compile_backend: str = "inductor") -> dict:
    """Build, time and count; returns the JSON-ready result (see the module docstring)."""
    device = resolve_device(device)
    if steps < 1 or warmup < 0:
        raise EvlpError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    batch_size = batch_size or cfg.data.batch_size
    dtype = autocast_dtype(cfg.trainer.precision, device)
    evlp, batch = build_evlp_step(cfg, device, dtype, batch_size, compile_backend)
    models: list[TrainStep] = [evlp]
    if vs == "open_clip":
        try:
            models.append(OpenClipStep(cfg, device, dtype, batch_size, evlp.module.student, compile_backend))
        except ImportError:
            raise EvlpError("--vs open_clip needs open_clip_torch (pip install -e '.[test]')") from None
    times, peaks = time_steps(models, batch, steps, warmup)

    if device.type == "cuda":
        device_name, peak = torch.cuda.get_device_name(device), peak_flops_for(torch.cuda.get_device_name(device))
        # Both models live in memory together: a model's own peak leaves out what the other holds between steps.
        held = {m.name: state_bytes(m.model, m.optimizer) for m in models}
        own_peak = {m.name: peaks[m.name] - sum(b for n, b in held.items() if n != m.name) for m in models}
    else:
        device_name, peak = "cpu", None
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        own_peak = {m.name: rss for m in models}  # the process's peak: not separable per model on CPU

    t = cfg.trainer
    result = {
        "config": config_name, "device": device_name, "batch_size": batch_size,
        "precision": "bf16-mixed" if dtype is not None else "32-true", "compile": bool(t.compile),
        "grad_checkpointing": bool(t.grad_checkpointing), "steps": steps, "warmup": warmup,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        **figures(evlp, times["evlp"], batch_size, own_peak["evlp"], peak),
    }
    if vs == "open_clip":
        other = figures(models[1], times["open_clip"], batch_size, own_peak["open_clip"], peak)
        other["flops_ratio"] = result["achieved_tflops"] / other["achieved_tflops"]
        result["open_clip"] = other
    return result


def largest_batch(peak_at: Callable[[int], float | None], start: int, limit: int, multiple: int,
                  deadline: float) -> dict:
    """The largest batch size that fits: ``peak_at(batch)`` runs steps at that size and returns their peak memory
    in bytes, or None when it ran out of memory. Doubles from ``start`` until a size does not fit (or reaches
    ``limit``), then bisects between the largest size that fit and the smallest that did not, to a multiple of
    ``multiple``. No probe starts after ``deadline`` (``time.monotonic()``); ``complete`` says whether the answer
    is exact to ``multiple`` (or is ``limit``)."""
    fit, failed, probes = None, None, []

    def fits(batch: int) -> bool:
        peak = peak_at(batch)
        probes.append({"batch_size": batch, "fits": peak is not None, "peak_mem_gb": peak / 1e9 if peak else None})
        return peak is not None

    batch, complete = start, False
    while time.monotonic() < deadline:
        if not fits(batch):
            failed = batch
            break
        fit = batch
        if batch >= limit:
            complete = True
            break
        batch = min(2 * batch, limit)
    while failed is not None:
        low = fit or 0
        middle = (low + failed) // 2 // multiple * multiple
        if middle <= low:  # the two are within one multiple: done
            complete = True
            break
        if time.monotonic() >= deadline:
            break
        if fits(middle):
            fit = middle
        else:
            failed = middle
    return {"largest_fit": fit, "smallest_failed": failed, "complete": complete, "probes": probes}


def run_max_batch(cfg: DictConfig, config_name: str, start: int = 256, limit: int | None = None, multiple: int = 32,
                  time_limit: float = 60.0, steps: int = 2, device: str | None = None,
                  compile_backend: str = "inductor") -> dict:
    """``evlp bench max-batch``: the largest batch of the config's training step that fits in GPU memory (see
    ``largest_batch``); each probe runs ``steps`` full steps (the first creates AdamW's state) on one model built
    once. On CPU nothing stops an allocation short of the machine's memory, so ``limit`` is required there."""
    device = resolve_device(device)
    if device.type == "cpu" and limit is None:
        raise EvlpError("bench max-batch on CPU needs --limit: only a GPU reports running out of memory")
    if min(start, multiple, steps) < 1 or time_limit <= 0 or (limit is not None and limit < start):
        raise EvlpError("bench max-batch needs --start, --multiple, --steps >= 1, --time-limit > 0 and "
                        "--limit >= --start")
    deadline = time.monotonic() + time_limit
    dtype = autocast_dtype(cfg.trainer.precision, device)
    # Larger batches repeat these rows on the device: drawing thousands of random images on the CPU takes seconds.
    evlp, rows = build_evlp_step(cfg, device, dtype, start, compile_backend)

    def peak_at(batch_size: int) -> float | None:
        batch, peak = None, None
        try:
            batch = {k: v[torch.arange(batch_size, device=device) % start] for k, v in rows.items()}
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(steps):
                evlp.step(batch)
            _sync(device)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
            else:
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's; Linux reports KiB
        except torch.cuda.OutOfMemoryError:
            pass
        finally:  # whatever the failed step left behind goes before the next probe
            del batch
            evlp.optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        # One line per probe as it ends, so a run cut short still tells what it found.
        print(f"max-batch: {batch_size} " + (f"fits, peak {peak / 1e9:.2f} GB" if peak else "does not fit"),
              file=sys.stderr, flush=True)
        return peak

    search = largest_batch(peak_at, start, limit or 1 << 20, multiple, deadline)
    cuda = device.type == "cuda"
    t = cfg.trainer
    return {
        "config": config_name, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "memory_gb": torch.cuda.get_device_properties(device).total_memory / 1e9 if cuda else None,
        "precision": "bf16-mixed" if dtype is not None else "32-true", "compile": bool(t.compile),
        "grad_checkpointing": bool(t.grad_checkpointing), "steps_per_probe": steps, "start": start,
        "limit": limit, "multiple": multiple, "time_limit_s": time_limit, "torch": torch.__version__, **search,
    }
