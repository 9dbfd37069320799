"""unilm BEiT v2 pretraining checkpoints (``beitv2_base_patch16_224_pt1k.pth``) -> ``BEiTv2Teacher``.

The file is ``{'model': state_dict}`` of unilm's ``VisionTransformerForMaskedImageModeling`` plus its two BEiT v2
patch-aggregation blocks; it holds only tensors, so ``torch.load(weights_only=True)`` reads it. Its keys are timm
``Beit``'s keys already (timm ported the model), so nothing is renamed:

=============================================================  ==================  ==================================
unilm key                                                      shape (ViT-B)       in the teacher
=============================================================  ==================  ==================================
``cls_token``                                                  (1, 1, 768)         loaded
``patch_embed.proj.{weight,bias}``                             (768, 3, 16, 16)    loaded
``rel_pos_bias.relative_position_bias_table``                  (732, 12)           loaded; (2g-1)^2 + 3 rows, H cols
``rel_pos_bias.relative_position_index``                       (197, 197) int64    checked against timm's, dropped
``blocks.{i}.{gamma_1,gamma_2,norm1,attn.q_bias,attn.v_bias,``                     loaded for i < the kept depth,
``attn.qkv.weight,attn.proj,norm2,mlp.fc1,mlp.fc2}``                               dropped beyond it
``norm.{weight,bias}``                                         (768,)              loaded (``.norm``, not applied)
``mask_token``, ``lm_head.*``                                  MIM pretraining     dropped
``cls_pt_layers.*``                                            2 extra blocks      dropped (pretraining only)
=============================================================  ==================  ==================================

Everything, the head count included, is read from the tensors: the relative position table has one column per head.
"""

from __future__ import annotations

from math import isqrt

import torch
from timm.models.beit import gen_relative_position_index

from evlp.errors import EvlpError
from evlp.pretrained.towers import TowerSpec, block_index, count_blocks, resolve_heads, tensor

TABLE = "rel_pos_bias.relative_position_bias_table"
INDEX = "rel_pos_bias.relative_position_index"
PRETRAINING_ONLY = ("mask_token", "lm_head.", "cls_pt_layers.")


def grid_from_table(rows: int) -> int | None:
    """Patch grid side g from the table's ``(2g - 1)^2 + 3`` rows (3 = the CLS-to-patch, patch-to-CLS, CLS-to-CLS
    entries), or None if ``rows`` is not of that form."""
    side = isqrt(rows - 3) if rows > 3 else 0
    return (side + 1) // 2 if side * side == rows - 3 and side % 2 == 1 else None


def read_spec(ckpt: dict, num_heads: int | None, where: str) -> TowerSpec:
    state = ckpt["model"]
    cls = tensor(state, "cls_token", where, ndim=3)  # (1, 1, D)
    patch = tensor(state, "patch_embed.proj.weight", where, ndim=4)  # (D, 3, p, p)
    table = tensor(state, TABLE, where, ndim=2)  # (num_relative_distance, H)
    fc1 = tensor(state, "blocks.0.mlp.fc1.weight", where, ndim=2)  # (hidden, D)
    grid = grid_from_table(table.shape[0])
    if grid is None or patch.shape[1] != 3 or patch.shape[2] != patch.shape[3]:
        raise EvlpError(f"{where}: expected square RGB patches on a square grid, got patch weights "
                        f"{tuple(patch.shape)} and a relative position table of {table.shape[0]} rows")
    embed_dim = cls.shape[-1]
    heads = resolve_heads(table.shape[1], num_heads, embed_dim, where)
    return TowerSpec("beitv2-teacher", embed_dim, count_blocks(state), heads, img_size=grid * patch.shape[-1],
                     patch_size=patch.shape[-1], mlp_ratio=fc1.shape[0] / embed_dim)


def file_key(tower_key: str) -> str:
    return tower_key  # timm's Beit names its tensors as unilm does


def map_state_dict(ckpt: dict, depth: int, spec: TowerSpec, where: str) -> tuple[dict, dict[str, list[str]]]:
    mapped, dropped = {}, {}
    for key, value in ckpt["model"].items():
        index = block_index(key)
        if key.startswith(PRETRAINING_ONLY):
            dropped.setdefault("mask_token, lm_head, cls_pt_layers (pretraining only)", []).append(key)
        elif key == INDEX:
            # timm recomputes this buffer; a file whose index differs was built with another layout of the table.
            grid = spec.img_size // spec.patch_size
            if not (isinstance(value, torch.Tensor) and torch.equal(value, gen_relative_position_index((grid, grid)))):
                raise EvlpError(f"{where}: {INDEX} differs from BEiT's standard index for a {grid}x{grid} grid")
            dropped.setdefault("relative_position_index (equal to timm's, recomputed)", []).append(key)
        elif index is not None and index >= depth:
            dropped.setdefault("blocks beyond the kept depth", []).append(key)
        else:
            mapped[key] = value
    return mapped, dropped
