"""Evaluation on the run's validation split: image-text retrieval and the quickstart's zero-shot attribute tasks.

``evaluate_split`` computes the numbers; ``evaluate_pretrained`` (after training: ``results.json``, with chance
levels, and ``retrieval_examples.png``) and the quickstart callbacks (``evlp.train.eval_callbacks``, at every
validation) both call it. The quickstart's split is scored with the per-caption protocol of its published numbers
(``retrieval_metrics``); any other split against its distinct captions, with the unique-caption subset beside
(``evlp.eval.captions``), since real captions repeat.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from PIL import Image

from evlp.data.shards import make_loader, read_images
from evlp.eval import (
    RetrievalEmbeddings,
    chance_retrieval_metrics,
    embed_retrieval_set,
    retrieval_metrics,
    zero_shot_accuracy,
    zero_shot_classifier,
)
from evlp.eval.captions import caption_retrieval_metrics, distinct_pairs
from evlp.eval.report import spread, save_text_query_examples
from evlp.train.data import QUICKSTART

EXAMPLES_PNG = "retrieval_examples.png"
DISTINCT_CAPTION_RECALL = (
    "ranked against the distinct captions (repeats merged; an image's positives are its captions, a caption's are "
    "all images paired with it; a tie with a negative counts as a miss); TR@k: image->text, IR@k: text->image; "
    "unique_*: the same over the queries whose caption describes one image only; mean_recall: mean of the six")


@dataclass
class SplitEvaluation:
    images: int
    captions: int
    retrieval: dict[str, float] | None = None  # TR/IR@1/5/10, percent
    zeroshot: dict | None = None  # {"top1": mean over tasks, "tasks": {name: {top1, classes, images, templates}}}
    chance: dict = field(default_factory=dict)  # {"retrieval": {...}, "zeroshot": {"top1": ...}} for what was run
    counts: dict = field(default_factory=dict)  # distinct captions and the unique-caption subset (distinct_captions)
    embeddings: RetrievalEmbeddings | None = None


def first_images(batches: Iterable[dict], max_images: int | None) -> Iterator[dict]:
    """The rows of a retrieval loader up to the first row of its ``max_images + 1``-th distinct image; stops reading
    there. On the quickstart split (one caption per image, every sample drawn independently) these are a random
    subset of ``max_images`` images with their captions, the same at every call."""
    seen: set[int] = set()
    for batch in batches:
        if max_images is None:
            yield batch
            continue
        end = len(batch["image_id"])
        for row, image_id in enumerate(batch["image_id"].tolist()):
            if image_id not in seen and len(seen) == max_images:
                end = row
                break
            seen.add(image_id)
        if end:
            yield {key: value[:end] for key, value in batch.items()}
        if end < len(batch["image_id"]):
            return


def evaluate_split(student, text_tokenizer, val_set, device: torch.device, retrieval: bool = True,
                   zeroshot: bool = True, max_images: int | None = None, progress: bool = True,
                   distinct_captions: bool = False) -> SplitEvaluation:
    """Embed the split once (each distinct image once, every caption); then TR/IR@1/5/10 if ``retrieval`` (with
    ``distinct_captions``: against the distinct captions, with the unique-caption subset and ``mean_recall``s), and if
    ``zeroshot`` the top-1 accuracy of every task of ``evlp.data.synthetic.zero_shot_tasks`` (the quickstart's
    attributes, read from each image's metadata; a task no image has a label for is left out), with chance levels.
    ``max_images``: only the first that many images (``first_images``)."""
    dtype = torch.bfloat16 if device.type == "cuda" else None
    batches = first_images(make_loader(val_set, 0), max_images)
    emb = embed_retrieval_set(student, batches, device=device, dtype=dtype, progress=progress)
    num_images = emb.image_embeddings.shape[0]
    result = SplitEvaluation(images=num_images, captions=emb.text_embeddings.shape[0], embeddings=emb)
    if retrieval and distinct_captions:
        scored = caption_retrieval_metrics(emb.image_embeddings, emb.text_embeddings, emb.text_to_image, emb.captions)
        result.retrieval, result.chance["retrieval"], result.counts = scored.metrics, scored.chance, scored.counts
    elif retrieval:
        result.retrieval = retrieval_metrics(emb.image_embeddings, emb.text_embeddings, emb.text_to_image)
        result.chance["retrieval"] = chance_retrieval_metrics(emb.text_to_image, num_images)
    if zeroshot:
        from evlp.data.synthetic import zero_shot_tasks

        tasks, chance_top1 = {}, []
        for task in zero_shot_tasks():
            labels = [task.label(meta) for meta in emb.metas]
            keep = [i for i, y in enumerate(labels) if y is not None]
            if not keep:
                continue
            with torch.inference_mode():
                classifier = zero_shot_classifier(student, text_tokenizer, task.classnames, task.templates,
                                                  device=device)
            acc = zero_shot_accuracy(emb.image_embeddings[keep], classifier.to(emb.image_embeddings.device),
                                     torch.tensor([labels[i] for i in keep]), topk=(1,))
            tasks[task.name] = {"top1": acc["top1"], "classes": len(task.classnames), "images": len(keep),
                                "templates": len(task.templates)}
            chance_top1.append(100.0 / len(task.classnames))
        if tasks:
            result.zeroshot = {"top1": sum(t["top1"] for t in tasks.values()) / len(tasks), "tasks": tasks}
            result.chance["zeroshot"] = {"top1": sum(chance_top1) / len(chance_top1)}
    return result


def evaluate_pretrained(cfg: DictConfig, student, text_tokenizer, val_set, device, run_dir: Path | None = None) -> dict:
    """``results.json`` content: ``retrieval`` (TR/IR@1/5/10 %; off the quickstart, against the distinct captions
    with the unique-caption subset), ``zeroshot`` (``top1`` % + per task), ``chance``; with ``run_dir``, also
    ``retrieval_examples.png`` there (``examples`` names it)."""
    results: dict = {"protocol": {}}
    if val_set is None or not (cfg.eval.retrieval or cfg.eval.zeroshot):
        return results
    quickstart = QUICKSTART in list(cfg.data.val)
    split = evaluate_split(student, text_tokenizer, val_set, device, retrieval=cfg.eval.retrieval,
                           zeroshot=cfg.eval.zeroshot and quickstart, distinct_captions=not quickstart)
    results["protocol"] = {
        "split": "validation shards: " + ", ".join(sorted({u.rsplit('/', 2)[-2] for u in val_set.urls})),
        "images": split.images, "captions": split.captions,
        **({"distinct captions": split.counts["captions"], "unique captions": split.counts["unique_captions"],
            "images with unique captions": split.counts["unique_caption_images"]} if split.counts else {}),
        "embedding": "L2-normalised CLS of the shared block output",
        "resolution": cfg.data.image_size,
        "recall": DISTINCT_CAPTION_RECALL if split.counts else
        "TR@k: image->text, hit if any of its captions is in the top k; IR@k: text->image",
    }
    if split.retrieval is not None:
        results["retrieval"] = split.retrieval
        if run_dir is not None and split.embeddings.captions:
            save_split_examples(split.embeddings, val_set.urls, run_dir / EXAMPLES_PNG)
            results["examples"] = EXAMPLES_PNG
    if split.zeroshot is not None:
        results["zeroshot"] = split.zeroshot
    if cfg.eval.chance:
        results["chance"] = split.chance
    return results


def save_split_examples(emb: RetrievalEmbeddings, urls: Iterable[str], path: Path, queries: int = 4) -> Path:
    """``save_text_query_examples`` for ``queries`` captions spread over the split's unique captions (all distinct
    captions if none is unique), the images read back from the shards."""
    pairs = distinct_pairs(emb.text_to_image, emb.captions, len(emb.image_embeddings))
    candidates = pairs.unique_captions().nonzero().squeeze(1).tolist() or list(range(len(pairs.captions)))
    chosen = [candidates[i] for i in spread(queries, len(candidates))]
    text_embeddings = emb.text_embeddings[pairs.first_row]

    def load_images(rows: list[int]) -> list[Image.Image]:
        ids = [int(emb.image_ids[row]) for row in rows]
        encoded = read_images(urls, set(ids))
        return [Image.open(io.BytesIO(encoded[i])) for i in ids]

    return save_text_query_examples(pairs.captions, pairs.positives_of_captions(), text_embeddings,
                                    emb.image_embeddings, load_images, path, chosen,
                                    title="validation split: top-5 images per caption (its own framed green)")
