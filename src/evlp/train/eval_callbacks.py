"""Zero-shot classification and image-text retrieval as training callbacks: the ``evlp eval`` evaluators (or, for the
quickstart, the evaluation that follows training), run at the end of every validation on rank 0 and logged like every
metric (metrics.csv, TensorBoard, curves.png).

    eval.zeroshot_callback=imagenet        ->  val/imagenet_zeroshot_top1, val/imagenet_zeroshot_top5
      (or eval.imagenet_zeroshot_callback=true)
    eval.retrieval_callback=coco           ->  val/coco_retrieval_mean_recall, val/coco_retrieval_r1,
                                               val/coco_retrieval_tr_r{1,5,10}, val/coco_retrieval_ir_r{1,5,10}
    eval.zeroshot_callback=quickstart      ->  val/quickstart_zeroshot_top1 (mean of the attribute tasks),
                                               val/quickstart_zeroshot_<task>_top1 (shape, colour, size, count,
                                               position)
    eval.retrieval_callback=quickstart     ->  val/quickstart_retrieval_* (the names of coco's)
    eval.callback_max_images=5000          ->  a fixed random subset of that many images (and their captions)

ImageNet, COCO and Flickr30K are read from ``data_path`` in the ``evlp eval`` layout. A missing dataset folder skips
the callback with one log line; a folder that is there but wrong (missing images, another layout) stops the run at
setup, before training. The quickstart callbacks evaluate the quickstart's held-out split (``data.val`` must name
``quickstart``) with ``evlp.train.evaluate.evaluate_split``, the function that also writes ``results.json`` after
training; the two switches share one pass of the model over the split.

Distributed runs: Lightning validates on every rank, but only rank 0 evaluates, with the plain student (never the DDP
wrapper, whose forward may communicate) and no collective at all; its metrics are logged with ``rank_zero_only``.
The other ranks go on and wait for rank 0 at the next training step's gradient all-reduce, as in the original, so
an evaluation must stay well inside the process group's timeout (30 min by default): ``callback_max_images`` bounds it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from evlp.data.tokenizer import TextTokenizer
from evlp.errors import EvlpError
from evlp.eval.benchmarks import PromptTokens, build_classifier, run_retrieval, run_zeroshot, summarise_recalls
from evlp.eval.datasets import (RETRIEVAL_LAYOUT, fixed_subset, imagenet_classnames, load_imagenet_val,
                                load_karpathy_split, openai_imagenet_templates)
from evlp.train.data import QUICKSTART
from evlp.train.evaluate import evaluate_split

log = logging.getLogger("evlp")

# Retrieval metric -> the suffix it is logged under (the original's tr_r1 ... names).
RETRIEVAL_NAMES = {**{f"{d}@{k}": f"{d.lower()}_r{k}" for d in ("TR", "IR") for k in (1, 5, 10)},
                   "mean_recall": "mean_recall", "R@1": "r1"}


class _BenchmarkCallback(L.Callback):
    """Shared plumbing: load (and check) the data once at setup on rank 0, evaluate at each validation's end.

    A subclass defines ``name``, ``data_folder()`` (its absence skips the callback), ``prepare()`` (load the data,
    raising ``EvlpError`` when it is there but unusable) and ``evaluate(student, device) -> {metric: value}``.
    """

    name = "benchmark"

    def __init__(self, data_path: str | Path, tokenizer: TextTokenizer, image_size: int,
                 max_images: int | None = None, batch_size: int = 256, num_workers: int = 4):
        self.data_path = Path(data_path)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_images = max_images
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.ready = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero or self.ready:
            return
        if not self.data_folder().is_dir():
            log.warning("%s callback skipped: %s not found", self.name, self.data_folder())
            return
        self.prepare()
        self.ready = True

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self.ready and trainer.is_global_zero) or trainer.sanity_checking:
            return
        device = pl_module.device
        # The evaluation draws nothing the training depends on: a run trains the same with or without it (a
        # DataLoader, for one, draws its base seed from the global generator).
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            metrics = self.evaluate(pl_module.student, device)
        for key, value in metrics.items():
            pl_module.log(key, value, on_step=False, on_epoch=True, rank_zero_only=True)


class ZeroShotCallback(_BenchmarkCallback):
    """Top-1/top-5 ImageNet-1K zero-shot accuracy (1,000 classes x 80 OpenAI templates) on ``imagenet/val``."""

    name = "imagenet zero-shot"

    def data_folder(self) -> Path:
        return self.data_path / "imagenet" / "val"

    def prepare(self) -> None:
        data = load_imagenet_val(self.data_path)
        self.data = data.subset(fixed_subset(len(data.paths), self.max_images))
        self.classnames, self.templates = imagenet_classnames(), openai_imagenet_templates()
        # The prompts' ids do not change during training; the classifier (the text tower's output) does.
        self.prompt_tokens = PromptTokens(self.tokenizer, self.classnames, self.templates, progress=False)

    def evaluate(self, student, device) -> dict[str, float]:
        classifier = build_classifier(student, self.prompt_tokens, self.classnames, self.templates, device,
                                      progress=False)
        run = run_zeroshot(student, self.data, classifier, self.image_size, device, self.batch_size,
                           self.num_workers, progress=False)
        return {f"val/imagenet_zeroshot_{k}": v for k, v in run.metrics.items()}


class RetrievalCallback(_BenchmarkCallback):
    """TR/IR@1/5/10, their mean and R@1 on the Karpathy test split of ``dataset`` (coco or flickr30k)."""

    def __init__(self, dataset: str, data_path: str | Path, tokenizer: TextTokenizer, image_size: int, **kwargs):
        if dataset not in RETRIEVAL_LAYOUT:
            raise EvlpError(f"eval.retrieval_callback={dataset}: unknown dataset; expected one of "
                            f"{', '.join(RETRIEVAL_LAYOUT)}")
        super().__init__(data_path, tokenizer, image_size, **kwargs)
        self.dataset = dataset
        self.name = f"{dataset} retrieval"

    def data_folder(self) -> Path:
        return self.data_path / RETRIEVAL_LAYOUT[self.dataset].folder

    def prepare(self) -> None:
        split = load_karpathy_split(self.dataset, self.data_path, "test")
        self.split = split.subset(fixed_subset(len(split.image_paths), self.max_images))

    def evaluate(self, student, device) -> dict[str, float]:
        run = run_retrieval(student, self.tokenizer, self.split, self.image_size, device, self.batch_size,
                            self.num_workers, progress=False)
        return {f"val/{self.dataset}_retrieval_{RETRIEVAL_NAMES[k]}": v for k, v in run.metrics.items()}


class QuickstartCallback(_BenchmarkCallback):
    """Retrieval (TR/IR@1/5/10, their mean and R@1) and/or zero-shot attribute classification (top-1 per task and
    their mean) on the quickstart's held-out split: ``evaluate_split``, as after training, on the validation
    dataset the run already built. ``max_images``: the split's first that many images."""

    name = "quickstart"

    def __init__(self, val_set, data_path: str | Path, tokenizer: TextTokenizer, image_size: int,
                 retrieval: bool = True, zeroshot: bool = True, **kwargs):
        super().__init__(data_path, tokenizer, image_size, **kwargs)
        self.val_set, self.retrieval, self.zeroshot = val_set, retrieval, zeroshot

    def data_folder(self) -> Path:
        return self.data_path  # the quickstart's root, generated before the callbacks are set up

    def prepare(self) -> None:
        pass  # the split is the run's validation dataset: nothing to load

    def evaluate(self, student, device) -> dict[str, float]:
        split = evaluate_split(student, self.tokenizer, self.val_set, device, retrieval=self.retrieval,
                               zeroshot=self.zeroshot, max_images=self.max_images, progress=False)
        metrics = {}
        if split.retrieval is not None:
            metrics |= {f"val/quickstart_retrieval_{RETRIEVAL_NAMES[k]}": v
                        for k, v in summarise_recalls(split.retrieval).items()}
        if split.zeroshot is not None:
            metrics["val/quickstart_zeroshot_top1"] = split.zeroshot["top1"]
            metrics |= {f"val/quickstart_zeroshot_{name}_top1": task["top1"]
                        for name, task in split.zeroshot["tasks"].items()}
        return metrics


ZEROSHOT_CALLBACKS = ("imagenet", QUICKSTART)


def benchmark_callbacks(cfg: DictConfig, tokenizer: TextTokenizer, val_set=None) -> list[L.Callback]:
    """The callbacks ``cfg.eval`` switches on (none by default); ``val_set``: the run's validation dataset, which
    the quickstart callbacks evaluate."""
    e = cfg.eval
    common = dict(data_path=cfg.data_path, tokenizer=tokenizer, image_size=cfg.model.image_tower.img_size,
                  max_images=e.callback_max_images, batch_size=cfg.data.eval_batch_size,
                  num_workers=cfg.data.num_workers)
    zeroshot, retrieval = e.zeroshot_callback, e.retrieval_callback
    if zeroshot is not None and zeroshot not in ZEROSHOT_CALLBACKS:
        raise EvlpError(f"eval.zeroshot_callback={zeroshot}: unknown dataset; expected one of "
                        f"{', '.join(ZEROSHOT_CALLBACKS)}")
    if retrieval and retrieval != QUICKSTART and retrieval not in RETRIEVAL_LAYOUT:
        raise EvlpError(f"eval.retrieval_callback={retrieval}: unknown dataset; expected one of "
                        f"{', '.join([*RETRIEVAL_LAYOUT, QUICKSTART])}")
    callbacks: list[L.Callback] = []
    if e.imagenet_zeroshot_callback or zeroshot == "imagenet":
        callbacks.append(ZeroShotCallback(**common))
    if retrieval and retrieval != QUICKSTART:
        callbacks.append(RetrievalCallback(retrieval, **common))
    if QUICKSTART in (zeroshot, retrieval):
        switches = " and ".join(f"eval.{kind}_callback=quickstart" for kind, value in
                                [("zeroshot", zeroshot), ("retrieval", retrieval)] if value == QUICKSTART)
        if QUICKSTART not in list(cfg.data.val):
            # The quickstart config with the user's own data: like a missing benchmark folder, skip and say so.
            log.warning("%s skipped: the quickstart callbacks evaluate the quickstart's held-out split, and "
                        "data.val=%s does not name quickstart", switches, list(cfg.data.val))
            return callbacks
        callbacks.append(QuickstartCallback(val_set, **{**common, "data_path": cfg.data.quickstart.root},
                                            retrieval=retrieval == QUICKSTART, zeroshot=zeroshot == QUICKSTART))
    return callbacks
