"""Retrieval that fits real captions: ranked against the distinct captions, with the unique-caption subset beside it.

Real caption sets repeat captions ("a dog on a beach", an emoji's name shared by its skin tones). Under the
per-caption protocol of ``evlp.eval.retrieval`` a caption written N times is N candidates with one embedding: they
tie, and which copies ``torch.topk`` keeps decides hits, so scores depend on tie-breaking rather than on the model.
Here, on a set of image-text pairs:

* candidates: the distinct images (by ``image_id``) and the distinct captions (by text, runs of whitespace
  collapsed); a caption's embedding is that of its first occurrence;
* positives: an image and a caption are positives of each other when some pair holds both, so an image's positives
  are its distinct captions and a caption's positives are all the images paired with that text;
* a query's rank is the number of non-positive candidates scoring at least as high as its best-scored positive
  (exact ties count against the query, so ties can never raise a score); it is a hit at k when fewer than k
  candidates are ranked above it. ``TR@k`` (image -> text) is averaged over the distinct images, ``IR@k``
  (text -> image) over the distinct captions, in percent; ``mean_recall`` is the mean of the six;
* the unique-caption subset: captions paired with exactly one image, and images all of whose captions are such
  captions. ``unique_TR@k`` / ``unique_IR@k`` average the same hits over those queries only (candidates are still
  all images and all distinct captions), and ``unique_mean_recall`` is the mean of those six: one image, one text,
  one right answer, the number benchmarks quote;
* ``chance``: the same numbers for a model that ranks uniformly at random (``chance_recall``).

Without repeated captions and exact score ties the plain ``TR@k`` / ``IR@k`` equal ``retrieval_metrics``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from evlp.eval.embed import RetrievalEmbeddings, embed_retrieval_set
from evlp.eval.retrieval import RECALL_KS, _check_inputs, chance_recall

RECALL_KEYS = [f"{d}@{k}" for d in ("TR", "IR") for k in RECALL_KS]
UNIQUE_KEYS = [f"unique_{key}" for key in RECALL_KEYS]


def normalise_caption(text: str) -> str:
    """The text two captions must share to count as one: runs of whitespace collapsed, ends stripped."""
    return " ".join(text.split())


@dataclass
class DistinctPairs:
    """The pairs of a retrieval set over its distinct captions."""

    captions: list[str]  # (C,) the distinct caption texts, in order of first appearance
    first_row: torch.Tensor  # (C,) long, the caption row (of the set's M) where each distinct caption first appears
    pair_image: torch.Tensor  # (P,) long, image of each distinct (image, caption) pair
    pair_caption: torch.Tensor  # (P,) long, distinct caption of each pair
    num_images: int

    def images_per_caption(self) -> torch.Tensor:  # (C,)
        return torch.bincount(self.pair_caption, minlength=len(self.captions))

    def captions_per_image(self) -> torch.Tensor:  # (N,)
        return torch.bincount(self.pair_image, minlength=self.num_images)

    def unique_captions(self) -> torch.Tensor:  # (C,) bool: the caption describes one image only
        return self.images_per_caption() == 1

    def unique_caption_images(self) -> torch.Tensor:  # (N,) bool: every caption of the image is unique to it
        shared = ~self.unique_captions()[self.pair_caption]  # (P,)
        has_shared = torch.bincount(self.pair_image[shared], minlength=self.num_images) > 0
        return (self.captions_per_image() > 0) & ~has_shared

    def positives_of_captions(self) -> list[list[int]]:
        """For each distinct caption, its images."""
        out: list[list[int]] = [[] for _ in self.captions]
        for image, caption in zip(self.pair_image.tolist(), self.pair_caption.tolist()):
            out[caption].append(image)
        return out


def distinct_pairs(text_to_image: torch.Tensor, captions: Sequence[str], num_images: int) -> DistinctPairs:
    """Group the M caption rows (``captions[j]`` describes image ``text_to_image[j]``) by their normalised text."""
    if len(captions) != len(text_to_image):
        raise ValueError(f"need one caption string per caption row; got {len(captions)} strings for "
                         f"{len(text_to_image)} rows")
    index: dict[str, int] = {}
    first_row, caption_of_row = [], []
    for row, text in enumerate(captions):
        key = normalise_caption(text)
        if key not in index:
            index[key] = len(index)
            first_row.append(row)
        caption_of_row.append(index[key])
    pairs = torch.unique(torch.stack([text_to_image.long().cpu(), torch.tensor(caption_of_row, dtype=torch.long)]),
                         dim=1)  # (2, P) each (image, caption) once
    return DistinctPairs(list(index), torch.tensor(first_row, dtype=torch.long), pairs[0], pairs[1], num_images)


@torch.inference_mode()
def positive_ranks(queries: torch.Tensor, candidates: torch.Tensor, pair_query: torch.Tensor,
                   pair_candidate: torch.Tensor, max_block: int = 1 << 22) -> torch.Tensor:
    """(Q,) long: for each query, how many of its non-positive candidates score at least as high as its best-scored
    positive (``pair_query[p]`` / ``pair_candidate[p]``: the positive pairs). Queries without a positive get the
    candidate count. Scores are computed a block of queries at a time, at most ``max_block`` scores per block."""
    num_queries, num_candidates = len(queries), len(candidates)
    order = torch.argsort(pair_query, stable=True)
    pair_query, pair_candidate = pair_query[order].to(queries.device), pair_candidate[order].to(queries.device)
    rows = max(1, max_block // max(num_candidates, 1))
    ranks = torch.full((num_queries,), num_candidates, dtype=torch.long, device=queries.device)
    for start in range(0, num_queries, rows):
        stop = min(start + rows, num_queries)
        scores = queries[start:stop] @ candidates.T  # (rows, K)
        first, last = torch.searchsorted(pair_query, torch.tensor([start, stop], device=queries.device)).tolist()
        positive = torch.zeros_like(scores, dtype=torch.bool)
        positive[pair_query[first:last] - start, pair_candidate[first:last]] = True
        best = scores.masked_fill(~positive, -torch.inf).amax(dim=1, keepdim=True)  # (rows, 1)
        has_positive = positive.any(dim=1)
        ranks[start:stop][has_positive] = ((scores >= best) & ~positive).sum(dim=1)[has_positive]
    return ranks


@dataclass
class CaptionRetrieval:
    """Recalls in percent (``RECALL_KEYS``, ``mean_recall``, ``UNIQUE_KEYS``, ``unique_mean_recall``), the same for
    a random ranking, and the counts they were computed on."""

    metrics: dict[str, float | None]  # None: a subset without any query
    chance: dict[str, float | None]
    counts: dict[str, int]  # images, caption_rows, captions (distinct), unique_captions, unique_caption_images


def _recalls(ranks: torch.Tensor, prefix: str, direction: str) -> dict[str, float | None]:
    return {f"{prefix}{direction}@{k}": 100.0 * float((ranks < k).float().mean()) if len(ranks) else None
            for k in RECALL_KS}


def _mean(values: dict[str, float | None], keys: list[str]) -> float | None:
    chosen = [values[k] for k in keys]
    return None if None in chosen else sum(chosen) / len(chosen)


def _chance(num_candidates: int, positives: torch.Tensor, prefix: str, direction: str) -> dict[str, float | None]:
    return {f"{prefix}{direction}@{k}": chance_recall(num_candidates, positives, k) if len(positives) else None
            for k in RECALL_KS}


def caption_retrieval_metrics(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                              text_to_image: torch.Tensor, captions: Sequence[str]) -> CaptionRetrieval:
    """Distinct-caption retrieval (module docstring) of a set embedded as ``embed_retrieval_set`` returns it.

    Args:
        image_embeddings: (N, D) one row per distinct image, L2-normalised.
        text_embeddings: (M, D) one row per caption row, L2-normalised.
        text_to_image: (M,) integer, the image row each caption row describes.
        captions: (M,) the caption strings, which decide which rows are the same caption.

    A subset without any query (no image whose captions are all unique, say) reports None for its recalls and mean.
    """
    images, texts, text_to_image = _check_inputs(image_embeddings, text_embeddings, text_to_image, 1)
    pairs = distinct_pairs(text_to_image, captions, len(images))
    distinct_texts = texts[pairs.first_row.to(texts.device)]  # (C, D)
    tr_ranks = positive_ranks(images, distinct_texts, pairs.pair_image, pairs.pair_caption).cpu()  # (N,)
    ir_ranks = positive_ranks(distinct_texts, images, pairs.pair_caption, pairs.pair_image).cpu()  # (C,)
    unique_images, unique_captions = pairs.unique_caption_images(), pairs.unique_captions()
    captions_per_image, images_per_caption = pairs.captions_per_image(), pairs.images_per_caption()
    num_captions = len(pairs.captions)

    metrics = _recalls(tr_ranks, "", "TR") | _recalls(ir_ranks, "", "IR")
    metrics["mean_recall"] = _mean(metrics, RECALL_KEYS)
    metrics |= _recalls(tr_ranks[unique_images], "unique_", "TR") | _recalls(ir_ranks[unique_captions], "unique_", "IR")
    metrics["unique_mean_recall"] = _mean(metrics, UNIQUE_KEYS)
    chance = _chance(num_captions, captions_per_image, "", "TR") | _chance(len(images), images_per_caption, "", "IR")
    chance["mean_recall"] = _mean(chance, RECALL_KEYS)
    chance |= (_chance(num_captions, captions_per_image[unique_images], "unique_", "TR")
               | _chance(len(images), images_per_caption[unique_captions], "unique_", "IR"))
    chance["unique_mean_recall"] = _mean(chance, UNIQUE_KEYS)
    counts = {"images": len(images), "caption_rows": len(texts), "captions": num_captions,
              "unique_captions": int(unique_captions.sum()), "unique_caption_images": int(unique_images.sum())}
    return CaptionRetrieval(metrics, chance, counts)


def evaluate_caption_retrieval(
    model: nn.Module,
    batches: Iterable[dict],
    tokenize: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[CaptionRetrieval, RetrievalEmbeddings]:
    """Embed a retrieval loader with any model that has ``encode_image(images)`` and
    ``encode_text(token_ids, padding_mask)`` (an evlp student, ``OpenClipAdapter``, ...) and score it with
    :func:`caption_retrieval_metrics`. The batches must carry their ``caption`` strings, as ``ImageTextShards``
    batches do; ``tokenize``, ``device`` and ``dtype`` as in ``embed_retrieval_set``. Returns the metrics and the
    embeddings (for example grids)."""
    emb = embed_retrieval_set(model, batches, device=device, dtype=dtype, progress=progress, tokenize=tokenize)
    if len(emb.captions) != len(emb.text_embeddings):
        raise ValueError("distinct-caption retrieval needs the caption strings: the loader's batches have no "
                         "'caption' list")
    result = caption_retrieval_metrics(emb.image_embeddings, emb.text_embeddings, emb.text_to_image, emb.captions)
    return result, emb
