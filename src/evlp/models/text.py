"""BERT text tower: Hugging Face ``BertModel`` truncated to its first ``depth`` layers, without the pooler.

The padding mask convention throughout evlp is ``padding_mask[b, t] = True`` at padding positions (the complement
of Hugging Face's ``attention_mask``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertModel

# bert-base-uncased's architecture, so the real recipe can be built (and counted) without any download.
BERT_BASE_UNCASED = dict(
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    max_position_embeddings=512,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    pad_token_id=0,
)


def bert_config(**overrides) -> BertConfig:
    """A ``BertConfig`` for bert-base-uncased, with ``overrides`` applied (e.g. a tiny width for tests)."""
    values = dict(BERT_BASE_UNCASED)
    values.update(overrides)
    return BertConfig(**values, attn_implementation="sdpa")


class BertTextTower(nn.Module):
    """First ``depth`` layers of a BERT encoder. ``forward_features(ids, padding_mask) -> (B, L, D)``."""

    def __init__(self, config: BertConfig | None = None, depth: int | None = None, bert: BertModel | None = None):
        super().__init__()
        if bert is None:
            bert = BertModel(config or bert_config(), add_pooling_layer=False)
        bert.pooler = None
        layers = bert.encoder.layer
        if depth is not None:
            if not 1 <= depth <= len(layers):
                raise ValueError(f"text tower depth must be in [1, {len(layers)}], got {depth}")
            bert.encoder.layer = layers[:depth]
            bert.config.num_hidden_layers = depth
        self.bert = bert

    @property
    def width(self) -> int:
        return self.bert.config.hidden_size

    @property
    def depth(self) -> int:
        return len(self.bert.encoder.layer)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer's activations in backward instead of storing them (timm's method name)."""
        # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn).
        bert, renamed = self.bert, hasattr(self.bert, "activation_checkpointing_enable")
        if not enable:
            (bert.activation_checkpointing_disable if renamed else bert.gradient_checkpointing_disable)()
            return
        bert.config.use_cache = False  # an encoder has no cache; saves HF's warning that it turns caching off
        # Non-reentrant checkpointing is PyTorch's recommended mode and works under torch.compile.
        kwargs = {"use_reentrant": False}
        if renamed:
            bert.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            bert.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def forward_features(
            self,
            token_ids: torch.Tensor,
            padding_mask: torch.Tensor | None = None,
            token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        attention_mask = None
        if padding_mask is not None:
            keep = ~padding_mask.bool()  # (B, L), True where a key may be attended to
            # Under SDPA, hand BERT the final (B, 1, 1, L) boolean mask, which it passes through as is. From a 2-D mask
            # it would first test `mask.all()` in Python to maybe drop it: a host-device sync on every text forward.
            # Other attention implementations want their own mask format.
            sdpa = self.bert.config._attn_implementation == "sdpa"
            attention_mask = keep[:, None, None, :] if sdpa else keep.long()
        out = self.bert(input_ids=token_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.last_hidden_state

    def forward(self, token_ids: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_features(token_ids, padding_mask)
