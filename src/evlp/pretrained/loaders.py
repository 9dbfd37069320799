"""Vision tower loaders (``load_data2vec2_image``, ``load_beitv2``) and conversion to safetensors.

A load is: read the file (``files.read_weight_file``: sniffed, never unpickled unsafely), check that it is the kind
of checkpoint asked for, read the architecture from its tensors, map its keys (``data2vec2`` / ``beitv2``), build the
tower at the kept depth and load it with ``towers.load_exact``. Nothing is ever downloaded here.

``evlp weights convert`` writes the mapped tower state dict as ``<file>.safetensors`` (next to the upstream file by
default), with the architecture and the source file's name, format and size as JSON in the safetensors metadata
(key ``'evlp'``). Later loads of the upstream path read that sibling instead: no pickle at all, and no pretraining
extras to skip.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from evlp.errors import EvlpError
from evlp.models.image import Data2Vec2ImageTower
from evlp.models.teacher import BEiTv2Teacher
from evlp.pretrained import beitv2, data2vec2
from evlp.pretrained.files import FORMAT_NAMES, METADATA_KEY, WeightFile, read_weight_file
from evlp.pretrained.towers import (TOWER_CLASSES, TowerSpec, block_index, identity, kept_depth, load_exact,
                                    resolve_heads)

READERS = {"data2vec2-fairseq": data2vec2, "beitv2-unilm": beitv2}
FORMAT_KINDS = {"data2vec2-fairseq": "data2vec2-image", "beitv2-unilm": "beitv2-teacher"}
KIND_NAMES = {
    "data2vec2-image": "a Data2Vec2 image checkpoint (fairseq base_imagenet.pt or its converted .safetensors)",
    "beitv2-teacher": "a BEiTv2 checkpoint (unilm beitv2_base_patch16_224_pt1k.pth or its converted .safetensors)",
}
KIND_USES = {
    "data2vec2-image": "it is an image tower (load_data2vec2_image, model.image_tower.path)",
    "beitv2-teacher": "it is a teacher (load_beitv2, model.teacher.path)",
}
METADATA_VERSION = 1


@dataclass
class LoadedTower:
    tower: nn.Module
    spec: TowerSpec
    file: WeightFile
    dropped: dict[str, list[str]]  # reason -> file keys


def converted_path(path: str | Path) -> Path:
    """Where ``evlp weights convert`` puts ``path``'s safetensors by default, and where loads look for it first."""
    path = Path(path)
    return path.with_name(path.name + ".safetensors")


def _converted_spec(metadata: dict, num_heads: int | None, where: str) -> TowerSpec:
    if metadata.get("format_version") != METADATA_VERSION:
        raise EvlpError(f"{where}: evlp metadata version {metadata.get('format_version')!r}, this evlp reads "
                        f"version {METADATA_VERSION}; convert the upstream file again")
    names = [f.name for f in fields(TowerSpec)]
    missing = [n for n in names if n not in metadata]
    if missing or metadata["kind"] not in TOWER_CLASSES:
        raise EvlpError(f"{where}: incomplete evlp metadata (missing {', '.join(missing) or 'nothing'}, kind "
                        f"{metadata.get('kind')!r}); convert the upstream file again")
    spec = TowerSpec(**{n: metadata[n] for n in names})
    resolve_heads(spec.num_heads, num_heads, spec.embed_dim, where)
    return spec


def _map_converted(state: dict, depth: int) -> tuple[dict, dict[str, list[str]]]:
    mapped, dropped = {}, {}
    for key, value in state.items():
        index = block_index(key)
        if index is not None and index >= depth:
            dropped.setdefault("blocks beyond the kept depth", []).append(key)
        else:
            mapped[key] = value
    return mapped, dropped


def tower_from_file(file: WeightFile, kind: str | None = None, depth: int | None = None,
                    num_heads: int | None = None) -> LoadedTower:
    """Build and load the tower a read file holds; ``kind`` ('data2vec2-image' / 'beitv2-teacher'), if given, is
    the kind the caller expects."""
    where = str(file.path)
    if file.format == "evlp-safetensors":
        found = file.metadata.get("kind")
        found_name = f"a converted {found} tower"
    else:
        found = FORMAT_KINDS.get(file.format)
        found_name = FORMAT_NAMES[file.format]
    if found not in TOWER_CLASSES:
        raise EvlpError(f"{where}: {found_name}, not a vision tower checkpoint")
    if kind is not None and found != kind:
        raise EvlpError(f"{where}: this is {found_name}, but {KIND_NAMES[kind]} was expected; {KIND_USES[found]}")

    if file.format == "evlp-safetensors":
        spec = _converted_spec(file.metadata, num_heads, where)
        keep = kept_depth(depth, spec.depth, where)
        mapped, dropped = _map_converted(file.content, keep)
        file_key = identity
    else:
        reader = READERS[file.format]
        spec = reader.read_spec(file.content, num_heads, where)
        keep = kept_depth(depth, spec.depth, where)
        mapped, dropped = reader.map_state_dict(file.content, keep, spec, where)
        file_key = reader.file_key
    tower = spec.build(keep)
    load_exact(tower, mapped, where, file_key)
    return LoadedTower(tower, spec, file, dropped)


def load_tower(path: str | Path, kind: str, depth: int | None = None, num_heads: int | None = None) -> LoadedTower:
    """Load ``path``, or its converted ``<path>.safetensors`` sibling when there is one."""
    path = Path(path)
    sibling = converted_path(path)
    if path.suffix == ".safetensors" or not sibling.is_file():
        return tower_from_file(read_weight_file(path), kind, depth, num_heads)
    file = read_weight_file(sibling)
    recorded = file.metadata.get("source_bytes") if file.metadata else None
    # A re-downloaded (or replaced) upstream file must not be shadowed by a conversion of the old one.
    if path.is_file() and recorded is not None and recorded != path.stat().st_size:
        raise EvlpError(f"{sibling} was converted from a {recorded:,}-byte {path.name}, which is now "
                        f"{path.stat().st_size:,} bytes; delete it or run `evlp weights convert {path}` again")
    return tower_from_file(file, kind, depth, num_heads)


def load_data2vec2_image(path: str | Path, depth: int | None = None,
                         num_heads: int | None = None) -> Data2Vec2ImageTower:
    """The first ``depth`` (default: all) blocks of a Data2Vec2 image encoder with its pretrained weights.

    ``path`` is fairseq's ``base_imagenet.pt`` (read without fairseq and without running code from it) or a
    ``.safetensors`` written by ``evlp weights convert``; ``<path>.safetensors`` is preferred when it exists. Width,
    depth, image and patch size come from the tensors; the head count from the checkpoint's config, else
    ``num_heads``, else 12. Raises ``EvlpError`` naming every tensor that is missing, unexpected or mis-shaped.
    """
    return load_tower(path, "data2vec2-image", depth, num_heads).tower


def load_beitv2(path: str | Path, depth: int | None = None, num_heads: int | None = None) -> BEiTv2Teacher:
    """A frozen BEiTv2 teacher (eval mode, no gradients) with unilm's pretrained weights, first ``depth`` blocks.

    ``path`` is ``beitv2_base_patch16_224_pt1k.pth`` or its converted ``.safetensors``; ``<path>.safetensors`` is
    preferred when it exists. Everything, the head count included, comes from the tensors (``num_heads`` only
    matters if the file does not say). ``forward_features`` stops before ``.norm``, which is loaded nonetheless.
    """
    return load_tower(path, "beitv2-teacher", depth, num_heads).tower


def convert_checkpoint(path: str | Path, out: str | Path | None = None) -> tuple[Path, LoadedTower]:
    """Write the tower held by an upstream checkpoint as safetensors (default ``<path>.safetensors``), all blocks."""
    path = Path(path)
    file = read_weight_file(path)
    if file.format == "evlp-safetensors":
        raise EvlpError(f"{path} is already a converted evlp safetensors file")
    loaded = tower_from_file(file)
    out = Path(out) if out is not None else converted_path(path)
    if not out.parent.is_dir():
        raise EvlpError(f"{out}: the folder {out.parent} does not exist")
    metadata = dict(loaded.spec.to_dict(), format_version=METADATA_VERSION, source_name=path.name,
                    source_format=file.format, source_bytes=path.stat().st_size)
    tmp = out.with_name(out.name + ".tmp")  # written whole, then renamed: a crash never leaves a half file at `out`
    save_file(loaded.tower.state_dict(), tmp, metadata={METADATA_KEY: json.dumps(metadata)})
    os.replace(tmp, out)
    return out, loaded
