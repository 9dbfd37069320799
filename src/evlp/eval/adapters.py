"""Other libraries' models behind the evlp model interface, so the evaluators (``evlp.eval``) score them as they
score an evlp student: ``encode_image(images (B, 3, H, W)) -> (B, D)`` and ``encode_text(token_ids (B, L),
padding_mask (B, L)) -> (B, D)``, both L2-normalised, and a ``tokenize(captions) -> (token_ids, padding_mask)``
to pass as ``tokenize=`` where the model brings its own tokenizer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OpenClipAdapter(nn.Module):
    """An ``open_clip`` CLIP model and its tokenizer (``open_clip.get_tokenizer(...)``).

    Images arrive as the evlp loaders make them (``eval_transform``: ImageNet mean and std); a model trained with
    other normalisation constants should be trained on evlp's loaders too, or be given images normalised its way.
    open_clip's text towers mask padding themselves, so ``padding_mask`` is not used."""

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(images), dim=-1)

    def encode_text(self, token_ids: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.model.encode_text(token_ids), dim=-1)

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        token_ids = self.tokenizer(captions)  # (B, context_length)
        # open_clip's own BPE pads with 0; its Hugging Face tokenizers with their pad token
        pad_id = getattr(getattr(self.tokenizer, "tokenizer", None), "pad_token_id", None)
        return token_ids, token_ids == (0 if pad_id is None else pad_id)
