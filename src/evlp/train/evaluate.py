"""Evaluation after pretraining: retrieval on the validation split, zero-shot classification, chance levels."""

from __future__ import annotations

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


def evaluate_pretrained(cfg: DictConfig, student, text_tokenizer, val_set, device) -> dict:
    """``results.json`` content: ``retrieval`` (TR/IR@1/5/10 %), ``zeroshot`` (``top1`` % + per task), ``chance``."""
    results: dict = {"protocol": {}}
    if val_set is None or not (cfg.eval.retrieval or cfg.eval.zeroshot):
        return results
    dtype = torch.bfloat16 if device.type == "cuda" else None
    emb = embed_retrieval_set(student, make_loader(val_set, 0), device=device, dtype=dtype)
    num_images, num_texts = emb.image_embeddings.shape[0], emb.text_embeddings.shape[0]
    results["protocol"] = {
        "split": "validation shards: " + ", ".join(sorted({u.rsplit('/', 2)[-2] for u in val_set.urls})),
        "images": num_images, "captions": num_texts,
        "embedding": "L2-normalised CLS of the shared block output",
        "resolution": cfg.data.image_size,
        "recall": "TR@k: image->text, hit if any of its captions is in the top k; IR@k: text->image",
    }
    chance: dict = {}
    if cfg.eval.retrieval:
        results["retrieval"] = retrieval_metrics(emb.image_embeddings, emb.text_embeddings, emb.text_to_image)
        chance["retrieval"] = chance_retrieval_metrics(emb.text_to_image, num_images)
    if cfg.eval.zeroshot and "quickstart" in list(cfg.data.val):
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
            results["zeroshot"] = {"top1": sum(t["top1"] for t in tasks.values()) / len(tasks), "tasks": tasks}
            chance["zeroshot"] = {"top1": sum(chance_top1) / len(chance_top1)}
    if cfg.eval.chance:
        results["chance"] = chance
    return results
