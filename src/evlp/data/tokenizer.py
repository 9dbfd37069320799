"""Caption tokenisation: ``[CLS] wordpieces [SEP]`` padded with [PAD] to a fixed length (reference §7.2).

    tokenizer = TextTokenizer(load_tokenizer("bert-base-uncased"), max_len=64)
    ids, padding_mask = tokenizer(["two small red circles at the top left"])  # (1, 64) long, (1, 64) bool

``padding_mask`` is True at padding positions, the complement of Hugging Face's ``attention_mask``; that is the
convention of every evlp model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from evlp.errors import EvlpError

# Any one of these makes a folder a tokenizer folder for `from_pretrained`.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "vocab.json")


def load_tokenizer(name_or_dir: str | os.PathLike) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` for a local folder or a hub name; EvlpError with a one-line reason on failure.

    (In transformers 5, ``BertTokenizer(vocab_file=...)`` silently builds a 5-token vocabulary; always come here.)
    """
    name = str(name_or_dir)
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in _TOKENIZER_FILES):
            raise EvlpError(f"{path} is not a tokenizer folder: none of {', '.join(_TOKENIZER_FILES)} found")
        name = str(path)
    elif path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        # A file, or something only a local path looks like (hub names are "name" or "org/name").
        raise EvlpError(f"tokenizer folder {name} not found")
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvlpError(f"cannot load tokenizer {name}: {reason}") from e


class TextTokenizer:
    """``tokenizer(texts) -> (token_ids (B, max_len) long, padding_mask (B, max_len) bool)``.

    Captions longer than ``max_len - 2`` word pieces are truncated; an empty caption becomes ``[CLS] [SEP]``.
    Picklable, so DataLoader workers can tokenise.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_len: int = 64):
        if tokenizer.pad_token_id is None:
            raise EvlpError(f"tokenizer {tokenizer.name_or_path} has no [PAD] token")
        if max_len < 2:
            raise ValueError(f"max_len must leave room for [CLS] and [SEP], got {max_len}")
        self.tokenizer = tokenizer
        self.max_len = max_len

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            raise TypeError("TextTokenizer takes a list of strings; wrap a single caption in a list")
        if len(texts) == 0:
            empty = torch.empty(0, self.max_len)
            return empty.long(), empty.bool()
        encoded = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.max_len,
            return_attention_mask=True,
            return_token_type_ids=False,
            return_tensors="pt",
        )
        return encoded["input_ids"].long(), encoded["attention_mask"] == 0

    def __repr__(self) -> str:
        return f"TextTokenizer({self.tokenizer.name_or_path!r}, vocab_size={self.vocab_size}, max_len={self.max_len})"
