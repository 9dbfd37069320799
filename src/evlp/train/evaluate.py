"""Evaluation on the run's validation split: image-text retrieval and the quickstart's zero-shot attribute tasks.

``evaluate_split`` computes the numbers; ``evaluate_pretrained`` (after training: ``results.json``, with chance
levels) and the quickstart callbacks (``evlp.train.eval_callbacks``, at every validation) both call it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from evlp.data.shards import make_loader
from evlp.eval import (
    chance_retrieval_metrics,
    embed_retrieval_set,
    retrieval_metrics,
    zero_shot_accuracy,
    zero_shot_classifier,
)


@dataclass
class SplitEvaluation:
    images: int
    captions: int
    retrieval: dict[str, float] | None = None  # TR/IR@1/5/10, percent
    zeroshot: dict | None = None  # {"top1": mean over tasks, "tasks": {name: {top1, classes, images, templates}}}
    chance: dict = field(default_factory=dict)  # {"retrieval": {...}, "zeroshot": {"top1": ...}} for what was run


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
                   zeroshot: bool = True, max_images: int | None = None, progress: bool = True) -> SplitEvaluation:
    """Embed the split once (each distinct image once, every caption); then TR/IR@1/5/10 if ``retrieval``, and if
    ``zeroshot`` the top-1 accuracy of every task of ``evlp.data.synthetic.zero_shot_tasks`` (the quickstart's
    attributes, read from each image's metadata; a task no image has a label for is left out), with chance levels.
    ``max_images``: only the first that many images (``first_images``)."""
    dtype = torch.bfloat16 if device.type == "cuda" else None
    batches = first_images(make_loader(val_set, 0), max_images)
    emb = embed_retrieval_set(student, batches, device=device, dtype=dtype, progress=progress)
    num_images = emb.image_embeddings.shape[0]
    result = SplitEvaluation(images=num_images, captions=emb.text_embeddings.shape[0])
    if retrieval:
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


def evaluate_pretrained(cfg: DictConfig, student, text_tokenizer, val_set, device) -> dict:
    """``results.json`` content: ``retrieval`` (TR/IR@1/5/10 %), ``zeroshot`` (``top1`` % + per task), ``chance``."""
    results: dict = {"protocol": {}}
    if val_set is None or not (cfg.eval.retrieval or cfg.eval.zeroshot):
        return results
    split = evaluate_split(student, text_tokenizer, val_set, device, retrieval=cfg.eval.retrieval,
                           zeroshot=cfg.eval.zeroshot and "quickstart" in list(cfg.data.val))
    results["protocol"] = {
        "split": "validation shards: " + ", ".join(sorted({u.rsplit('/', 2)[-2] for u in val_set.urls})),
        "images": split.images, "captions": split.captions,
        "embedding": "L2-normalised CLS of the shared block output",
        "resolution": cfg.data.image_size,
        "recall": "TR@k: image->text, hit if any of its captions is in the top k; IR@k: text->image",
    }
    if split.retrieval is not None:
        results["retrieval"] = split.retrieval
    if split.zeroshot is not None:
        results["zeroshot"] = split.zeroshot
    if cfg.eval.chance:
        results["chance"] = split.chance
    return results
