"""What the format readers share: the architecture record of a vision tower, and the strict, exact state-dict load.

Every reader turns a file into ``(TowerSpec, state)`` and then into ``(mapped, dropped)``; ``load_exact`` accepts the
mapped tensors only if they are exactly the tower's state dict, names and shapes, so that every tensor of a file is
either loaded or was dropped on purpose by a documented rule.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn

from evlp.errors import EvlpError
from evlp.models.image import Data2Vec2ImageTower
from evlp.models.teacher import BEiTv2Teacher
from evlp.pretrained.files import clip

TOWER_CLASSES = {"data2vec2-image": Data2Vec2ImageTower, "beitv2-teacher": BEiTv2Teacher}
BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class TowerSpec:
    """A vision tower's architecture, as read from a checkpoint's tensors (and its config, for the head count)."""

    kind: str  # a key of TOWER_CLASSES
    embed_dim: int
    depth: int  # blocks in the file
    num_heads: int
    img_size: int
    patch_size: int
    mlp_ratio: float

    def build(self, depth: int) -> nn.Module:
        return TOWER_CLASSES[self.kind](img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
                                        depth=depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio)

    def describe(self) -> str:
        return (f"width {self.embed_dim}, depth {self.depth}, heads {self.num_heads}, img {self.img_size}, "
                f"patch {self.patch_size}, mlp ratio {self.mlp_ratio:g}")

    def to_dict(self) -> dict:
        return asdict(self)


def tensor(state: dict, key: str, where: str, ndim: int) -> torch.Tensor:
    """``state[key]``, which the architecture is read from; a one-line error if it is absent or malformed."""
    value = state.get(key)
    if not isinstance(value, torch.Tensor):
        found = "missing" if value is None else f"a {type(value).__name__}, not a tensor"
        raise EvlpError(f"{where}: tensor {key!r} is {found}")
    if value.ndim != ndim:
        raise EvlpError(f"{where}: tensor {key!r} has shape {tuple(value.shape)}, expected {ndim} dimensions")
    return value


def count_blocks(keys) -> int:
    """Number of ``blocks.{i}.*`` entries: 1 + the largest index (gaps show up later as missing keys)."""
    indices = [int(m.group(1)) for m in map(BLOCK_KEY.match, keys) if m]
    return max(indices) + 1 if indices else 0


def block_index(key: str) -> int | None:
    m = BLOCK_KEY.match(key)
    return int(m.group(1)) if m else None


def resolve_heads(found: int | None, requested: int | None, embed_dim: int, where: str) -> int:
    """The checkpoint's own head count wins; else the caller's; else 12 (every released ViT-B)."""
    if found is not None and requested is not None and requested != found:
        warnings.warn(f"{where}: num_heads={requested} ignored, the checkpoint says {found}", stacklevel=3)
    heads = found or requested or 12
    if embed_dim % heads:
        raise EvlpError(f"{where}: width {embed_dim} is not divisible by {heads} heads; pass the right num_heads")
    return heads


def kept_depth(requested: int | None, available: int, where: str) -> int:
    if requested is None:
        return available
    if not 1 <= requested <= available:
        raise EvlpError(f"{where}: depth {requested} asked for, but the checkpoint has {available} blocks "
                        f"(use 1..{available}, or none for all)")
    return requested


def identity(key: str) -> str:
    return key


def fit_problems(expected: dict, state: dict, file_key=identity) -> list[str]:
    """Every tensor of ``state`` that is missing from, foreign to or mis-shaped for a module whose state dict is
    ``expected`` (only shapes are read, so ``expected`` may live on the meta device), grouped on one line each."""
    missing = [f"{file_key(k)} {tuple(v.shape)}" for k, v in expected.items() if k not in state]
    unexpected = [f"{file_key(k)} {tuple(v.shape)}" if isinstance(v, torch.Tensor)
                  else f"{file_key(k)} (a {type(v).__name__}, not a tensor)"
                  for k, v in state.items() if k not in expected or not isinstance(v, torch.Tensor)]
    mismatched = [f"{file_key(k)} {tuple(v.shape)} in the file vs {tuple(expected[k].shape)} in the model"
                  for k, v in state.items()
                  if k in expected and isinstance(v, torch.Tensor) and v.shape != expected[k].shape]
    return [f"{label}: {clip(keys)}" for label, keys in
            (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys]


def load_exact(module: nn.Module, state: dict, where: str, file_key=identity) -> None:
    """``module.load_state_dict(state)`` that first names every missing, unexpected or mis-shaped tensor.

    ``file_key`` turns a module key back into the file's name for it, so that messages use the names the user's
    file has.
    """
    problems = fit_problems(module.state_dict(), state, file_key)
    if problems:
        raise EvlpError(f"{where}: the weights do not fit {type(module).__name__}: {'; '.join(problems)}")
    module.load_state_dict(state, strict=True)
