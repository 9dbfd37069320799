"""Text towers: Hugging Face encoders truncated to their first ``depth`` layers, without the pooler.

``BertTextTower`` (``kind: bert``) is the recipe's BERT; ``HFTextTower`` (``kind: hf``) takes any BERT-like encoder
``AutoModel`` builds (BERT, RoBERTa, MiniLM, DistilBERT, ELECTRA, ...), with its layers where it keeps them
(``encoder.layer``, DistilBERT's ``transformer.layer``). Both give ``forward_features(ids, padding_mask) -> (B, L, D)``
and the same ``width``/``depth``/``layers``/``vocab_size``.

The padding mask convention throughout evlp is ``padding_mask[b, t] = True`` at padding positions (the complement
of Hugging Face's ``attention_mask``).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import BertConfig, BertModel, PreTrainedModel

from evlp.errors import EvlpError

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


def hf_attention_mask(model: PreTrainedModel, padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """evlp's padding mask -> the ``attention_mask`` a Hugging Face encoder takes."""
    if padding_mask is None:
        return None
    keep = ~padding_mask.bool()  # (B, L), True where a key may be attended to
    # Under SDPA, hand the model the final (B, 1, 1, L) boolean mask, which transformers passes through as is. From a
    # 2-D mask it would first test `mask.all()` in Python to maybe drop it: a host-device sync on every text forward.
    # Other attention implementations want their own mask format.
    sdpa = model.config._attn_implementation == "sdpa"
    return keep[:, None, None, :] if sdpa else keep.long()


def set_dropout(model: nn.Module, p: float) -> None:
    """Every dropout of a Hugging Face encoder at probability ``p``: hidden and attention dropout are ``nn.Dropout``
    modules, whose ``p`` the attention implementations read at each call."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p


def set_hf_checkpointing(model: PreTrainedModel, enable: bool) -> None:
    """Switch a Hugging Face model's activation checkpointing on or off."""
    # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn).
    renamed = hasattr(model, "activation_checkpointing_enable")
    if not enable:
        (model.activation_checkpointing_disable if renamed else model.gradient_checkpointing_disable)()
        return
    model.config.use_cache = False  # an encoder has no cache; saves HF's warning that it turns caching off
    # Non-reentrant checkpointing is PyTorch's recommended mode and works under torch.compile.
    kwargs = {"use_reentrant": False}
    if renamed:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


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

    @property
    def layers(self) -> nn.ModuleList:
        return self.bert.encoder.layer

    @property
    def vocab_size(self) -> int:
        return self.bert.config.vocab_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each layer's activations in backward instead of storing them (timm's method name)."""
        set_hf_checkpointing(self.bert, enable)

    def forward_features(
            self,
            token_ids: torch.Tensor,
            padding_mask: torch.Tensor | None = None,
            token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        attention_mask = hf_attention_mask(self.bert, padding_mask)
        out = self.bert(input_ids=token_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.last_hidden_state

    def forward(self, token_ids: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_features(token_ids, padding_mask)

    def describe(self) -> str:
        return f"BERT, width {self.width}, {self.depth} layers, vocabulary {self.vocab_size:,}"


# Where Hugging Face encoders keep their layer list: BERT, RoBERTa, ELECTRA, MPNet, XLM-R, ...; DistilBERT.
LAYER_PATHS = ("encoder.layer", "transformer.layer")


def _get(model: nn.Module, path: str):
    for name in path.split("."):
        model = getattr(model, name, None)
    return model


def layer_path(model: nn.Module) -> str | None:
    """Where ``model`` keeps its ``nn.ModuleList`` of layers (one of LAYER_PATHS), or None."""
    return next((path for path in LAYER_PATHS if isinstance(_get(model, path), nn.ModuleList)), None)


class HFTextTower(nn.Module):
    """First ``depth`` layers of a BERT-like Hugging Face encoder. ``forward_features(ids, padding_mask) -> (B, L, D)``.

    The pooler (BERT, RoBERTa) is removed: the shared block takes the tokens, and a parameter that never gets a
    gradient would break DDP. Segment (token-type) ids are passed only to models that have them (DistilBERT has none).
    """

    def __init__(self, model: PreTrainedModel, depth: int | None = None, where: str = "model.text_tower"):
        super().__init__()
        if getattr(model, "pooler", None) is not None:
            model.pooler = None
        self.layer_path = layer_path(model)
        if self.layer_path is None:
            raise EvlpError(f"{where}: evlp finds no layer list ({' or '.join(LAYER_PATHS)}) in "
                            f"{type(model).__name__}; use a BERT-like encoder (BERT, RoBERTa, MiniLM, DistilBERT, ...)")
        layers = _get(model, self.layer_path)
        if depth is not None:
            if not 1 <= depth <= len(layers):
                raise EvlpError(f"{where}.depth: {depth} asked for, but {type(model).__name__} has {len(layers)} "
                                f"layers (use 1..{len(layers)}, or null for all)")
            owner, attr = self.layer_path.rsplit(".", 1)
            setattr(_get(model, owner), attr, layers[:depth])
            model.config.num_hidden_layers = depth
        self.has_token_types = "token_type_ids" in inspect.signature(model.forward).parameters
        self.model = model

    @property
    def layers(self) -> nn.ModuleList:
        return _get(self.model, self.layer_path)

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        try:
            set_hf_checkpointing(self.model, enable)
        except ValueError as e:  # transformers: the model does not support it
            raise EvlpError(f"{type(self.model).__name__}: {e}; set trainer.grad_checkpointing=false") from None

    def forward_features(
            self,
            token_ids: torch.Tensor,
            padding_mask: torch.Tensor | None = None,
            token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs = {"attention_mask": hf_attention_mask(self.model, padding_mask)}
        if token_type_ids is not None:
            if not self.has_token_types:
                raise ValueError(f"{type(self.model).__name__} has no token-type (segment) ids")
            kwargs["token_type_ids"] = token_type_ids
        return self.model(input_ids=token_ids, **kwargs).last_hidden_state

    def forward(self, token_ids: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_features(token_ids, padding_mask)

    def describe(self) -> str:
        return (f"{self.model.config.model_type} ({type(self.model).__name__}), width {self.width}, {self.depth} "
                f"layers, vocabulary {self.vocab_size:,}")
