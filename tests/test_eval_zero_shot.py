"""Tests of evlp.eval zero-shot classification: prototypes equal open_clip's, accuracy on hand cases and equal to
open_clip's / CLIP_benchmark's ranking with exact ties."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from torch import nn

from evlp.eval import zero_shot_accuracy, zero_shot_classifier

PAD = 0
CLASSNAMES = ["cat", "dog", "red fox", "sea lion", "tabby cat", "golden retriever", "crane"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "{}", "a drawing of a small {} in the snow."]


def fake_tokenizer(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Words -> ids in [1, 97) by CRC32, right-padded with PAD to the longest text: ((B, L) long, (B, L) bool)."""
    rows = [[1 + zlib.crc32(word.encode()) % 96 for word in text.split()] for text in texts]
    length = max(map(len, rows))
    token_ids = torch.tensor([row + [PAD] * (length - len(row)) for row in rows])
    return token_ids, token_ids == PAD


class FakeTextModel(nn.Module):
    """encode_text(token_ids, padding_mask) -> L2-normalised masked mean of token embeddings, projected."""

    def __init__(self, dim: int = 12):
        super().__init__()
        with torch.random.fork_rng():  # fixed weights without touching the global RNG of other tests
            torch.manual_seed(0)
            self.embed = nn.Embedding(97, dim)
            self.proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(0.5)  # would randomise the prototypes if the model were left in train mode

    def encode_text(self, token_ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        keep = (~padding_mask).unsqueeze(-1).float()  # (B, L, 1)
        pooled = (self.embed(token_ids) * keep).sum(dim=1) / keep.sum(dim=1)
        return F.normalize(self.proj(self.dropout(pooled)), dim=-1)


class OpenClipStyle:
    """open_clip's interface over the fake model: encode_text(ids, normalize=...), the padding read off PAD ids."""

    def __init__(self, model: FakeTextModel):
        self.model = model

    def encode_text(self, token_ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        out = self.model.encode_text(token_ids, token_ids == PAD)
        return F.normalize(out, dim=-1) if normalize else out


@pytest.mark.parametrize(
    "templates",
    [TEMPLATES, [lambda c: f"itap of a {c}.", lambda c: f"a {c} in a video game.", lambda c: c.upper()]],
    ids=["format-strings", "callables"],
)
def test_classifier_equals_open_clip(templates):
    model = FakeTextModel()
    ours = zero_shot_classifier(model, fake_tokenizer, CLASSNAMES, templates, batch_size=5)
    model.eval()
    with torch.no_grad():
        reference = build_zero_shot_classifier(
            OpenClipStyle(model),
            lambda texts: fake_tokenizer(texts)[0],
            CLASSNAMES,
            templates,
            num_classes_per_batch=3,
            device="cpu",
        )
    assert ours.shape == (12, len(CLASSNAMES)) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.norm(dim=0), torch.ones(len(CLASSNAMES)))


def test_classifier_mixes_template_kinds_and_restores_train_mode():
    model = FakeTextModel().train()
    mixed = zero_shot_classifier(model, fake_tokenizer, CLASSNAMES, [TEMPLATES[0], lambda c: f"a {c} in a video game."])
    assert model.training
    as_strings = zero_shot_classifier(model, fake_tokenizer, CLASSNAMES, [TEMPLATES[0], "a {} in a video game."])
    torch.testing.assert_close(mixed, as_strings, atol=1e-6, rtol=0)


def test_accuracy_by_hand():
    # classifier = identity, so the logits are the embedding rows.
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: first
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # label 4: fifth
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # label 5: sixth
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 5: first
        ]
    )
    labels = torch.tensor([0, 4, 5, 5])
    assert zero_shot_accuracy(logits, torch.eye(6), labels) == pytest.approx({"top1": 50.0, "top5": 75.0})
    # CLIP's logit scale of 100 multiplies every logit alike: no ranking, hence no accuracy, changes.
    assert zero_shot_accuracy(100 * logits, torch.eye(6), labels) == zero_shot_accuracy(logits, torch.eye(6), labels)
    # Fewer classes than k: top-k is not reported.
    assert zero_shot_accuracy(logits[:, :3], torch.eye(3), torch.tensor([0, 1, 2, 2])) == pytest.approx({"top1": 50.0})


def reference_accuracy(logits: torch.Tensor, labels: torch.Tensor, topk: tuple[int, ...]) -> list[float]:
    """The ranking lines of open_clip_train's and CLIP_benchmark's ``accuracy``, verbatim; both installed functions
    then call float() on a 1-element array, which NumPy 2.4 rejects, so the counting is redone here."""
    pred = logits.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(labels.view(1, -1).expand_as(pred))
    return [100 * correct[:k].reshape(-1).float().sum().item() / len(labels) for k in topk]


def test_accuracy_equals_open_clip_with_ties():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(-1, 2, (300, 4), generator=g).float()  # integer logits: many exact ties
    classifier = torch.randint(-1, 2, (4, 10), generator=g).float()
    labels = torch.randint(0, 10, (300,), generator=g)
    ours = zero_shot_accuracy(images, classifier, labels, topk=(1, 3, 5), chunk_size=7)
    top1, top3, top5 = reference_accuracy(images @ classifier, labels, topk=(1, 3, 5))
    assert ours == pytest.approx({"top1": top1, "top3": top3, "top5": top5})


@pytest.mark.parametrize(
    ("classifier", "labels"),
    [(torch.eye(5), torch.tensor([0, 1, 2])), (torch.eye(4), torch.tensor([0, 1, 4])), (torch.eye(4), torch.ones(3))],
    ids=["width-mismatch", "label-out-of-range", "float-labels"],
)
def test_accuracy_rejects_bad_inputs(classifier, labels):
    with pytest.raises(ValueError):
        zero_shot_accuracy(torch.randn(3, 4), classifier, labels)
