"""ImageNet-1K zero-shot classification and COCO/Flickr30K retrieval of a student, shared by ``evlp eval`` and the
training callbacks (``evlp.train.eval_callbacks``).

Both embed images through a map-style DataLoader with workers (``embed_images``), under ``inference_mode`` and, on
GPU, bf16 autocast; the embeddings are re-normalised in float32 and ranked in float32 in chunks (``retrieval_metrics``,
``zero_shot_accuracy``). Text is tokenised with the checkpoint's tokenizer and ``max_text_len``; padding columns no
caption of a batch uses are dropped first, which changes nothing (padding is masked in attention) but the cost.
"""

from __future__ import annotations

import logging
import string
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from torch import nn
from tqdm import tqdm

from evlp.data.tokenizer import TextTokenizer
from evlp.data.transforms import eval_transform
from evlp.eval.datasets import ImageNetVal, RetrievalSplit, image_loader
from evlp.eval.embed import embed_images, inference, resolve_device, to_unit_float
from evlp.eval.retrieval import RECALL_KS, chance_retrieval_metrics, retrieval_metrics
from evlp.eval.zero_shot import zero_shot_accuracy, zero_shot_classifier
from evlp.train.checkpoint import atomic_torch_save

log = logging.getLogger("evlp")

RECALL_DEFINITION = ("TR@k (image->text): per image, 1 if ANY of its captions is among the k best-scored captions; "
                     "IR@k (text->image): per caption, 1 if its image is among the k best-scored images; each averaged "
                     "over its queries, in percent; scores = dot products of L2-normalised embeddings")
ZEROSHOT_DEFINITION = ("class weight = L2-normalised mean of the L2-normalised embeddings of the class's prompts "
                       "(every template filled with the class name); top-k: the label is among the k classes of "
                       "highest cosine similarity with the image embedding; percent of images")


def eval_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU (as in training); plain float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else None


def precision_name(device: torch.device) -> str:
    return "bf16 autocast, float32 scores" if eval_dtype(device) else "float32"


class TrimmedTokenizer:
    """``TextTokenizer`` whose batches drop the trailing padding columns no text in the batch reaches."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        token_ids, padding_mask = self.tokenizer(texts)
        used = int((~padding_mask).sum(dim=1).max()) if len(texts) else 0
        return token_ids[:, :used], padding_mask[:, :used]


def embed_texts(model: nn.Module, tokenizer: TextTokenizer, texts: list[str], device: torch.device | None = None,
                batch_size: int = 1024, progress: bool = True) -> torch.Tensor:
    """``(M, D)`` float32 L2-normalised embeddings of ``texts`` on the CPU, in order.

    Retrieval embeds captions with this and images with ``embed_images`` rather than with ``embed_retrieval_set``,
    whose one-row-per-caption loader would decode and resize every image once per caption (5x the image work)."""
    device = resolve_device(model, device)
    tokenize = TrimmedTokenizer(tokenizer)
    chunks = []
    with inference(model, device, eval_dtype(device)):
        for start in tqdm(range(0, len(texts), batch_size), desc="embedding captions", unit="batch",
                          disable=not progress):
            token_ids, padding_mask = tokenize(texts[start: start + batch_size])
            chunks.append(to_unit_float(model.encode_text(token_ids.to(device), padding_mask.to(device))))
    return torch.cat(chunks)


def embed_image_files(model: nn.Module, paths: list[Path], image_size: int, device: torch.device, batch_size: int,
                      num_workers: int, progress: bool = True) -> torch.Tensor:
    """``(N, D)`` float32 L2-normalised embeddings of image files, resized with the pretraining eval transform."""
    loader = image_loader(paths, eval_transform(image_size), batch_size, num_workers)
    embeddings, _ = embed_images(model, loader, device=device, dtype=eval_dtype(device), progress=progress)
    return embeddings


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot


def _separates_words(char: str) -> bool:
    """Whitespace or punctuation, where BERT's pre-tokenizer always cuts (whitespace: only space, tab and newline, to
    stay within what every Unicode definition agrees on)."""
    return char in " \t\n" or char in string.punctuation or unicodedata.category(char).startswith("P")


def _wordpiece_pipeline(hf_tokenizer) -> bool:
    """BERT's normaliser and pre-tokenizer (word pieces never span whitespace or punctuation) and ``[CLS] x [SEP]``."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    return (backend is not None and isinstance(backend.pre_tokenizer, BertPreTokenizer)
            and isinstance(backend.normalizer, BertNormalizer)
            and hf_tokenizer("")["input_ids"] == [hf_tokenizer.cls_token_id, hf_tokenizer.sep_token_id])


class PromptTokens:
    """The ids of every prompt (class-major, as ``zero_shot_classifier`` forms them), computed once; called like a
    tokenizer, it looks a batch's rows up and trims the padding no prompt of the batch reaches.

    Tokenising 80,000 prompts one by one costs more than encoding them with a small model. With BERT's WordPiece a
    word piece never spans whitespace or punctuation, so where a template puts ``{}`` next to such a character the
    prompt's ids are exactly the ids of the template's two halves and of the class name, joined; those 1,080 strings
    are tokenised instead. Other prompts (and other tokenizers) are tokenised whole. Either way the ids equal
    ``tokenizer(prompts)``, truncation included. The callbacks reuse one instance across validations."""

    def __init__(self, tokenizer: TextTokenizer, classnames: list[str], templates: list[str], progress: bool = True):
        hf, max_len, pad = tokenizer.tokenizer, tokenizer.max_len, tokenizer.pad_id
        pairs = [(name, template) for name in classnames for template in templates]
        self.row = {template.format(name): i for i, (name, template) in enumerate(pairs)}
        self.token_ids = torch.full((len(pairs), max_len), pad, dtype=torch.long)
        lengths = torch.zeros(len(pairs), dtype=torch.long)

        def joinable(name: str, template: str) -> bool:
            if template.count("{}") != 1:
                return False
            left, right = template.split("{}")
            return bool(name) and (not left or _separates_words(left[-1]) or _separates_words(name[0])) and (
                not right or _separates_words(right[0]) or _separates_words(name[-1]))

        joined = [i for i, pair in enumerate(pairs) if joinable(*pair)] if _wordpiece_pipeline(hf) else []
        if joined:
            pieces = sorted({*classnames, *(half for t in templates for half in t.split("{}"))})
            ids_of = dict(zip(pieces, hf(pieces, add_special_tokens=False)["input_ids"]))
            rows, joined_lengths = [], []
            for i in joined:
                name, template = pairs[i]
                left, right = template.split("{}")
                content = (ids_of[left] + ids_of[name] + ids_of[right])[: max_len - 2]
                rows.append([hf.cls_token_id, *content, hf.sep_token_id] + [pad] * (max_len - 2 - len(content)))
                joined_lengths.append(len(content) + 2)
            self.token_ids[joined], lengths[joined] = torch.tensor(rows), torch.tensor(joined_lengths)
        whole = sorted(set(range(len(pairs))) - set(joined))
        for start in tqdm(range(0, len(whole), 4096), desc="tokenising prompts", unit="chunk",
                          disable=not progress or not whole):
            rows = whole[start: start + 4096]
            token_ids, padding_mask = tokenizer([pairs[i][1].format(pairs[i][0]) for i in rows])
            self.token_ids[rows], lengths[rows] = token_ids, (~padding_mask).sum(dim=1)
        self.padding_mask = torch.arange(max_len) >= lengths[:, None]  # padding is always at the end

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.tensor([self.row[p] for p in prompts])
        padding_mask = self.padding_mask[rows]
        used = int((~padding_mask).sum(dim=1).max())
        return self.token_ids[rows, :used], padding_mask[:, :used]


def build_classifier(model: nn.Module, prompt_tokens: PromptTokens, classnames: list[str], templates: list[str],
                     device: torch.device, classes_per_step: int = 50, progress: bool = True) -> torch.Tensor:
    """``(D, C)`` float32 class weights on ``device`` (``zero_shot_classifier``), a few classes at a time so a progress
    bar can follow the 80,000 prompts of ImageNet; each class's weight depends on its own prompts only."""
    parts = []
    steps = range(0, len(classnames), classes_per_step)
    for start in tqdm(steps, desc="zero-shot classifier", unit=f"{classes_per_step} classes", disable=not progress):
        parts.append(zero_shot_classifier(model, prompt_tokens, classnames[start: start + classes_per_step],
                                          templates, device=device, batch_size=4096, dtype=eval_dtype(device)))
    return torch.cat(parts, dim=1)


def cached_classifier(cache_file: Path | None, build) -> tuple[torch.Tensor, bool]:
    """``(classifier, was_cached)``: the tensor saved in ``cache_file``, else ``build()`` saved there (atomically)."""
    if cache_file is not None and cache_file.is_file():
        try:
            return torch.load(cache_file, map_location="cpu", weights_only=True)["classifier"], True
        except Exception as e:  # a truncated or foreign file: rebuild and replace it
            log.warning("ignoring unreadable zero-shot cache %s (%s)", cache_file, e)
    classifier = build()
    if cache_file is not None:
        try:
            atomic_torch_save({"classifier": classifier.cpu()}, cache_file)
        except OSError as e:  # e.g. a read-only data folder: the result stands, only the next run is slower
            log.warning("could not cache the zero-shot classifier in %s (%s)", cache_file, e)
    return classifier, False


@dataclass
class ZeroShotRun:
    metrics: dict[str, float]  # top1, top5 (percent)
    image_embeddings: torch.Tensor  # (N, D) float32, CPU
    classifier: torch.Tensor  # (D, C) float32


def run_zeroshot(model: nn.Module, data: ImageNetVal, classifier: torch.Tensor, image_size: int, device: torch.device,
                 batch_size: int = 256, num_workers: int = 8, progress: bool = True) -> ZeroShotRun:
    """Top-1/top-5 accuracy of ``classifier`` (``build_classifier``) on the images of ``data``."""
    embeddings = embed_image_files(model, data.paths, image_size, device, batch_size, num_workers, progress)
    metrics = zero_shot_accuracy(embeddings.to(device), classifier.to(device), torch.tensor(data.labels), topk=(1, 5))
    return ZeroShotRun(metrics, embeddings, classifier)


# ---------------------------------------------------------------------------------------------------------------
# Retrieval


@dataclass
class RetrievalRun:
    metrics: dict[str, float]  # TR@k, IR@k, mean_recall, R@1 (percent)
    chance: dict[str, float]
    image_embeddings: torch.Tensor  # (N, D) float32, CPU
    text_embeddings: torch.Tensor  # (M, D) float32, CPU


def summarise_recalls(recalls: dict[str, float]) -> dict[str, float]:
    """Adds ``mean_recall`` (mean of the six recalls, the original's ``average_score``) and ``R@1`` (mean of TR@1 and
    IR@1, the "R@1" column of the seed README's results table)."""
    six = [recalls[f"{d}@{k}"] for d in ("TR", "IR") for k in RECALL_KS]
    return {**recalls, "mean_recall": sum(six) / len(six), "R@1": (recalls["TR@1"] + recalls["IR@1"]) / 2}


def run_retrieval(model: nn.Module, tokenizer: TextTokenizer, split: RetrievalSplit, image_size: int,
                  device: torch.device, batch_size: int = 256, num_workers: int = 8,
                  progress: bool = True) -> RetrievalRun:
    """TR@1/5/10, IR@1/5/10, their mean and R@1 of the model on ``split`` (percent), with chance levels."""
    images = embed_image_files(model, split.image_paths, image_size, device, batch_size, num_workers, progress)
    texts = embed_texts(model, tokenizer, split.captions, device, progress=progress)
    text_to_image = torch.tensor(split.caption_image)
    recalls = retrieval_metrics(images.to(device), texts.to(device), text_to_image)
    chance = chance_retrieval_metrics(text_to_image, len(images))
    return RetrievalRun(summarise_recalls(recalls), summarise_recalls(chance), images, texts)
