"""CLIP-style zero-shot classification: prompt-ensemble class prototypes and top-k accuracy."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from evlp.eval.embed import inference, resolve_device

Template = str | Callable[[str], str]
Tokenizer = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


def zero_shot_classifier(
    model: nn.Module,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    templates: Sequence[Template],
    device: torch.device | str | None = None,
    batch_size: int = 512,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """(D, C) float32 class prototypes: per class, the L2-normalised mean of its L2-normalised prompt embeddings.

    This is open_clip's ``build_zero_shot_classifier`` convention (and the original EV-LP one). Each template is a
    format string with one ``{}`` (e.g. ``"a photo of a {}."``) or a callable ``classname -> prompt``. ``tokenizer``
    maps a list of prompts to ``(token_ids (B, L) long, padding_mask (B, L) bool)``; ``batch_size`` prompts go through
    ``model.encode_text`` at a time. ``device`` defaults to the model's; ``dtype`` turns on autocast. The result is on
    ``device``.
    """
    if not classnames or not templates:
        raise ValueError(f"need at least one class name and one template; got {len(classnames)} and {len(templates)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    device = resolve_device(model, device)
    prompts = [t.format(name) if isinstance(t, str) else t(name) for name in classnames for t in templates]
    class_of_prompt = torch.arange(len(classnames), device=device).repeat_interleave(len(templates))  # (C * T,)
    # Normalising a sum gives the same direction as normalising the mean, so only per-class sums are kept: memory
    # stays (C, D) however many prompts there are.
    sums = None
    with inference(model, device, dtype):
        for start in range(0, len(prompts), batch_size):
            token_ids, padding_mask = tokenizer(prompts[start : start + batch_size])
            embeddings = model.encode_text(token_ids.to(device), padding_mask.to(device))  # (B, D)
            embeddings = F.normalize(embeddings.float(), dim=-1)
            if sums is None:
                sums = embeddings.new_zeros(len(classnames), embeddings.shape[1])
            sums.index_add_(0, class_of_prompt[start : start + len(embeddings)], embeddings)
    return F.normalize(sums, dim=-1).T.contiguous()


@torch.inference_mode()
def zero_shot_accuracy(
    image_embeddings: torch.Tensor,
    classifier: torch.Tensor,
    labels: torch.Tensor,
    topk: Sequence[int] = (1, 5),
    chunk_size: int = 4096,
) -> dict[str, float]:
    """Top-k accuracy (percent) of ``image_embeddings`` (N, D) against class prototypes ``classifier`` (D, C).

    ``labels`` (N,) are class indices. Returns ``top{k}`` for each k in ``topk`` with k <= C (a larger k would be
    trivially 100 %). Logits are plain dot products: CLIP's logit scale (100) multiplies all of them by one positive
    number, which changes no ranking and so no accuracy. The top-k list is the first k of ``torch.topk(logits,
    max(topk))``, as in open_clip's and CLIP_benchmark's ``accuracy`` (this fixes how exact ties are broken).
    ``chunk_size`` images are scored at a time, on the device of ``image_embeddings``.
    """
    if image_embeddings.dim() != 2 or classifier.dim() != 2 or image_embeddings.shape[1] != classifier.shape[0]:
        raise ValueError(
            f"expected image_embeddings (N, D) and classifier (D, C); got {tuple(image_embeddings.shape)} and "
            f"{tuple(classifier.shape)}"
        )
    n_images, n_classes = image_embeddings.shape[0], classifier.shape[1]
    if labels.shape != (n_images,) or labels.is_floating_point() or n_images == 0:
        raise ValueError(
            f"labels must be a non-empty integer tensor of shape ({n_images},); "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"labels must be class indices in [0, {n_classes})")
    ks = sorted({k for k in topk if k <= n_classes})
    if not ks or ks[0] < 1:
        raise ValueError(f"topk must hold positive values <= the {n_classes} classes; got {tuple(topk)}")
    device = image_embeddings.device
    dtype = torch.promote_types(image_embeddings.dtype, torch.float32)
    classifier = classifier.to(device=device, dtype=dtype)
    labels = labels.to(device=device, dtype=torch.long)

    correct = torch.zeros(len(ks), dtype=torch.long, device=device)
    for start in range(0, n_images, chunk_size):
        logits = image_embeddings[start : start + chunk_size].to(dtype) @ classifier  # (c, C)
        predicted = logits.topk(ks[-1], dim=1).indices  # (c, max k), best first
        is_label = predicted == labels[start : start + chunk_size, None]
        correct += torch.stack([is_label[:, :k].any(dim=1).sum() for k in ks])
    return {f"top{k}": 100.0 * int(n) / n_images for k, n in zip(ks, correct)}
