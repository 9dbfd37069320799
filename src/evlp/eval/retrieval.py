"""Image-text retrieval recall@k in the CLIP-paper protocol, equal tie for tie to CLIP_benchmark, and its chance level.

Protocol (the one of CLIP, ALBEF, BEiT-3, EV-LP and CLIP_benchmark): scores are dot products of the embeddings.
TR@k (image -> text) is, per image, 1 if ANY of its captions is among the k best-scored captions; IR@k (text -> image)
is, per caption, 1 if its image is among the k best-scored images; each is averaged over its queries, in percent.
"""

from __future__ import annotations

import math

import torch

RECALL_KS = (1, 5, 10)


def _check_inputs(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, text_to_image: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate shapes and values; return float32 (or float64) embeddings and long ``text_to_image`` on one device."""
    if image_embeddings.dim() != 2 or text_embeddings.dim() != 2:
        raise ValueError(
            f"embeddings must be 2-D (count, dim); got image {tuple(image_embeddings.shape)}, "
            f"text {tuple(text_embeddings.shape)}"
        )
    if image_embeddings.shape[1] != text_embeddings.shape[1]:
        raise ValueError(f"embedding widths differ: image {image_embeddings.shape[1]}, text {text_embeddings.shape[1]}")
    n_img, n_txt = len(image_embeddings), len(text_embeddings)
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"need at least one image and one caption; got {n_img} images, {n_txt} captions")
    if text_to_image.shape != (n_txt,) or text_to_image.is_floating_point() or text_to_image.is_complex():
        raise ValueError(
            f"text_to_image must be an integer tensor of shape ({n_txt},); "
            f"got {text_to_image.dtype} {tuple(text_to_image.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    device = image_embeddings.device
    text_to_image = text_to_image.to(device=device, dtype=torch.long)
    if text_to_image.min() < 0 or text_to_image.max() >= n_img:
        raise ValueError(
            f"text_to_image values must index the {n_img} images; got range "
            f"[{int(text_to_image.min())}, {int(text_to_image.max())}]"
        )
    # Scores are compared for exact equality (ties), so they are computed in float32 at least, never in fp16/bf16.
    dtype = torch.promote_types(image_embeddings.dtype, torch.float32)
    images = image_embeddings.to(dtype)
    texts = text_embeddings.to(device=device, dtype=dtype)
    if not (torch.isfinite(images).all() and torch.isfinite(texts).all()):
        raise ValueError("embeddings contain NaN or infinite values")
    return images, texts, text_to_image


@torch.inference_mode()
def retrieval_hits(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: tuple[int, ...] = RECALL_KS,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query retrieval hits: ``(len(ks), N)`` bool image->text and ``(len(ks), M)`` bool text->image.

    ``image_embeddings`` (N, D), ``text_embeddings`` (M, D) and ``text_to_image`` (M,) (the image index of each
    caption) as in :func:`retrieval_metrics`, which documents the protocol and the tie convention.
    """
    images, texts, text_to_image = _check_inputs(image_embeddings, text_embeddings, text_to_image, chunk_size)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive; got {ks}")
    device = images.device
    n_img, n_txt = len(images), len(texts)
    # Sorted top-(k+1) candidates decide each query unless scores tie across the k boundary (see retrieval_metrics).
    n_cand_tr, n_cand_ir = min(max(ks) + 1, n_txt), min(max(ks) + 1, n_img)
    has_caption = torch.bincount(text_to_image, minlength=n_img) > 0  # (N,)

    tr_hits = torch.zeros(len(ks), n_img, dtype=torch.bool, device=device)
    # Text->image candidates of every caption over the image chunks seen so far, best first: (<= n_cand_ir, M).
    ir_values = torch.empty(0, n_txt, dtype=images.dtype, device=device)
    ir_indices = torch.empty(0, n_txt, dtype=torch.long, device=device)

    # One pass over the N x M score matrix, chunk_size images (full rows) at a time: the matrix product is by far the
    # dominant cost, so it is computed once and serves both directions.
    for start in range(0, n_img, chunk_size):
        scores = images[start : start + chunk_size] @ texts.T  # (c, M)
        rows = torch.arange(start, start + len(scores), device=device)  # (c,) image index of each row

        # Image -> text: every row is complete, so ties are resolved on exactly these scores.
        top = scores.topk(n_cand_tr, dim=1)  # (c, n_cand_tr), sorted best first
        candidate_is_positive = text_to_image[top.indices] == rows[:, None]
        for i, k in enumerate(ks):
            if k >= n_txt:  # every caption is retrieved
                tr_hits[i, rows] = has_caption[rows]
                continue
            hit = candidate_is_positive[:, :k].any(dim=1)
            tied = top.values[:, k - 1] == top.values[:, k]
            if tied.any():
                picked = scores[tied].topk(k, dim=1).indices  # (t, k)
                hit[tied] = (text_to_image[picked] == rows[tied, None]).any(dim=1)
            tr_hits[i, rows] = hit

        # Text -> image: merge this chunk's best images per caption into the running candidates. The merged values are
        # the exact top values of each caption's full row (their order among equal values is irrelevant: ties across a
        # k boundary are re-resolved on the full row below).
        chunk_top = scores.topk(min(n_cand_ir, len(scores)), dim=0)  # (<= n_cand_ir, M)
        ir_values = torch.cat([ir_values, chunk_top.values])
        ir_indices = torch.cat([ir_indices, chunk_top.indices + start])
        merged = ir_values.topk(min(n_cand_ir, len(ir_values)), dim=0)
        ir_values, ir_indices = merged.values, ir_indices.gather(0, merged.indices)

    ir_values, ir_indices = ir_values.T, ir_indices.T  # (M, n_cand_ir)
    candidate_is_positive = ir_indices == text_to_image[:, None]
    ir_hits = torch.zeros(len(ks), n_txt, dtype=torch.bool, device=device)
    for i, k in enumerate(ks):
        if k >= n_img:  # every image is retrieved
            ir_hits[i] = True
            continue
        ir_hits[i] = candidate_is_positive[:, :k].any(dim=1)
        tied = (ir_values[:, k - 1] == ir_values[:, k]).nonzero().squeeze(1)
        # Rare with real embeddings (exact float ties), but chunked all the same so memory stays bounded. The rows are
        # recomputed text-major, the orientation CLIP_benchmark computes its score matrix in.
        for tied_rows in tied.split(chunk_size):
            picked = (texts[tied_rows] @ images.T).topk(k, dim=1).indices  # (t, k)
            ir_hits[i, tied_rows] = (picked == text_to_image[tied_rows, None]).any(dim=1)
    return tr_hits, ir_hits


def retrieval_metrics(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    text_to_image: torch.Tensor,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@{1,5,10} of image->text (``TR@k``) and text->image (``IR@k``) retrieval, in percent.

    Args:
        image_embeddings: (N, D) one row per distinct image, L2-normalised (scores are plain dot products, so they
            are cosine similarities only for normalised inputs; nothing is re-normalised here).
        text_embeddings: (M, D) one row per caption, L2-normalised.
        text_to_image: (M,) integer, the row of ``image_embeddings`` each caption describes.
        chunk_size: images per block of the score matrix; at most ``chunk_size x max(N, M)`` scores are held at
            once (plus small per-query candidate lists). Results do not depend on it, except through last-bit
            differences the BLAS may make between block shapes, which can only flip near-exact ties.

    ``TR@k``: per image, 1 if ANY of its captions is among its top-k captions (an image with no caption counts as a
    miss); ``IR@k``: per caption, 1 if its image is among its top-k images. ``k`` larger than the candidate count
    retrieves every candidate. Scores are computed in float32 (float64 inputs stay float64), on the device of
    ``image_embeddings``.

    Tie convention: the top-k list of a query is the one ``torch.topk(scores_of_that_query, k)`` returns, called
    separately for each k, exactly as CLIP_benchmark's ``zeroshot_retrieval.recall_at_k`` does; so results equal
    CLIP_benchmark's, ties included, on the same device and for bit-identical scores. Where no two scores tie across
    the k-th place the top-k set is unique and read off the sorted top-(k+1) candidates; only queries with such a tie
    are re-ranked with ``torch.topk`` on their full score row. Which of several tied candidates ``torch.topk`` keeps
    is an implementation detail of the device (CPU and CUDA may differ); it matters only for exactly equal scores,
    e.g. duplicated captions or images.
    """
    tr_hits, ir_hits = retrieval_hits(image_embeddings, text_embeddings, text_to_image, RECALL_KS, chunk_size)
    metrics = {f"TR@{k}": 100.0 * int(tr_hits[i].sum()) / tr_hits.shape[1] for i, k in enumerate(RECALL_KS)}
    metrics |= {f"IR@{k}": 100.0 * int(ir_hits[i].sum()) / ir_hits.shape[1] for i, k in enumerate(RECALL_KS)}
    return metrics


def chance_retrieval_metrics(text_to_image: torch.Tensor, num_images: int) -> dict[str, float]:
    """Expected :func:`retrieval_metrics` (percent) when every query ranks its candidates uniformly at random.

    ``TR@k``: an image with c of the M captions misses with probability C(M-c, k) / C(M, k) (all k picks are other
    images' captions); ``IR@k`` = k / N (its one image among N). As in :func:`retrieval_metrics`, ``k`` is capped at
    the candidate count.
    """
    if text_to_image.dim() != 1 or len(text_to_image) == 0 or num_images < 1:
        raise ValueError(
            f"need a non-empty 1-D text_to_image and num_images >= 1; got shape "
            f"{tuple(text_to_image.shape)}, num_images={num_images}"
        )
    if text_to_image.min() < 0 or text_to_image.max() >= num_images:
        raise ValueError(f"text_to_image values must index the {num_images} images")
    n_txt = len(text_to_image)
    captions_per_image = torch.bincount(text_to_image.long().cpu(), minlength=num_images)
    # Images with the same caption count have the same expectation: one exact big-integer ratio per distinct count.
    counts, n_images_with_count = torch.unique(captions_per_image, return_counts=True)
    metrics = {}
    for k in RECALL_KS:
        kk = min(k, n_txt)
        expected_hits = sum(
            int(n) * (1 - math.comb(n_txt - int(c), kk) / math.comb(n_txt, kk))
            for c, n in zip(counts, n_images_with_count)
        )
        metrics[f"TR@{k}"] = 100.0 * expected_hits / num_images
    metrics |= {f"IR@{k}": 100.0 * min(k, num_images) / num_images for k in RECALL_KS}
    return metrics
