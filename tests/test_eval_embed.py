"""Tests of evlp.eval.embed_retrieval_set / embed_images: images deduplicated by id and encoded once, order kept,
embeddings equal to direct encoding, model mode restored."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evlp.eval import RetrievalEmbeddings, embed_images, embed_retrieval_set

DIM = 6


class FakeModel(nn.Module):
    """Follows the model interface; records the image ids (the value of pixel [0, 0, 0]) it encodes."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng():  # fixed weights without touching the global RNG of other tests
            torch.manual_seed(0)
            self.image_proj = nn.Linear(3 * 2 * 2, DIM)
            self.text_embed = nn.Embedding(50, DIM)
        self.encoded_image_ids: list[int] = []
        self.modes_seen: set[bool] = set()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, 2, 2) -> (B, D)
        self.encoded_image_ids += images[:, 0, 0, 0].long().tolist()
        self.modes_seen.add(self.training)
        return F.normalize(self.image_proj(images.flatten(1)), dim=-1)

    def encode_text(self, token_ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, D)
        keep = (~padding_mask).unsqueeze(-1).float()
        return F.normalize((self.text_embed(token_ids) * keep).sum(dim=1), dim=-1)


def image_of(image_id: int) -> torch.Tensor:
    """A (3, 2, 2) image whose pixels identify it."""
    return image_id + torch.arange(12.0).reshape(3, 2, 2) / 12


def caption_of(caption: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L=3) token ids and padding mask, one or two real tokens."""
    token_ids = torch.tensor([1 + caption % 49, 1 + (7 * caption) % 49, 0])
    padding_mask = torch.tensor([False, caption % 2 == 1, True])
    return token_ids, padding_mask


def retrieval_batch(image_ids: list[int], first_caption: int) -> dict:
    """One row per caption, the image repeated once per caption, as the eval loaders yield them."""
    captions = [caption_of(first_caption + i) for i in range(len(image_ids))]
    return {
        "image": torch.stack([image_of(i) for i in image_ids]),
        "text": torch.stack([c[0] for c in captions]),
        "padding_mask": torch.stack([c[1] for c in captions]),
        "image_id": torch.tensor(image_ids),
        "meta": [{"image_id": i, "caption": first_caption + n} for n, i in enumerate(image_ids)],
    }


# Batches of captions; image 7 recurs within a batch and across batches, 12 only in the last.
BATCH_IMAGE_IDS = [[7, 7, 3], [3, 9, 7], [9, 12, 12]]


def retrieval_loader() -> list[dict]:
    starts = [0, 3, 6]
    return [retrieval_batch(ids, start) for ids, start in zip(BATCH_IMAGE_IDS, starts)]


def test_dedups_images_encodes_each_once_and_keeps_order():
    model = FakeModel()
    out = embed_retrieval_set(model, retrieval_loader(), progress=False)
    assert isinstance(out, RetrievalEmbeddings)
    assert out.image_ids.tolist() == [7, 3, 9, 12]  # order of first appearance
    assert model.encoded_image_ids == [7, 3, 9, 12]  # each distinct image encoded once, duplicates skipped
    assert out.text_to_image.tolist() == [0, 0, 1, 1, 2, 0, 2, 3, 3]  # every caption, in loader order
    assert [m["caption"] for m in out.metas] == [0, 2, 4, 7]  # meta of each image's first occurrence
    assert out.text_to_image.dtype == out.image_ids.dtype == torch.long

    with torch.no_grad():
        expected_images = model.encode_image(torch.stack([image_of(i) for i in (7, 3, 9, 12)]))
        captions = [caption_of(c) for c in range(9)]
        expected_texts = model.encode_text(torch.stack([c[0] for c in captions]), torch.stack([c[1] for c in captions]))
    for got, expected in [(out.image_embeddings, expected_images), (out.text_embeddings, expected_texts)]:
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        torch.testing.assert_close(got, expected)


def test_runs_in_eval_mode_and_restores_training():
    model = FakeModel().train()
    embed_retrieval_set(model, retrieval_loader(), progress=False)
    assert model.modes_seen == {False} and model.training


def test_autocast_dtype_gives_unit_float32_embeddings():
    out = embed_retrieval_set(FakeModel(), retrieval_loader(), dtype=torch.bfloat16, progress=False)
    for embeddings in (out.image_embeddings, out.text_embeddings):
        assert embeddings.dtype == torch.float32
        torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(len(embeddings)))


def test_embed_images_keeps_loader_order():
    model = FakeModel()
    loader = [
        {"image": torch.stack([image_of(i) for i in ids]), "meta": [{"label": i % 3} for i in ids]}
        for ids in ([4, 1, 4], [2])
    ]
    embeddings, metas = embed_images(model, loader, progress=False)
    assert model.encoded_image_ids == [4, 1, 4, 2]  # no deduplication for classification sets
    assert [m["label"] for m in metas] == [1, 1, 1, 2]
    with torch.no_grad():
        expected = model.encode_image(torch.stack([image_of(i) for i in (4, 1, 4, 2)]))
    torch.testing.assert_close(embeddings, expected)


def test_empty_loader_is_an_error():
    with pytest.raises(ValueError):
        embed_retrieval_set(FakeModel(), [], progress=False)
