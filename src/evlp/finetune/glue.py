"""GLUE fine-tuning of the pretrained text tower (reference §3.8, §7.8, §8.4; thesis §2.4).

    evlp download glue --data-path /data --task mrpc
    evlp finetune --config fine_tuning/mrpc base_dir=/data model.model_path=/data/models/S-SMKE/model-...ckpt
    evlp sweep glue base_dir=/data model.model_path=...          # all nine tasks, one table

Model: the S-SMKE student's text tower (BERT layers + embeddings, from the checkpoint), BERT's pooler (dense + tanh
on [CLS]) — pretrained from the run's original BERT when that is available offline, else freshly initialised — then
dropout and one Linear layer (one output for STS-B). Everything is trained. Loss: cross-entropy on fp32 logits, or
MSE on the float STS-B scores.

Data: ``<data_path>/glue/<task>`` as ``evlp download glue`` writes it (the hub's ``nyu-mll/glue`` saved with
``save_to_disk``). Single sentences or pairs with segment ids, pairs truncated longest-first to ``data.max_text_len``
(256; capped at the tower's position table), padded per batch. Training on ``train``, validation on ``validation``
(MNLI: ``validation_matched`` and ``validation_mismatched``, logged as ``val/matched_*`` and ``val/mismatched_*``).
Test labels are hidden on GLUE (-1) and never evaluated. Metrics are computed once over the whole validation set,
after gathering every process's predictions (``evlp.eval.glue_metrics``).

Using the fine-tuned classifier. The best checkpoint (``<model_path>/<run_name>/model-{step}-{val_loss}-val.ckpt``)
holds the classifier's weights under ``model.*``, and under ``hyper_parameters`` the pretraining run's config
(``cfg``) and the task (``glue``), so it is rebuilt without the pretraining checkpoint or the data, read with
``weights_only=True`` and loaded strictly::

    from evlp.finetune.glue import load_text_classifier

    model, encode, info = load_text_classifier("models/glue_mrpc/model-230-0.4123-val.ckpt")  # eval mode, on CPU
    logits = model(**encode("The cat sat.", "A cat was sitting."))  # (1, 2); lists of sentences give a batch
    print(info["labels"][int(logits.argmax(-1))])  # 'equivalent' / 'not_equivalent'; STS-B: logits[:, 0] is 0..5

``encode(first, second=None)`` tokenises as training did (the run's tokenizer, segment ids, longest-first
truncation to ``info["max_len"]``); ``encode.tokenizer`` is the Hugging Face tokenizer itself.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from evlp.errors import EvlpError
from evlp.eval.glue_metrics import DEFINITIONS, DISPLAY_NAMES, TASK_METRICS, glue_metrics
from evlp.finetune.module import FinetuneModule
from evlp.finetune.runner import FinetuneTask
from evlp.finetune.source import load_pretrained
from evlp.models.build import build_text_tower
from evlp.models.heads import TextClassifier
from evlp.pretrained.towers import load_exact

log = logging.getLogger("evlp")

LABEL = "label"


@dataclass(frozen=True)
class GlueSpec:
    columns: tuple[str, ...]  # the text columns: one sentence or a pair
    num_classes: int  # 1 = regression (STS-B)
    val_splits: tuple[tuple[str, str], ...] = (("validation", ""),)  # (split, metric prefix); the first is monitored

    @property
    def regression(self) -> bool:
        return self.num_classes == 1


# Column names as on the hub (nyu-mll/glue).
SPECS = {
    "cola": GlueSpec(("sentence",), 2),
    "sst2": GlueSpec(("sentence",), 2),
    "mrpc": GlueSpec(("sentence1", "sentence2"), 2),
    "qqp": GlueSpec(("question1", "question2"), 2),
    "stsb": GlueSpec(("sentence1", "sentence2"), 1),
    "mnli": GlueSpec(("premise", "hypothesis"), 3,
                     (("validation_matched", "matched_"), ("validation_mismatched", "mismatched_"))),
    "qnli": GlueSpec(("question", "sentence"), 2),
    "rte": GlueSpec(("sentence1", "sentence2"), 2),
    "wnli": GlueSpec(("sentence1", "sentence2"), 2),
}

# What each class id means (the hub's ClassLabel names); STS-B is a similarity score from 0 to 5.
LABEL_NAMES = {
    "cola": ("unacceptable", "acceptable"), "sst2": ("negative", "positive"),
    "mrpc": ("not_equivalent", "equivalent"), "qqp": ("not_duplicate", "duplicate"),
    "mnli": ("entailment", "neutral", "contradiction"), "qnli": ("entailment", "not_entailment"),
    "rte": ("entailment", "not_entailment"), "wnli": ("not_entailment", "entailment"), "stsb": None,
}


# ---------------------------------------------------------------------------------------------------------------
# Data


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _wait_for(folder: Path, timeout_s: float = 3600.0) -> None:
    """A non-zero local rank started by a launcher (torchrun, SLURM) waits for local rank 0's download."""
    deadline = time.monotonic() + timeout_s
    while not folder.is_dir():
        if time.monotonic() > deadline:
            raise EvlpError(f"{folder} did not appear within {timeout_s:.0f} s (local rank 0 downloads it); "
                            f"fetch it first with `evlp download glue`")
        time.sleep(5)


def load_glue_splits(cfg: DictConfig, task: str):
    """The task's ``DatasetDict`` from ``<data_path>/glue/<task>``, fetched when missing and ``data.download``;
    checked for the splits, columns and labels this task needs. EvlpError, before any training, otherwise."""
    try:
        import datasets
    except ImportError as e:
        raise EvlpError("GLUE fine-tuning needs the datasets package: pip install 'evlp[glue]'") from e
    spec = SPECS[task]
    folder = Path(cfg.data_path) / "glue" / task
    fetch = f"`evlp download glue --task {task} --data-path {cfg.data_path}`"
    if not folder.is_dir():
        if not cfg.data.download:
            raise EvlpError(f"GLUE {task}: {folder} not found; fetch it with {fetch} (or set data.download=true)")
        if int(os.environ.get("LOCAL_RANK", "0")) > 0:
            _wait_for(folder)
        else:
            from evlp.data.glue import download_glue

            for line in download_glue(cfg.data_path, [task]):
                log.info(line)
    try:
        data = datasets.load_from_disk(str(folder))
    except (OSError, ValueError) as e:
        raise EvlpError(f"GLUE {task}: cannot read {folder} ({_first_line(e)}); delete it and fetch it again with "
                        f"{fetch}") from None
    if not isinstance(data, datasets.DatasetDict):
        raise EvlpError(f"GLUE {task}: {folder} holds one split, not the task's splits (a DatasetDict saved with "
                        f"save_to_disk, as {fetch} writes it)")
    needed = ["train", *(split for split, _ in spec.val_splits)]
    missing = [s for s in needed if s not in data]
    if missing:
        raise EvlpError(f"GLUE {task}: {folder} has no {', '.join(missing)} split (found {', '.join(data) or 'none'}; "
                        f"{task} needs {', '.join(needed)}); fetch it again with {fetch}")
    columns = [*spec.columns, LABEL]
    for split in needed:
        absent = [c for c in columns if c not in data[split].column_names]
        if absent:
            raise EvlpError(f"GLUE {task}: split {split} of {folder} lacks the column(s) {', '.join(absent)} (it has "
                            f"{', '.join(data[split].column_names)}; {task} expects {', '.join(columns)} as on the "
                            f"hub, nyu-mll/glue)")
        _check_labels(task, spec, split, data[split], folder)
    return data


def _check_labels(task: str, spec: GlueSpec, split: str, rows, folder: Path) -> None:
    feature = rows.features[LABEL]
    dtype = getattr(feature, "dtype", None)
    if spec.regression:
        if not (isinstance(dtype, str) and dtype.startswith("float")):
            raise EvlpError(f"GLUE {task}: the {split} labels of {folder} are {feature}, expected float similarity "
                            f"scores (Value('float32'))")
        return
    if not (isinstance(dtype, str) and dtype.startswith("int")):
        raise EvlpError(f"GLUE {task}: the {split} labels of {folder} are {feature}, expected class ids")
    labels = np.asarray(rows.with_format("numpy")[LABEL]) if len(rows) else np.zeros(0, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        hidden = " (hidden labels, -1, as in GLUE's test splits)" if labels.min() < 0 else ""
        raise EvlpError(f"GLUE {task}: the {split} split of {folder} has labels outside 0..{spec.num_classes - 1}"
                        f"{hidden}")


class GlueRows(Dataset):
    """``(sample index, texts, label)`` per row of one split; batched reads through ``__getitems__``."""

    def __init__(self, rows, columns: tuple[str, ...]):
        self.columns = columns
        self.rows = rows.select_columns([*columns, LABEL])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[int(i)]
        return int(i), tuple(row[c] for c in self.columns), row[LABEL]

    def __getitems__(self, indices):
        indices = [int(i) for i in indices]
        batch = self.rows[indices]
        texts = list(zip(*(batch[c] for c in self.columns)))
        return list(zip(indices, texts, batch[LABEL]))


class GlueCollate:
    """Tokenises a batch with the run's Hugging Face tokenizer: ``[CLS] a [SEP] (b [SEP])``, segment ids 0/1,
    longest-first truncation to ``max_len``, padding to the batch's longest. Labels: long, or float32 for STS-B."""

    def __init__(self, tokenizer, max_len: int, regression: bool):
        self.tokenizer, self.max_len, self.regression = tokenizer, max_len, regression

    def __call__(self, items) -> dict[str, torch.Tensor]:
        index = torch.tensor([i for i, _, _ in items], dtype=torch.long)
        columns = [list(c) for c in zip(*(texts for _, texts, _ in items))]
        encoded = self.tokenizer(*columns, truncation="longest_first", max_length=self.max_len, padding="longest",
                                 return_attention_mask=True, return_token_type_ids=True, return_tensors="pt")
        labels = torch.tensor([label for _, _, label in items],
                              dtype=torch.float32 if self.regression else torch.long)
        return {"index": index, "token_ids": encoded["input_ids"].long(),
                "padding_mask": encoded["attention_mask"] == 0,
                "token_type_ids": encoded["token_type_ids"].long(), "labels": labels}


def _limited(rows, limit):
    return rows.select(range(min(int(limit), len(rows)))) if limit is not None else rows


# ---------------------------------------------------------------------------------------------------------------
# Model


@contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def pretrained_pooler(run_cfg: DictConfig | None, width: int) -> tuple[nn.Module | None, str]:
    """The pooler (dense + tanh on the first token) of the model the pretraining run's text tower started from
    (``model.text_tower.path``), read offline; ``(None, why)`` when there is none to read, so the caller
    initialises a fresh one."""
    source = run_cfg.model.text_tower.path if run_cfg is not None else None
    if source is None:
        return None, ("pooler freshly initialised (the run's text tower was randomly initialised, "
                      "model.text_tower.path=null)")
    from transformers import AutoModel

    try:
        with _quiet_transformers():
            # No encoder layers: only embeddings and pooler are built; the file's layers are skipped.
            model, info = AutoModel.from_pretrained(str(source), num_hidden_layers=0, local_files_only=True,
                                                    output_loading_info=True, dtype=torch.float32)
    except (OSError, ValueError, TypeError) as e:
        return None, f"pooler freshly initialised ({source} is not available offline: {_first_line(e)})"
    pooler = getattr(model, "pooler", None)
    if pooler is None or not isinstance(getattr(pooler, "dense", None), nn.Linear):
        return None, f"pooler freshly initialised ({source} has no pooler)"
    if any(k.startswith("pooler.") for k in info["missing_keys"]):
        return None, f"pooler freshly initialised ({source} has no pooler weights)"
    if pooler.dense.in_features != width:
        return None, f"pooler freshly initialised ({source} is {pooler.dense.in_features} wide, the tower {width})"
    return pooler, f"pooler pretrained from {source}"


class GlueModule(FinetuneModule):
    """Trains a :class:`TextClassifier`; validation gathers every prediction and scores the whole set once."""

    def __init__(self, cfg: DictConfig, model: TextClassifier, val_prefixes: list[str], /, **hparams):
        super().__init__(cfg, **hparams)
        self.model = model
        self.task = cfg.task
        self.regression = model.num_classes == 1
        self.val_prefixes = list(val_prefixes)
        self._outputs: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in self.val_prefixes]

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(batch["token_ids"], batch["padding_mask"], batch["token_type_ids"])

    def per_sample_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.regression:
            return F.mse_loss(logits.view(-1), labels.float(), reduction="none")
        return F.cross_entropy(logits, labels, reduction="none")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.per_sample_loss(self(batch), batch["labels"]).mean()
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(batch["labels"]),
                 sync_dist=True)  # the mean over every process's batch
        return loss

    def on_validation_epoch_start(self) -> None:
        self._outputs = [[] for _ in self.val_prefixes]

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self(batch).float()
        self._outputs[dataloader_idx].append((batch["index"], logits.detach(), batch["labels"]))

    def on_validation_epoch_end(self) -> None:
        for outputs, prefix in zip(self._outputs, self.val_prefixes):
            if not outputs:
                continue
            _, logits, labels = self.gather_samples(*(torch.cat(parts) for parts in zip(*outputs)))
            loss = float(self.per_sample_loss(logits, labels).mean())
            predictions = logits.view(-1) if self.regression else logits.argmax(dim=-1)
            values = {f"{prefix}loss": loss, **{f"{prefix}{k}": v for k, v in glue_metrics(
                self.task, predictions.cpu().numpy(), labels.cpu().numpy()).items()}}
            if prefix and prefix == self.val_prefixes[0]:
                values["loss"] = loss  # the monitored set's loss names the checkpoint
            for name, value in values.items():
                # Every process holds the same gathered values: no further reduction.
                self.log(f"val/{name}", value, on_step=False, on_epoch=True, sync_dist=False,
                         prog_bar=name in ("loss", f"{prefix}{TASK_METRICS[self.task][0]}"))
        self._outputs = [[] for _ in self.val_prefixes]


# ---------------------------------------------------------------------------------------------------------------
# Task


def build_task(cfg: DictConfig) -> FinetuneTask:
    task = cfg.task
    if task not in SPECS:
        raise EvlpError(f"task={task!r} is not a GLUE task; expected one of {', '.join(SPECS)}")
    spec = SPECS[task]
    if cfg.model.num_classes != spec.num_classes:
        kind = "a regression task (num_classes=1)" if spec.regression else f"{spec.num_classes} classes"
        raise EvlpError(f"model.num_classes={cfg.model.num_classes}, but GLUE {task} has {kind}")

    try:
        parts = load_pretrained(cfg.model.model_path, keep="text")
    except EvlpError as e:
        raise EvlpError(f"GLUE fine-tuning starts from the text tower of an evlp pretraining checkpoint: {e}") from None
    tower = parts.student.text_tower
    width = tower.width
    pooler, pooler_note = pretrained_pooler(parts.run_cfg, width)
    model = TextClassifier(tower, spec.num_classes, dropout=cfg.model.dropout, pooler=pooler)
    model.train()
    parts.student = parts.image_tower = None  # the image tower, shared block and heads are not needed

    data = load_glue_splits(cfg, task)
    hf_tokenizer = parts.tokenizer.tokenizer
    encoder = getattr(tower, "bert", None) or tower.model
    positions = min(getattr(encoder.config, "max_position_embeddings", None) or 10**9,
                    getattr(hf_tokenizer, "model_max_length", None) or 10**9)
    max_len = min(int(cfg.data.max_text_len), positions)
    if max_len < cfg.data.max_text_len:
        log.info("GLUE %s: data.max_text_len=%d capped at the text tower's %d positions", task,
                 cfg.data.max_text_len, positions)
    collate = GlueCollate(hf_tokenizer, max_len, spec.regression)
    train_rows = GlueRows(_limited(data["train"], cfg.data.limit_train_samples), spec.columns)
    val_rows = [GlueRows(_limited(data[split], cfg.data.limit_val_samples), spec.columns)
                for split, _ in spec.val_splits]
    batch, workers = int(cfg.data.batch_size), int(cfg.data.num_workers)
    if len(train_rows) < batch:
        raise EvlpError(f"GLUE {task}: {len(train_rows)} training rows, fewer than one batch of "
                        f"data.batch_size={batch} (incomplete batches are dropped, as in the original)")
    loader = dict(num_workers=workers, collate_fn=collate, persistent_workers=workers > 0,
                  pin_memory=torch.cuda.is_available())
    # Shuffled, incomplete last batch dropped (the original's datamodule); Lightning adds a DistributedSampler
    # under DDP, which pads the validation sets with repeated samples that the module drops by index.
    train_loader = DataLoader(train_rows, batch_size=batch, shuffle=True, drop_last=True, **loader)
    val_loaders = [DataLoader(rows, batch_size=int(cfg.data.eval_batch_size), shuffle=False, **loader)
                   for rows in val_rows]

    metrics = TASK_METRICS[task]
    first_prefix = spec.val_splits[0][1]
    monitor = f"val/{first_prefix}{metrics[0]}"
    prefixes = [prefix for _, prefix in spec.val_splits]
    # The pretraining run's config and the head count (the one size the weights do not show) let
    # load_text_classifier rebuild the classifier from this module's checkpoints alone.
    module = GlueModule(cfg, model, prefixes, cfg=OmegaConf.to_container(parts.run_cfg, resolve=True), glue={
        "task": task, "num_classes": spec.num_classes, "max_len": max_len,
        "source": str(cfg.model.model_path), "tokenizer": str(hf_tokenizer.name_or_path),
        "pooler": "pretrained" if pooler is not None else "fresh",
        "num_heads": int(getattr(encoder.config, "num_attention_heads", 0) or 0),
        "dropout": float(cfg.model.dropout)})

    head = f"Linear({width}→{spec.num_classes})"
    summary = f"{parts.summary}; {pooler_note}; head: dropout {cfg.model.dropout}, {head}"
    validation = {split: len(rows) for (split, _), rows in zip(spec.val_splits, val_rows)}
    protocol = {
        "task": f"GLUE {task} ({'regression' if spec.regression else f'{spec.num_classes} classes'})",
        "data": str(Path(cfg.data_path) / "glue" / task),
        "train": f"train, {len(train_rows):,} rows",
        "validation": ", ".join(f"{split}, {n:,} rows" for split, n in validation.items()),
        "test": "not evaluated (GLUE's test labels are hidden)",
        "input": f"{' + '.join(spec.columns)}, longest-first truncation to {max_len} tokens",
        "metric": "; ".join(f"{DEFINITIONS[m]}, in percent" for m in metrics)
                  + ", over the whole validation set" + (" (each)" if len(val_rows) > 1 else ""),
    }
    return FinetuneTask(
        module=module, train_loader=train_loader,
        val_loaders=val_loaders if len(val_loaders) > 1 else val_loaders[0],
        monitor=monitor, headline={DISPLAY_NAMES[metrics[0]]: monitor}, summary=summary, protocol=protocol,
        mode="max",
    )


# ---------------------------------------------------------------------------------------------------------------
# Using the fine-tuned classifier


class GlueEncoder:
    """``encode(first, second=None)``: a sentence (pair), or lists of them, as the model's inputs
    (``token_ids``, ``padding_mask``, ``token_type_ids``), tokenised as in training (:class:`GlueCollate`)."""

    def __init__(self, tokenizer, max_len: int, task: str, device: torch.device | str = "cpu"):
        self.tokenizer, self.max_len, self.task, self.device = tokenizer, max_len, task, device
        self._collate = GlueCollate(tokenizer, max_len, regression=False)

    def __call__(self, first: str | list[str], second: str | list[str] | None = None) -> dict[str, torch.Tensor]:
        pair = len(SPECS[self.task].columns) == 2
        if pair != (second is not None):
            raise EvlpError(f"GLUE {self.task} takes {'sentence pairs' if pair else 'single sentences'}; "
                            f"call encode({'first, second' if pair else 'sentence'})")
        columns = [first] if second is None else [first, second]
        columns = [[c] if isinstance(c, str) else list(c) for c in columns]
        if len({len(c) for c in columns}) != 1:
            raise EvlpError(f"encode: {len(columns[0])} first sentences but {len(columns[1])} second ones")
        batch = self._collate([(i, texts, 0) for i, texts in enumerate(zip(*columns))])
        return {k: batch[k].to(self.device) for k in ("token_ids", "padding_mask", "token_type_ids")}


def load_text_classifier(path: str | Path, device: torch.device | str = "cpu"):
    """``(classifier in eval mode on device, encode, info)`` from a GLUE fine-tuning checkpoint alone (read with
    ``weights_only=True``, loaded strictly; neither the pretraining checkpoint nor the data is read). ``encode`` is a
    :class:`GlueEncoder`; ``info`` holds ``task``, ``num_classes``, ``regression``, ``max_len``, ``labels`` (the
    class names, None for STS-B's 0-5 score), ``source`` (the pretraining checkpoint) and ``tokenizer``."""
    from evlp.config import RunConfig, stored_config
    from evlp.eval.checkpoint import TEXT_EMBEDDINGS, StudentCheckpoint, _hf_tokenizer, fit_bert_sizes
    from evlp.train.checkpoint import load_training_checkpoint

    path = Path(path)
    ckpt = load_training_checkpoint(path)
    hparams = (ckpt.get("hyper_parameters") or {}) if isinstance(ckpt, dict) else {}
    glue, run_cfg = hparams.get("glue"), hparams.get("cfg")
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    expected = "expected the best checkpoint of `evlp finetune --config fine_tuning/<glue task>`"
    if not isinstance(glue, dict) or not isinstance(state, dict) or glue.get("task") not in SPECS:
        raise EvlpError(f"{path} is not an evlp GLUE fine-tuning checkpoint (no hyper_parameters['glue']); {expected}")
    if not isinstance(run_cfg, dict) or not glue.get("num_heads"):
        raise EvlpError(f"{path}: a GLUE checkpoint written before evlp kept the pretraining run's config in it; "
                        f"rebuild it with glue.build_task(cfg).module.load_state_dict, or fine-tune again")
    cfg = stored_config(run_cfg, RunConfig, str(path))
    task = glue["task"]
    hf_tokenizer = _hf_tokenizer(StudentCheckpoint(path, cfg, {}, None, []))
    # The tower is rebuilt as the S-SMKE student is (evlp.eval.checkpoint), its sizes read off the weights.
    tower_state = {"text_tower." + k[len("model.tower."):]: v for k, v in state.items()
                   if k.startswith("model.tower.")}
    text = OmegaConf.create(OmegaConf.to_container(cfg.model.text_tower))
    if text.kind == "bert":
        words = TEXT_EMBEDDINGS + "word_embeddings.weight"
        if words not in tower_state:
            raise EvlpError(f"{path}: no BERT text tower weights (model.tower.bert.*); {expected}")
        fit_bert_sizes(text, tower_state, hf_tokenizer, path)
        text.num_heads = int(glue["num_heads"])
    elif text.kind != "hf":
        raise EvlpError(f"{path}: text tower kind {text.kind!r} is not supported; expected 'bert' or 'hf'")
    tower = build_text_tower(text, hf_tokenizer, load_weights=False)  # hf: from its config file, no weights
    model = TextClassifier(tower, int(glue["num_classes"]), dropout=float(glue.get("dropout", 0.1)))
    weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    load_exact(model, weights, f"{path} (the classifier its config describes)")
    model.to(device).eval()
    info = {"task": task, "num_classes": model.num_classes, "regression": model.num_classes == 1,
            "max_len": int(glue["max_len"]), "labels": list(LABEL_NAMES[task]) if LABEL_NAMES[task] else None,
            "source": glue.get("source"), "tokenizer": glue.get("tokenizer")}
    if info["regression"]:
        info["score_range"] = (0.0, 5.0)
    return model, GlueEncoder(hf_tokenizer, info["max_len"], task, device), info
