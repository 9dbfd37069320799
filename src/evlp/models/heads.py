"""Task heads on top of a pretrained tower.

``ImageClassifier`` is the original's ``ImageClassification`` model (reference §3.7) as a plain module: the image
tower's tokens, pooled (the mean of the patch tokens, CLS excluded, or the CLS token), then ``LayerNorm(eps=1e-6)``
and a ``Linear`` to the classes::

    classifier = ImageClassifier(parts.image_tower, num_classes=1000)             # full fine-tuning
    probe = ImageClassifier(parts.image_tower, num_classes=1000, linear_classifier=True)   # linear evaluation
    logits = classifier(images)                                                  # (B, 3, H, W) -> (B, C)

With ``linear_classifier=True`` the tower is frozen for good: its parameters do not require gradients, it stays in
eval mode whatever ``.train()`` is called with, and its forward runs without autograd.
"""

from __future__ import annotations

import re

import torch
from torch import nn

POOLINGS = ("mean", "cls")
_BLOCK = re.compile(r"^tower\.blocks\.(\d+)\.")


class ImageClassifier(nn.Module):
    def __init__(self, tower: nn.Module, num_classes: int, pooling: str = "mean", linear_classifier: bool = False):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}; expected one of {', '.join(POOLINGS)}")
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}")
        self.tower = tower
        self.pooling = pooling
        self.linear_classifier = linear_classifier
        width = tower.embed_dim
        self.norm = nn.LayerNorm(width, eps=1e-6)  # the original's head_norm (weight 1, bias 0)
        self.head = nn.Linear(width, num_classes)
        # BEiT's head initialisation, truncated at +-2 std (the original's trunc_normal_ used PyTorch's default
        # absolute bounds +-2, i.e. +-100 std: not truncated at all).
        nn.init.trunc_normal_(self.head.weight, std=0.02, a=-0.04, b=0.04)
        nn.init.zeros_(self.head.bias)
        if linear_classifier:
            self.tower.requires_grad_(False)
            self.tower.eval()

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @property
    def num_layers(self) -> int:
        """Blocks of the tower: the ``L`` of the layer-wise lr decay."""
        return len(self.tower.blocks)

    def layer_id(self, name: str) -> int:
        """Layer of a parameter (its name relative to this module) for layer-wise lr decay: 0 = patch embedding,
        CLS token, positions and the pre-norm; ``k + 1`` = block ``k``; ``L + 1`` = head norm and classifier."""
        if name.startswith(("norm.", "head.")):
            return self.num_layers + 1
        match = _BLOCK.match(name)
        if match:
            return int(match.group(1)) + 1
        if name.startswith("tower."):
            return 0
        raise ValueError(f"{name!r} is not a parameter of an ImageClassifier")

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        if self.linear_classifier:
            self.tower.eval()  # a frozen tower never switches to training behaviour (dropout, drop-path)
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> pooled, not yet normalised features ``(B, D)``."""
        if self.linear_classifier:
            with torch.no_grad():
                tokens = self.tower.forward_features(images)
        else:
            tokens = self.tower.forward_features(images)
        return tokens[:, 1:].mean(dim=1) if self.pooling == "mean" else tokens[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(images)))


class TextClassifier(nn.Module):
    """GLUE sentence (pair) classifier or regressor (reference §3.8): the text tower, BERT's pooler (``dense`` +
    tanh on the first token, [CLS]), dropout and one Linear layer; ``num_classes=1`` is regression (STS-B).

    ``tower`` is a ``BertTextTower`` or an ``HFTextTower`` (its Hugging Face model as ``.bert`` or ``.model``).
    ``pooler`` is the pretrained model's pooler (``dense`` + tanh) or None for a fresh ``BertPooler``; a fresh one,
    and the classifier, are initialised as BERT initialises its layers (normal, std ``initializer_range``, zero
    bias). Segment ids are used where the encoder has two segment embeddings (BERT); otherwise they are ignored::

        logits = TextClassifier(tower, num_classes=3)(token_ids, padding_mask, token_type_ids)  # (B, 3)
    """

    def __init__(self, tower: nn.Module, num_classes: int, dropout: float = 0.1, pooler: nn.Module | None = None):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertPooler

        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}")
        encoder = getattr(tower, "bert", None) or tower.model
        config = encoder.config
        self.tower = tower
        # RoBERTa has one segment embedding, DistilBERT none: only BERT-like encoders with two take segment ids.
        self.uses_segments = (getattr(config, "type_vocab_size", 0) >= 2
                              and getattr(tower, "has_token_types", True))
        if pooler is None:
            pooler = BertPooler(config)
            self._bert_init(pooler.dense, getattr(config, "initializer_range", 0.02))
        self.pooler = pooler
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, num_classes)
        self._bert_init(self.classifier, getattr(config, "initializer_range", 0.02))

    @staticmethod
    def _bert_init(linear: nn.Linear, std: float) -> None:
        nn.init.normal_(linear.weight, std=std)
        nn.init.zeros_(linear.bias)

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def forward(self, token_ids: torch.Tensor, padding_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``padding_mask`` True at padding (evlp's convention); ``token_type_ids`` 0 for the first segment, 1 for
        the second. Returns ``(B, num_classes)`` logits (``(B, 1)`` for regression)."""
        hidden = self.tower.forward_features(token_ids, padding_mask,
                                             token_type_ids if self.uses_segments else None)
        return self.classifier(self.dropout(self.pooler(hidden)))
