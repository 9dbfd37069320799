"""Image-text retrieval recall@k in the CLIP-paper protocol, equal tie for tie to CLIP_benchmark, and its chance level.

Protocol (the one of CLIP, ALBEF, BEiT-3, EV-LP and CLIP_benchmark): scores are dot products of the embeddings.
TR@k (image -> text) is, per image, 1 if ANY of its captions is among the k best-scored captions; IR@k (text -> image)
is, per caption, 1 if its image is among the k best-scored images; each is averaged over its queries, in percent.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

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
    n_img, n_txt = len(images), len(texts)
    tr_above, tr_tied, ir_above, ir_tied = rank_counts(images, texts, text_to_image, chunk_size)
    has_caption = torch.bincount(text_to_image, minlength=n_img) > 0  # (N,)
    tr_hits = torch.stack([_hits(tr_above, tr_tied, k) for k in ks]) & has_caption
    ir_hits = torch.stack([_hits(ir_above, ir_tied, k) for k in ks])

    # A tie across the k-th place (rare with real embeddings: exact float ties): torch.topk on the query's full score
    # row decides which of the tied candidates are in, as in CLIP_benchmark. Chunked so memory stays bounded; IR rows
    # are computed text-major, the orientation CLIP_benchmark computes its score matrix in.
    for i, k in enumerate(ks):
        for rows in _ambiguous(tr_above, tr_tied, k).split(chunk_size):
            picked = (images[rows] @ texts.T).topk(min(k, n_txt), dim=1).indices  # (t, k)
            tr_hits[i, rows] = (text_to_image[picked] == rows[:, None]).any(dim=1) & has_caption[rows]
        for rows in _ambiguous(ir_above, ir_tied, k).split(chunk_size):
            picked = (texts[rows] @ images.T).topk(min(k, n_img), dim=1).indices  # (t, k)
            ir_hits[i, rows] = (picked == text_to_image[rows, None]).any(dim=1)
    return tr_hits, ir_hits


def _hits(above: torch.Tensor, tied: torch.Tensor, k: int) -> torch.Tensor:
    """Hit at k whatever the tie-breaking: every candidate scoring at least the best positive fits in the top k."""
    return above + tied <= k


def _ambiguous(above: torch.Tensor, tied: torch.Tensor, k: int) -> torch.Tensor:
    """Queries whose best positive ties with other candidates across the k-th place: index tensor."""
    return ((above < k) & (above + tied > k)).nonzero().squeeze(1)


class ScoreBlocks:
    """The N x M score matrix, one block at a time, each block computed once: ``for images, captions, scores,
    diagonal in blocks``, with ``scores = texts[order][captions] @ images[images].T`` (text-major, as CLIP_benchmark
    computes it) in a reused buffer, valid until the next block.

    Captions are sorted by image (``order``: a stable argsort of ``text_to_image``; ``owner``: the sorted image
    indices), and block (r, c) pairs the r-th run of ``chunk_size`` images with the captions of the c-th run. The
    diagonal blocks (r, r) come first: together they hold every positive pair. Inputs as :func:`_check_inputs`
    returns them."""

    def __init__(self, images: torch.Tensor, texts: torch.Tensor, text_to_image: torch.Tensor, chunk_size: int):
        device = images.device
        self.images = images
        self.order = torch.argsort(text_to_image, stable=True)
        self.owner = text_to_image[self.order]
        self.texts = texts[self.order]
        starts = list(range(0, len(images), chunk_size)) + [len(images)]
        caption_starts = torch.searchsorted(self.owner, torch.tensor(starts, device=device)).tolist()
        self.image_runs = [slice(a, b) for a, b in zip(starts, starts[1:])]
        self.caption_runs = [slice(s, e) for s, e in zip(caption_starts, caption_starts[1:])]
        self.largest = (max(r.stop - r.start for r in self.image_runs)
                        * max(r.stop - r.start for r in self.caption_runs))
        self.buffer = torch.empty(self.largest, dtype=images.dtype, device=device)

    def __iter__(self) -> Iterator[tuple[slice, slice, torch.Tensor, bool]]:
        n = len(self.image_runs)
        for r, c in [(r, r) for r in range(n)] + [(r, c) for r in range(n) for c in range(n) if r != c]:
            images, captions = self.image_runs[r], self.caption_runs[c]
            shape = (captions.stop - captions.start, images.stop - images.start)
            if shape[0] == 0:  # images without any caption
                continue
            out = self.buffer[: shape[0] * shape[1]].view(shape)
            yield images, captions, torch.mm(self.texts[captions], self.images[images].T, out=out), r == c


@torch.inference_mode()
def rank_counts(
    images: torch.Tensor, texts: torch.Tensor, text_to_image: torch.Tensor, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each query's best positive ranks: ``(tr_above, tr_tied, ir_above, ir_tied)``, int64.

    ``tr_above[i]``: captions scoring strictly higher than image i's best-scored own caption; ``tr_tied[i]``: captions
    scoring exactly the same, that caption included (an image without captions has every caption above it).
    ``ir_above[j]`` / ``ir_tied[j]``: the same for caption j among the images, against the score of its own image.
    A query is a hit at k if ``above + tied <= k``, a miss if ``above >= k``; in between the top k depend on how
    ties are broken. Inputs as :func:`_check_inputs` returns them (same device and float dtype).

    No sort, no top-k: one pass over the score matrix (:class:`ScoreBlocks`), each block counted in both directions.
    The diagonal blocks come first and fix each query's threshold, its best positive's score read from the score
    matrix itself, before any block is counted against it.
    """
    device, dtype = images.device, images.dtype
    n_img, n_txt = len(images), len(texts)
    blocks = ScoreBlocks(images, texts, text_to_image, chunk_size)
    work_buffer = torch.empty(blocks.largest, dtype=dtype, device=device)
    tr_threshold = torch.full((n_img,), -math.inf, dtype=dtype, device=device)
    ir_threshold = torch.empty(n_txt, dtype=dtype, device=device)  # caption-sorted, as the blocks' rows
    tr_above, tr_tied = (torch.zeros(n_img, dtype=torch.long, device=device) for _ in range(2))
    ir_above, ir_tied = (torch.zeros(n_txt, dtype=torch.long, device=device) for _ in range(2))
    for image_run, caption_run, scores, diagonal in blocks:
        if diagonal:  # every caption's image is in the block
            own = blocks.owner[caption_run] - image_run.start  # (captions,) the column of each caption's image
            positive = scores[torch.arange(len(scores), device=device), own]
            # Finite thresholds keep scores - threshold free of inf - inf (only a caption-less image's -inf remains,
            # and its TR is a miss whatever is counted).
            if not torch.isfinite(positive).all():
                raise ValueError("retrieval scores overflow to infinity; are the embeddings L2-normalised?")
            ir_threshold[caption_run] = positive
            tr_threshold[image_run].scatter_reduce_(0, own, positive, "amax")
        work = work_buffer[: scores.numel()].view_as(scores)
        _count_against(scores, ir_threshold[caption_run, None], 1, ir_above[caption_run], ir_tied[caption_run], work)
        _count_against(scores, tr_threshold[None, image_run], 0, tr_above[image_run], tr_tied[image_run], work)
    ir_above[blocks.order], ir_tied[blocks.order] = ir_above.clone(), ir_tied.clone()  # back to caption order
    return tr_above, tr_tied, ir_above, ir_tied


def _count_against(scores: torch.Tensor, threshold: torch.Tensor, dim: int, above: torch.Tensor, tied: torch.Tensor,
                   work: torch.Tensor) -> None:
    """Add to ``above`` / ``tied`` how many ``scores`` along ``dim`` are greater than / equal to ``threshold``.

    With d = sign(scores - threshold) in {-1, 0, 1}: sum(d) = above - below and sum(|d|) = above + below, two plain
    float reductions, several times faster on CPU than summing boolean masks, and exact (integers below 2^24 in
    float32). With gradual underflow (the default) the difference of two distinct floats is never zero, so d is the
    comparison's sign; where denormals are flushed, a tiny difference may count as a tie instead, which only moves
    a query from a certain hit or miss to the exact re-ranking (``above`` can only shrink, ``above + tied`` only
    grow)."""
    n = scores.shape[dim]
    accumulate = torch.float64 if n >= 2**24 else None
    d = torch.sub(scores, threshold, out=work).sign_()
    above_minus_below = d.sum(dim, dtype=accumulate)
    above_plus_below = d.abs_().sum(dim, dtype=accumulate)
    above += ((above_minus_below + above_plus_below) / 2).long()
    tied += n - above_plus_below.long()


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
        chunk_size: images per block of the score matrix: a block holds ``chunk_size`` images x the captions of
            ``chunk_size`` images (two such blocks are held at once). Results do not depend on it, except through
            last-bit differences the BLAS may make between block shapes, which can only flip near-exact ties.

    ``TR@k``: per image, 1 if ANY of its captions is among its top-k captions (an image with no caption counts as a
    miss); ``IR@k``: per caption, 1 if its image is among its top-k images. ``k`` larger than the candidate count
    retrieves every candidate. Scores are computed in float32 (float64 inputs stay float64), on the device of
    ``image_embeddings``.

    Tie convention: the top-k list of a query is the one ``torch.topk(scores_of_that_query, k)`` returns, called
    separately for each k, exactly as CLIP_benchmark's ``zeroshot_retrieval.recall_at_k`` does; so results equal
    CLIP_benchmark's, ties included, on the same device and for bit-identical scores. A query's top-k set is decided
    without any sort (:func:`rank_counts`): with ``above`` candidates scoring strictly higher than its best positive
    and ``tied`` scoring exactly as high (that positive included), it is a hit if ``above + tied <= k`` and a miss if
    ``above >= k``, whichever way ties are broken; only queries with a tie across the k-th place are re-ranked with
    ``torch.topk`` on their full score row. Which of several tied candidates ``torch.topk`` keeps is an
    implementation detail of the device (CPU and CUDA may differ); it matters only for exactly equal scores, e.g.
    duplicated captions or images.
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
    captions_per_image = torch.bincount(text_to_image.long().cpu(), minlength=num_images)
    metrics = {f"TR@{k}": chance_recall(len(text_to_image), captions_per_image, k) for k in RECALL_KS}
    metrics |= {f"IR@{k}": 100.0 * min(k, num_images) / num_images for k in RECALL_KS}
    return metrics


def chance_recall(num_candidates: int, positives: torch.Tensor, k: int) -> float:
    """Expected recall@k (percent) of queries that rank ``num_candidates`` candidates uniformly at random, query q
    having ``positives[q]`` of them as positives: it misses with probability C(n - p, k) / C(n, k) (all k picks are
    negatives), ``k`` capped at ``n``."""
    kk = min(k, num_candidates)
    # Queries with the same positive count have the same expectation: one exact big-integer ratio per distinct count.
    counts, queries_with_count = torch.unique(positives.cpu(), return_counts=True)
    expected_hits = sum(int(n) * (1 - math.comb(num_candidates - int(c), kk) / math.comb(num_candidates, kk))
                        for c, n in zip(counts, queries_with_count))
    return 100.0 * expected_hits / len(positives)
