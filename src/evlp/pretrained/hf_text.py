"""Any BERT-like Hugging Face encoder as a text tower (``kind: hf``, ``path: <hub name or folder>``).

``AutoConfig``/``AutoModel`` read the folder or the hub name (the Hugging Face cache first; the hub only when not
offline): BERT, RoBERTa, MiniLM, DistilBERT, ELECTRA, MPNet, XLM-R ... transformers reads the weights (safetensors,
or ``.bin`` with ``weights_only=True``) and reports what did not load; evlp turns a missing or mis-shaped tensor into
an ``EvlpError``. Tensors of the file that the base model has no place for are dropped: they are task or
pretraining heads (BERT's ``cls.*``, DistilBERT's ``vocab_*``, ``lm_head.*``), as is the pooler, which the tower
removes. The tokenizer is the one of ``model.text_tower.tokenizer``, else of the same folder or name.
"""

from __future__ import annotations

import os

import torch
from transformers import AutoConfig, AutoModel

from evlp.errors import EvlpError
from evlp.models.text import HFTextTower
from evlp.pretrained.bert import is_local_path, quiet_transformers
from evlp.pretrained.files import clip, first_line

DROPPED_PREFIXES = ("pooler.",)  # the tower removes the pooler, so a file without one is complete


def _not_found(name: str, where: str, error: BaseException) -> EvlpError:
    if is_local_path(name):
        return EvlpError(f"{where}.path: {name}: not a Hugging Face model folder ({first_line(error)}); expected "
                         f"config.json, the weights and the tokenizer files")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    return EvlpError(f"{where}.path: {name!r} is not a local folder and not in the Hugging Face "
                     f"cache{' (offline mode)' if offline else ''}; fetch it once with `hf download {name}` (with "
                     f"network access) or pass a local folder ({first_line(error)})")


def hf_config(name: str, where: str = "model.text_tower"):
    """The model's ``config.json``, read with ``AutoConfig``."""
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise _not_found(name, where, e) from None


def load_hf_text(name: str, depth: int | None = None, load_weights: bool = True,
                 where: str = "model.text_tower") -> HFTextTower:
    """The first ``depth`` layers (None: all) of ``name``'s encoder, with its pretrained weights or, without
    ``load_weights``, randomly initialised from its config (to be filled from an evlp checkpoint, or counted)."""
    config = hf_config(name, where)
    if not load_weights:
        try:
            return HFTextTower(AutoModel.from_config(config), depth, where)
        except ValueError as e:  # no AutoModel for this config
            raise EvlpError(f"{where}.path: {name}: {first_line(e)}") from None
    try:
        with quiet_transformers():
            # ignore_mismatched_sizes=True only makes transformers report a mis-shaped tensor instead of raising.
            model, info = AutoModel.from_pretrained(name, output_loading_info=True, ignore_mismatched_sizes=True,
                                                    dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise _not_found(name, where, e) from None
    missing = [k for k in sorted(info["missing_keys"]) if not k.startswith(DROPPED_PREFIXES)]
    mismatched = [f"{key} {tuple(found)} in the file vs {tuple(wanted)} in the model"
                  for key, found, wanted in sorted(info["mismatched_keys"])]
    problems = [f"{label}: {clip(keys)}" for label, keys in (("missing", missing), ("shape mismatch", mismatched))
                if keys]
    if problems:
        raise EvlpError(f"{where}.path: {name}: the weights do not fit {type(model).__name__}: {'; '.join(problems)}")
    return HFTextTower(model, depth, where).eval()
