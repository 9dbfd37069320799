"""Hugging Face BERT (``bert-base-uncased`` or a local folder) -> ``(BertTextTower, tokenizer)``.

A BERT folder holds ``config.json`` (``model_type: bert``), ``model.safetensors`` or ``pytorch_model.bin`` with
``embeddings.*``, ``encoder.layer.{i}.*`` and usually ``pooler.*`` (the pretraining heads ``cls.*`` in the hub's
bert-base-uncased), and the tokenizer files. transformers does the reading (safetensors, or ``.bin`` with
``weights_only=True``); we only check its loading report: a missing or mis-shaped tensor is an error, and the only
tensors we drop on purpose are the pooler and the pretraining heads, which the tower does not have. Truncation keeps
``encoder.layer[:depth]``.

The tokenizer is ``AutoTokenizer.from_pretrained`` of the same folder or name (in transformers 5,
``BertTokenizer(vocab_file=...)`` silently builds a 5-token vocabulary).
"""

from __future__ import annotations

import logging
import os
import pickle
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, BertModel
from transformers.utils import logging as hf_logging

from evlp.errors import EvlpError
from evlp.models.text import BertTextTower
from evlp.pretrained.files import (FORMAT_NAMES, bert_folder_problem, clip, first_line, quiet_torch_load, sniff,
                                   unpickling_refused)

DROPPED_PREFIXES = ("pooler.", "cls.")  # pooler and pretraining heads (MLM, NSP): not part of the tower


@contextmanager
def quiet_transformers():
    """transformers prints a load report table and a progress bar; our own check replaces both."""
    verbosity, progress_bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress_bar:
            hf_logging.enable_progress_bar()


def is_local_path(name: str) -> bool:
    """Whether ``name`` means a folder rather than a hub id (``name`` or ``namespace/name``)."""
    return (Path(name).expanduser().exists() or os.path.isabs(name) or name.startswith((".", "~"))
            or name.count("/") > 1 or "\\" in name)


def _weights_file(name: str) -> str:
    """The weights file transformers read in a local BERT folder, for messages (the name itself for a hub id)."""
    found = [Path(name) / f for f in ("model.safetensors", "pytorch_model.bin") if (Path(name) / f).is_file()]
    return str(found[0]) if found else name


def load_bert(name_or_dir: str | Path, depth: int | None = None):
    """``(BertTextTower, tokenizer)`` from a local folder or a hub name; the tower keeps the first ``depth`` layers.

    A hub name is read from the Hugging Face cache (the hub is contacted only when not offline); anything that
    cannot be found becomes a one-line ``EvlpError`` saying how to get the files.
    """
    name = str(name_or_dir)
    local = is_local_path(name)
    if local:
        path = Path(name).expanduser()
        if not path.is_dir():
            raise EvlpError(f"{path}: no such folder; expected {FORMAT_NAMES['hf-bert']} (config.json, weights, "
                            f"tokenizer files)")
        problem = bert_folder_problem(path)
        if problem:
            raise EvlpError(f"{path} is not {FORMAT_NAMES['hf-bert']}: {problem}")
        name = str(path)
        weights = Path(_weights_file(name))
        if weights.name == "pytorch_model.bin":
            sniff(weights)  # an empty file, an HTML page or a plain Python pickle: said as such, before any loading
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(name)
            if config.model_type != "bert":
                raise EvlpError(f"{name} is a {config.model_type!r} model, expected BERT")
            layers = config.num_hidden_layers
            if depth is not None and not 1 <= depth <= layers:
                raise EvlpError(f"{name}: depth {depth} asked for, but the model has {layers} layers (use 1..{layers})")
            # ignore_mismatched_sizes=True only makes transformers report a mis-shaped tensor instead of raising; the
            # report is turned into an EvlpError below.
            try:
                with quiet_torch_load():
                    bert, info = BertModel.from_pretrained(name, add_pooling_layer=False, output_loading_info=True,
                                                           ignore_mismatched_sizes=True, dtype=torch.float32,
                                                           attn_implementation="sdpa")
            except pickle.UnpicklingError as e:  # a pytorch_model.bin that weights_only=True refuses
                raise unpickling_refused(_weights_file(name), e) from None
            except (RuntimeError, EOFError, ValueError) as e:  # a truncated or corrupt weights file
                raise EvlpError(f"{name}: its weights file is unreadable ({first_line(e)}); download it "
                                f"again") from None
            tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as e:
        if local:
            raise EvlpError(f"{name}: could not load BERT from this folder ({first_line(e)})") from e
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        raise EvlpError(f"could not load BERT {name!r}: it is not a local folder and not in the Hugging Face "
                        f"cache{' (offline mode)' if offline else ''}; fetch it once with `hf download {name}` "
                        f"(with network access) or pass a local folder ({first_line(e)})") from e

    unexpected = [k for k in info["unexpected_keys"] if not k.startswith(DROPPED_PREFIXES)]
    mismatched = [f"{key} {tuple(found)} in the file vs {tuple(wanted)} in the model"
                  for key, found, wanted in sorted(info["mismatched_keys"])]
    problems = [f"{label}: {clip(keys)}" for label, keys in
                (("missing", sorted(info["missing_keys"])), ("unexpected", sorted(unexpected)),
                 ("shape mismatch", mismatched)) if keys]
    if problems:
        raise EvlpError(f"{name}: the weights do not fit BertModel: {'; '.join(problems)}")
    return BertTextTower(bert=bert, depth=depth).eval(), tokenizer
