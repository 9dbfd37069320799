"""Image-text retrieval fine-tuning of the whole S-SMKE student on COCO or Flickr30K (thesis §1.7 and table 2.7; the
original's ``RetrievalFinetune``, reference §3.6, §8.3).

    evlp finetune --config fine_tuning/retrieval_coco base_dir=/data model.model_path=/data/models/S-SMKE/model-...ckpt
    evlp finetune --config fine_tuning/retrieval_flickr30k base_dir=/data model.model_path=...
    evlp sweep retrieval base_dir=/data model.model_path=...                  # both, one summary table
    evlp finetune --config fine_tuning/retrieval_coco ... data.micro_batch_size=128   # batch 1024 on a smaller GPU

Recipe. The pretrained student (both towers, the shared block, its logit scales) is trained with the image-text
contrastive loss (ITC) on ``x``, the normalised CLS of the shared block's output, in both directions, with the
learnable logit scale of that output (``logit_scales[1]``, clamped to ``[0, ln 100]`` before every step as in
pretraining). Nothing else of pretraining is used: no teacher and no distillation (hence no KD memory bank), no ITC
on ``x_interm``; the distillation head (``fc_norm``, ``head``) gets no gradient from ITC and is frozen, but stays in
the checkpoint, which therefore still loads everywhere an S-SMKE checkpoint does.

Data. One sample per caption of the Karpathy train split (COCO: train + restval, 113,287 images and 566,747 pairs;
Flickr30K: train, 29,000 images and 145,000 pairs), shuffled, incomplete last batch dropped, as in the original
(553 / 141 steps per epoch at batch 1024; the thesis counts 2770 / 710 steps for 5 epochs, i.e. 554 / 142).
Training images get a RandomResizedCrop (scale [0.5, 1]) and a horizontal flip (p 0.5), no colour jitter. An
image's five captions are five samples, so a batch of 1024 holds on average about 4 (COCO) or 14 (Flickr30K) pairs
of pairs that show the same image; the original treated the other captions of the same image as negatives
(reference §10 item 25). Here they are masked out of the softmax (``ContrastiveLoss(sample_ids=...)``): each query's
candidates are its own pair and the pairs of other images. This keeps the original's data exposure and step counts,
which sampling one caption per image and epoch would cut five-fold.

Batch 1024 on any GPU: ``data.micro_batch_size`` turns on a gradient cache (GradCache, Gao et al. 2021): the batch is
embedded in micro-batches without gradient, the loss over the whole batch gives the gradient of every embedding,
and each micro-batch is embedded again with gradient (with the random state of its first pass, so dropout draws the
same masks) and back-propagated from those embedding gradients. The update equals the one of a single full-batch
step; the cost is one more forward pass. Across processes the embeddings are gathered with gradient, so the
negatives span the global batch (``data.batch_size`` per process x processes).

Validation (each epoch) embeds the Karpathy ``val`` split (COCO 5,000 images / 25,010 captions, Flickr30K 1,014 /
5,070) and logs ``val/TR@1,5,10``, ``val/IR@1,5,10``, their mean ``val/mean_recall`` (the monitor, maximised: the
original's ``mode: min`` kept the worst checkpoint, reference §10 item 6), ``val/R@1`` (mean of TR@1 and IR@1) and
``val/loss`` (ITC over the images paired with their first captions, in chunks of the training batch size). After
training the best checkpoint's weights are measured on the Karpathy ``test`` split (COCO 5,000 / 25,010, Flickr30K
1,000 / 5,000) exactly as ``evlp eval retrieval`` measures a checkpoint (``evlp.eval.benchmarks.run_retrieval``):
``test/TR@k``, ``test/IR@k``, ``test/mean_recall``, ``test/R@1`` (the seed README's "R@1"); the headline is
``test/IR@1`` and ``test/TR@1``. Validation embeds as that command does too (bf16 autocast on GPU, float32 ranking).

Using the fine-tuned model. The best checkpoint holds the student under ``student.*`` and the pretraining run's
config under ``hyper_parameters["cfg"]`` (with ``data.max_text_len`` set to the fine-tuning one), so it is a
checkpoint like any other for evaluation::

    evlp eval retrieval --checkpoint models/retrieval_coco/model-2770-0.1234-val.ckpt --dataset coco ...
    student, tokenizer, image_size = evlp.eval.checkpoint.load_student("models/retrieval_coco/model-...-val.ckpt")
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from evlp.data.tokenizer import TextTokenizer
from evlp.data.transforms import eval_transform, train_transform
from evlp.errors import EvlpError
from evlp.eval.benchmarks import (RECALL_DEFINITION, TrimmedTokenizer, embed_texts, eval_dtype, run_retrieval,
                                  summarise_recalls)
from evlp.eval.datasets import STANDARD_TEST_SIZES, RetrievalSplit, image_loader, load_karpathy_split
from evlp.eval.retrieval import retrieval_metrics
from evlp.finetune.module import FinetuneModule
from evlp.finetune.runner import FinetuneTask
from evlp.losses import ContrastiveLoss

log = logging.getLogger("evlp")

DATASETS = {"retrieval_coco": "coco", "retrieval_flickr30k": "flickr30k"}
TRAIN_SPLITS = {"coco": ("train", "restval"), "flickr30k": ("train",)}
# Karpathy's splits as published: (images, captions) of train (COCO: + restval), val and test.
STANDARD_SIZES = {
    "coco": {"train": (113_287, 566_747), "val": (5000, 25_010), "test": STANDARD_TEST_SIZES["coco"]},
    "flickr30k": {"train": (29_000, 145_000), "val": (1014, 5070), "test": STANDARD_TEST_SIZES["flickr30k"]},
}
OUTPUT_SCALE = 1  # logit_scales[1]: the scale of the shared block's output x (0 is x_interm's)


# ---------------------------------------------------------------------------------------------------------------
# Gradient cache


class RngState:
    """The CPU and (on GPU) the current device's random state at construction; ``replay()`` runs a block from that
    state and restores the state it found afterwards, so a replayed forward draws the same dropout masks and the
    random stream goes on as if it had not run."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def split_batch(batch: dict, size: int) -> list[dict]:
    """A dict of equally long tensors -> dicts of at most ``size`` rows, in order."""
    keys = list(batch)
    parts = [batch[k].split(size) for k in keys]
    return [dict(zip(keys, chunk)) for chunk in zip(*parts)]


def grad_cache_backward(
    encode: Callable[[dict], tuple[Tensor, Tensor]],
    batch: dict,
    loss_fn: Callable[[Tensor, Tensor], dict],
    micro_batch_size: int | None,
    backward: Callable[[Tensor], None] = Tensor.backward,
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    loss_params: Sequence[nn.Parameter] = (),
) -> dict[str, Tensor]:
    """Accumulate into ``.grad`` the gradient of ``loss_fn(*encode(batch))["loss"]``; returns the loss dict, detached.

    ``encode(batch) -> (image (B, D), text (B, D))`` embeds the rows of a batch (a dict of tensors with B rows) and
    ``loss_fn(image, text)`` is the contrastive loss of the whole batch, which may also use ``loss_params`` directly
    (the logit scale). With ``micro_batch_size`` None (or >= B) this is the plain forward and ``backward(loss)``.
    Otherwise it is GradCache (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
    Setup"): embed the micro-batches without gradient (recording each one's random state), compute the loss over
    the whole batch on those embeddings and its gradient w.r.t. every embedding and ``loss_params``, then embed each
    micro-batch again with gradient (its random state replayed) and back-propagate ``sum(embedding * gradient)``.
    Parameter gradients then equal the full-batch ones up to float rounding; only the micro-batch's activations are
    ever held. ``backward`` is the backward call to use (Lightning's ``manual_backward``, which applies the precision
    plugin's loss scaling); every micro-batch but the last runs under ``no_sync()`` (DDP: no gradient all-reduce).
    Every backward reaches every trainable parameter, ``loss_params`` included (with a zero gradient but in the last
    one), so a DDP reducer never waits for a parameter that one of them skipped.
    """
    rows = len(next(iter(batch.values())))
    if micro_batch_size is None or micro_batch_size >= rows:
        out = loss_fn(*encode(batch))
        backward(out["loss"])
        return {k: v.detach() for k, v in out.items()}
    chunks = split_batch(batch, micro_batch_size)
    device = next(iter(batch.values())).device
    states, images, texts = [], [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RngState(device))
            image, text = encode(chunk)
            images.append(image.float())
            texts.append(text.float())
    image = torch.cat(images).requires_grad_()
    text = torch.cat(texts).requires_grad_()
    out = loss_fn(image, text)
    grads = torch.autograd.grad(out["loss"], [image, text, *loss_params])
    sizes = [len(t) for t in images]
    image_grads, text_grads, param_grads = grads[0].split(sizes), grads[1].split(sizes), grads[2:]
    for k, chunk in enumerate(chunks):
        last = k == len(chunks) - 1
        with contextlib.nullcontext() if last else no_sync():
            with states[k].replay():
                image, text = encode(chunk)
            surrogate = (image.float() * image_grads[k]).sum() + (text.float() * text_grads[k]).sum()
            for param, grad in zip(loss_params, param_grads):
                surrogate = surrogate + (param * (grad if last else torch.zeros_like(grad))).sum()
            backward(surrogate)
    return {k: v.detach() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------------
# Data


def concat_splits(parts: list[RetrievalSplit]) -> RetrievalSplit:
    """Karpathy splits of one file as one (COCO's train + restval)."""
    paths, captions, caption_image = [], [], []
    for part in parts:
        caption_image += [row + len(paths) for row in part.caption_image]
        paths += part.image_paths
        captions += part.captions
    first = parts[0]
    return RetrievalSplit(first.dataset, "+".join(p.split for p in parts), first.split_file, first.split_sha256,
                          paths, captions, caption_image)


def keep_first_images(split: RetrievalSplit, limit: int | None) -> RetrievalSplit:
    """The first ``limit`` images of the split with all their captions (smoke runs), or the split."""
    if limit is None or limit >= len(split.image_paths):
        return split
    return split.subset(list(range(limit)))


class CaptionPairs(Dataset):
    """One sample per caption: ``{"image": transform(its image), "caption": str, "image_id": image row}``.

    The image is handed to the transform unloaded, so the training transform can decode a large JPEG at reduced
    scale (``TrainTransform``)."""

    def __init__(self, split: RetrievalSplit, transform):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return len(self.split.captions)

    def __getitem__(self, j: int) -> dict:
        row = self.split.caption_image[j]
        path = self.split.image_paths[row]
        try:
            with Image.open(path) as image:
                pixels = self.transform(image)
        except OSError as e:
            raise EvlpError(f"cannot read image {path}: {e}") from None
        return {"image": pixels, "caption": self.split.captions[j], "image_id": row}


class PairCollate:
    """Stack images, tokenise captions (padding no caption of the batch reaches is dropped), keep image ids."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenize = TrimmedTokenizer(tokenizer)

    def __call__(self, items: list[dict]) -> dict:
        token_ids, padding_mask = self.tokenize([item["caption"] for item in items])
        return {"image": torch.stack([item["image"] for item in items]), "text": token_ids,
                "padding_mask": padding_mask, "image_id": torch.tensor([item["image_id"] for item in items])}


def fetch_if_missing(cfg: DictConfig, dataset: str) -> None:
    """With ``data.download``, fetch what can be fetched without the user: COCO's images and the Karpathy split
    files. Flickr30K's images are licensed: without ``flickr30k/flickr30k-images/`` the error says how to get them."""
    from evlp.data.coco import check_flickr30k_images, fetch_coco_files, fetch_flickr30k_split

    base_url = cfg.data.get("download_url")
    if dataset == "flickr30k":
        if cfg.data.download:
            fetch_flickr30k_split(cfg.data_path, base_url=base_url)
        else:
            check_flickr30k_images(cfg.data_path)
    elif cfg.data.download:
        fetch_coco_files(cfg.data_path, base_url=base_url)


def load_splits(cfg: DictConfig, dataset: str) -> tuple[RetrievalSplit, RetrievalSplit, RetrievalSplit]:
    """Karpathy train (COCO: + restval), val and test; every file checked (``EvlpError`` otherwise)."""
    fetch_if_missing(cfg, dataset)
    train = concat_splits([load_karpathy_split(dataset, cfg.data_path, s) for s in TRAIN_SPLITS[dataset]])
    val = load_karpathy_split(dataset, cfg.data_path, "val")
    test = load_karpathy_split(dataset, cfg.data_path, "test")
    return train, val, test


# ---------------------------------------------------------------------------------------------------------------
# The module


def clip_loss(image: Tensor, text: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric CLIP cross-entropy of matching rows, within one process (validation)."""
    logits = logit_scale * image.float() @ text.float().T
    labels = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class RetrievalModule(FinetuneModule):
    """The S-SMKE student trained with ITC on ``x``, manual optimisation (one optimizer step per batch, through the
    gradient cache when ``data.micro_batch_size`` is set); validation ranks the whole val split once per epoch."""

    def __init__(self, cfg: DictConfig, student: nn.Module, tokenizer: TextTokenizer, val_split: RetrievalSplit,
                 run_cfg: dict, max_logit_scale: float):
        # cfg= is the pretraining run's config: evlp.eval.checkpoint rebuilds the student from it.
        super().__init__(cfg, cfg=run_cfg)
        self.automatic_optimization = False
        self.student = student
        self.tokenizer = tokenizer
        self.val_split = val_split
        self.max_logit_scale = max_logit_scale
        self.itc = ContrastiveLoss()
        self._val_rows: list[Tensor] = []
        self._val_images: list[Tensor] = []

    # -- training -------------------------------------------------------------------------------------------------
    def encode(self, batch: dict) -> tuple[Tensor, Tensor]:
        image = self.student.forward_image(batch["image"])["x"]
        text = self.student.forward_text(batch["text"], batch["padding_mask"])["x"]
        return image, text

    def itc_loss(self, image_ids: Tensor, image: Tensor, text: Tensor) -> dict:
        scale = self.student.logit_scales[OUTPUT_SCALE].exp()
        return self.itc(image, text, scale, sample_ids=image_ids)

    def _no_sync(self):
        return getattr(self.trainer.strategy, "block_backward_sync", contextlib.nullcontext)()

    def training_step(self, batch: dict, batch_idx: int) -> None:
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        self.student.clamp_logit_scales(self.max_logit_scale)
        optimizer.zero_grad()
        out = grad_cache_backward(self.encode, batch, partial(self.itc_loss, batch["image_id"]),
                                  self.cfg.data.micro_batch_size, backward=self.manual_backward,
                                  no_sync=self._no_sync, loss_params=[self.student.logit_scales])
        optimizer.step()  # clipping, if configured, runs in on_before_optimizer_step (after AMP's unscale)
        schedule.step()
        size = len(batch["image_id"])
        self.log("train/loss", out["loss"], prog_bar=True, batch_size=size, sync_dist=True)
        self.log_dict({"train/image_loss": out["image_loss"], "train/text_loss": out["text_loss"],
                       "train/acc": (out["image_acc"] + out["text_acc"]) / 2,
                       "train/logit_scale": self.student.logit_scales[OUTPUT_SCALE].detach().exp()}, batch_size=size)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Clip the (synchronised, and with fp16 already unscaled) gradients to ``trainer.gradient_clip_val``."""
        clip = self.cfg.trainer.gradient_clip_val
        if not clip:
            return
        if getattr(self.trainer.precision_plugin, "scaler", None) is None:
            # fp32 / bf16: nothing to unscale. Lightning's clip_gradients refuses a fused AdamW (the default on GPU)
            # even then, so clip here.
            torch.nn.utils.clip_grad_norm_([p for p in self.parameters() if p.grad is not None], clip)
        else:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    # -- validation -----------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_rows, self._val_images = [], []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        dtype = eval_dtype(self.device)  # as evlp eval retrieval embeds (bf16 autocast on GPU)
        with torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            image = self.student.encode_image(batch["image"])
        self._val_images.append(F.normalize(image.float(), dim=-1))
        self._val_rows.append(torch.tensor([m["index"] for m in batch["meta"]], device=self.device))

    def on_validation_epoch_end(self) -> None:
        rows, images = self.gather_samples(torch.cat(self._val_rows), torch.cat(self._val_images))
        self._val_rows, self._val_images = [], []
        seen = rows.tolist()  # all rows, unless trainer.limit_val_batches cut the split
        split = self.val_split.subset(seen)
        texts = embed_texts(self.student, self.tokenizer, split.captions, device=self.device,
                            batch_size=self.cfg.data.eval_batch_size, progress=False).to(self.device)
        metrics = summarise_recalls(retrieval_metrics(images, texts, torch.tensor(split.caption_image)))
        first_caption: dict[int, int] = {}
        for j, row in enumerate(split.caption_image):
            first_caption.setdefault(row, j)
        paired = texts[[first_caption[r] for r in range(len(seen))]]
        scale = self.student.logit_scales[OUTPUT_SCALE].detach().exp()
        size = self.cfg.data.batch_size
        losses = [clip_loss(images[s: s + size], paired[s: s + size], scale) for s in range(0, len(seen), size)]
        metrics["loss"] = float(sum(losses) / len(losses))
        self.log_dict({f"val/{k}": float(v) for k, v in metrics.items()}, sync_dist=True)


# ---------------------------------------------------------------------------------------------------------------
# The task


def _eval_device(cfg: DictConfig) -> torch.device:
    if cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _counts(split: RetrievalSplit) -> tuple[int, int]:
    return len(split.image_paths), len(split.captions)


def build_task(cfg: DictConfig) -> FinetuneTask:
    """The student from the pretrained checkpoint and the Karpathy data; every input error is an ``EvlpError``
    raised here, before training (the checkpoint is read before any download starts)."""
    from evlp.finetune.source import load_pretrained

    if cfg.task not in DATASETS:
        raise EvlpError(f"task={cfg.task!r} is not a retrieval task; expected one of {', '.join(DATASETS)}")
    dataset, d, a = DATASETS[cfg.task], cfg.data, cfg.augment
    if cfg.trainer.accumulate_grad_batches != 1:
        raise EvlpError(f"trainer.accumulate_grad_batches={cfg.trainer.accumulate_grad_batches}: accumulation would "
                        f"split the contrastive batch into smaller ones; to fit batch {d.batch_size} in memory set "
                        f"data.micro_batch_size (gradient cache, the same update as the whole batch)")
    if d.micro_batch_size is not None and d.micro_batch_size < 1:
        raise EvlpError(f"data.micro_batch_size={d.micro_batch_size}; expected a positive number of pairs or null "
                        f"(the whole batch at once)")
    try:
        parts = load_pretrained(cfg.model.model_path, keep="student")
    except EvlpError as e:
        raise EvlpError(f"{cfg.task} fine-tunes the whole student of an evlp S-SMKE checkpoint: {e}") from None
    student = parts.student
    if d.image_size != parts.image_size:
        raise EvlpError(f"data.image_size={d.image_size}, but the student from {cfg.model.model_path} takes "
                        f"{parts.image_size}x{parts.image_size} images; set data.image_size={parts.image_size}")
    max_positions = student.text_tower.bert.config.max_position_embeddings
    if d.max_text_len > max_positions:
        raise EvlpError(f"data.max_text_len={d.max_text_len}, but the student's text tower has {max_positions} "
                        f"positions; set data.max_text_len={max_positions} or less")

    train, val, test = load_splits(cfg, dataset)
    standard = {"train": _counts(train), "val": _counts(val), "test": _counts(test)} == STANDARD_SIZES[dataset]
    train = keep_first_images(train, d.limit_train_samples)
    val, test = keep_first_images(val, d.limit_val_samples), keep_first_images(test, d.limit_val_samples)
    if len(train.captions) < d.batch_size:
        raise EvlpError(f"{cfg.task}: {len(train.captions)} training pairs, fewer than one batch (data.batch_size="
                        f"{d.batch_size}); the last incomplete batch of an epoch is dropped")

    # The distillation head gets no gradient from ITC: frozen, so DDP has no unused parameter to wait for.
    for param in (*student.head.parameters(), *student.fc_norm.parameters()):
        param.requires_grad_(False)
    for layer in student.shared.modules():
        if isinstance(layer, nn.Dropout):
            layer.p = cfg.model.dropout
    run_cfg = OmegaConf.to_container(parts.run_cfg, resolve=True)
    run_cfg["data"]["max_text_len"] = int(d.max_text_len)  # evlp eval then tokenises as fine-tuning did
    run_cfg["model"]["dropout"] = float(cfg.model.dropout)
    max_logit_scale = float(parts.run_cfg.loss.max_logit_scale)
    tokenizer = TextTokenizer(parts.tokenizer.tokenizer, max_len=d.max_text_len)
    module = RetrievalModule(cfg, student, tokenizer, val, run_cfg, max_logit_scale)

    transform = train_transform(d.image_size, crop_scale=tuple(a.crop_scale), color_jitter=a.color_jitter,
                                hflip=a.hflip)
    train_loader = DataLoader(CaptionPairs(train, transform), batch_size=d.batch_size, shuffle=True, drop_last=True,
                              num_workers=d.num_workers, collate_fn=PairCollate(tokenizer),
                              pin_memory=torch.cuda.is_available(), persistent_workers=d.num_workers > 0)
    val_loader = image_loader(val.image_paths, eval_transform(d.image_size), d.eval_batch_size, d.num_workers)

    @torch.no_grad()
    def final_eval(module: RetrievalModule) -> dict:
        if rank_zero_only.rank != 0:  # only rank 0 writes results.json
            return {}
        device = _eval_device(cfg)
        where = next(module.student.parameters()).device
        run = run_retrieval(module.student.to(device), tokenizer, test, d.image_size, device,
                            batch_size=d.eval_batch_size, num_workers=d.num_workers, progress=cfg.trainer.progress_bar)
        module.student.to(where)
        return {f"test/{k}": v for k, v in run.metrics.items()}

    micro = d.micro_batch_size if d.micro_batch_size and d.micro_batch_size < d.batch_size else None
    summary = (f"{parts.summary}; retrieval fine-tuning of the whole student with ITC on the shared output x (both "
               f"directions, its learnable logit scale clamped to [1, {max_logit_scale:g}]); not used: the teacher "
               f"and distillation (so no KD memory bank), the ITC on x_interm, the KD head (fc_norm, head: frozen)")
    protocol = {
        "dataset": dataset, "split_file": str(train.split_file), "split_sha256": train.split_sha256,
        "train_split": train.split, "val_split": "val", "test_split": "test",
        "counts": {"train_images": len(train.image_paths), "train_pairs": len(train.captions),
                   "val_images": len(val.image_paths), "val_captions": len(val.captions),
                   "test_images": len(test.image_paths), "test_captions": len(test.captions)},
        "standard_splits": standard and d.limit_train_samples is None and d.limit_val_samples is None,
        "resolution": int(d.image_size), "max_text_len": int(d.max_text_len),
        "batch_size_per_process": int(d.batch_size), "micro_batch_size": micro,
        "negatives": "the global batch; other captions of a pair's own image are masked out",
        "loss": "ITC on x (shared block output CLS), image->text and text->image, learnable scale",
        "augmentation": {"crop_scale": list(a.crop_scale), "hflip": float(a.hflip), "color_jitter": a.color_jitter},
        "epochs": int(cfg.trainer.max_epochs), "lr": float(cfg.optim.lr),
        "recall": RECALL_DEFINITION, "evaluation": "best checkpoint (max val/mean_recall) on the Karpathy test split",
    }
    return FinetuneTask(module=module, train_loader=train_loader, val_loaders=val_loader, monitor="val/mean_recall",
                        mode="max", headline={"IR@1": "test/IR@1", "TR@1": "test/TR@1"}, summary=summary,
                        protocol=protocol, final_eval=final_eval)
