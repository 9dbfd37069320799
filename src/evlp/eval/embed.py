"""Run a model over an evaluation loader and collect L2-normalised float32 embeddings on the CPU."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm


@dataclass
class RetrievalEmbeddings:
    """Embeddings of an image-text retrieval set, images deduplicated (input of ``retrieval_metrics``)."""

    image_embeddings: torch.Tensor  # (N, D) float32, one row per distinct image, in order of first appearance
    text_embeddings: torch.Tensor  # (M, D) float32, one row per caption, in loader order
    text_to_image: torch.Tensor  # (M,) long, row of image_embeddings each caption describes
    image_ids: torch.Tensor  # (N,) long, the loader's image_id of each row of image_embeddings
    metas: list[dict]  # (N,) the meta of each image's first occurrence
    captions: list[str] = field(default_factory=list)  # (M,) the loader's caption strings, when it yields them


def resolve_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """``device``, or where the model's parameters live (CPU for a parameter-free model)."""
    if device is not None:
        return torch.device(device)
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@contextlib.contextmanager
def inference(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Eval mode (restored afterwards: callers may be mid-training), inference_mode, autocast to ``dtype`` if given."""
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    try:
        with torch.inference_mode(), autocast:
            yield
    finally:
        model.train(was_training)


def to_unit_float(embeddings: torch.Tensor) -> torch.Tensor:
    """(B, D) -> float32 on the CPU, re-normalised: a bf16 row normalised under autocast has a norm off by up to
    ~4e-4, which scales all its scores and can reorder close ones."""
    return F.normalize(embeddings.float(), dim=-1).cpu()


def embed_retrieval_set(
    model: nn.Module,
    loader: Iterable[dict],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    tokenize: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> RetrievalEmbeddings:
    """Encode every caption and every distinct image of a retrieval loader.

    The loader yields dicts with ``image`` (B, 3, H, W), ``text`` (B, L), ``padding_mask`` (B, L, True = padding),
    ``image_id`` (B,), ``meta`` (list of B dicts) and optionally ``caption`` (list of B strings, kept in
    ``captions``), one row per caption, so an image recurs once per caption. Images are deduplicated by ``image_id``
    (first occurrence, in order of first appearance) and each distinct image is encoded once; captions are all kept,
    in loader order. ``device`` defaults to the model's; ``dtype`` (e.g. ``torch.bfloat16`` on GPU) turns on
    autocast. ``tokenize`` (``captions -> (token_ids, padding_mask)``): tokenise the ``caption`` strings with the
    model's own tokenizer instead of taking the loader's ``text`` (e.g. an open_clip model, ``OpenClipAdapter``).
    """
    device = resolve_device(model, device)
    row_of_image_id: dict[int, int] = {}
    image_chunks, text_chunks, caption_rows, metas, captions = [], [], [], [], []
    with inference(model, device, dtype):
        for batch in tqdm(loader, desc="embedding retrieval set", unit="batch", disable=not progress):
            new_in_batch = []  # batch positions of images not seen before, first occurrence only
            for position, image_id in enumerate(batch["image_id"].tolist()):
                if image_id not in row_of_image_id:
                    row_of_image_id[image_id] = len(row_of_image_id)
                    new_in_batch.append(position)
                    metas.append(batch["meta"][position])
                caption_rows.append(row_of_image_id[image_id])
            if "caption" in batch:
                captions.extend(batch["caption"])
            if new_in_batch:
                images = batch["image"][new_in_batch].to(device, non_blocking=True)
                image_chunks.append(to_unit_float(model.encode_image(images)))
            if tokenize is None:
                text, padding_mask = batch["text"], batch["padding_mask"]
            elif "caption" not in batch:
                raise ValueError("tokenize needs the loader's caption strings, and its batches have no 'caption'")
            else:
                text, padding_mask = tokenize(list(batch["caption"]))
            text = text.to(device, non_blocking=True)
            padding_mask = padding_mask.to(device, non_blocking=True)
            text_chunks.append(to_unit_float(model.encode_text(text, padding_mask)))
    if not text_chunks:
        raise ValueError("the retrieval loader yielded no batches")
    return RetrievalEmbeddings(
        image_embeddings=torch.cat(image_chunks),
        text_embeddings=torch.cat(text_chunks),
        text_to_image=torch.tensor(caption_rows, dtype=torch.long),
        image_ids=torch.tensor(list(row_of_image_id), dtype=torch.long),
        metas=metas,
        captions=captions,
    )


def embed_images(
    model: nn.Module,
    loader: Iterable[dict],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, list[dict]]:
    """Encode every image of a classification loader (dicts with ``image`` (B, 3, H, W) and ``meta``, B dicts).

    Returns (N, D) float32 L2-normalised embeddings in loader order and the N metas. ``device`` and ``dtype`` as in
    :func:`embed_retrieval_set`.
    """
    device = resolve_device(model, device)
    chunks, metas = [], []
    with inference(model, device, dtype):
        for batch in tqdm(loader, desc="embedding images", unit="batch", disable=not progress):
            chunks.append(to_unit_float(model.encode_image(batch["image"].to(device, non_blocking=True))))
            metas.extend(batch["meta"])
    if not chunks:
        raise ValueError("the image loader yielded no batches")
    return torch.cat(chunks), metas
