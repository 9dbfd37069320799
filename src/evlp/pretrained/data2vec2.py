"""fairseq Data2Vec 2.0 image checkpoints (``base_imagenet.pt``) -> ``Data2Vec2ImageTower``.

The file is a fairseq trainer checkpoint, a dict ``{args, cfg, model, criterion, optimizer_history, task_state,
extra_state}``. ``cfg`` is the Hydra config as a plain dict (``cfg['model']`` holds ``num_heads``, ``depth``,
``embed_dim``, ``layer_norm_first``, ``norm_eps``, ...); ``model`` is ``Data2VecMultiModel.state_dict()``:

===============================================================  ============================  =====================
fairseq key                                                      shape (ViT-B)                 tower key
===============================================================  ============================  =====================
``modality_encoders.IMAGE.extra_tokens``                         (1, 1, 768)                   ``cls_token``
``modality_encoders.IMAGE.local_encoder.proj.{weight,bias}``     (768, 3, 16, 16), (768,)      ``patch_embed.proj.*``
``modality_encoders.IMAGE.fixed_positional_encoder.positions``   (1, 196, 768)                 ``pos_embed``
``modality_encoders.IMAGE.context_encoder.norm.{weight,bias}``   (768,)                        ``norm_pre.*``
``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``  post-LN blocks, no scale      unchanged
``modality_encoders.IMAGE.decoder.*``                            conv decoder                  dropped (pretraining)
``_ema``                                                         a dict of tensors, not one    dropped (EMA teacher)
===============================================================  ============================  =====================

``blocks.{i}`` with i >= the kept depth are dropped too. Width, patch size, grid (so image size), MLP ratio and depth
come from the tensors; the head count comes from ``cfg['model']['num_heads']`` (attention weights do not show it).
"""

from __future__ import annotations

from math import isqrt

from evlp.errors import EvlpError
from evlp.pretrained.towers import TowerSpec, block_index, count_blocks, resolve_heads, tensor

PREFIX = "modality_encoders.IMAGE."
RENAMES = {
    PREFIX + "extra_tokens": "cls_token",
    PREFIX + "local_encoder.proj.weight": "patch_embed.proj.weight",
    PREFIX + "local_encoder.proj.bias": "patch_embed.proj.bias",
    PREFIX + "fixed_positional_encoder.positions": "pos_embed",
    PREFIX + "context_encoder.norm.weight": "norm_pre.weight",
    PREFIX + "context_encoder.norm.bias": "norm_pre.bias",
}
FILE_KEYS = {tower_key: file_key for file_key, tower_key in RENAMES.items()}


def model_config(ckpt: dict) -> dict:
    """``cfg['model']`` when the checkpoint carries it as a plain dict (fairseq stores the resolved Hydra config)."""
    cfg = ckpt.get("cfg")
    model = cfg.get("model") if isinstance(cfg, dict) else None
    return model if isinstance(model, dict) else {}


def read_spec(ckpt: dict, num_heads: int | None, where: str) -> TowerSpec:
    state, cfg = ckpt["model"], model_config(ckpt)
    if PREFIX + "extra_tokens" not in state:
        encoders = sorted({k.split(".")[1] for k in state if k.startswith("modality_encoders.")})
        if "IMAGE" in encoders:  # the encoder is there but incomplete: a truncated or edited file
            raise EvlpError(f"{where}: its IMAGE encoder lacks {PREFIX}extra_tokens (the CLS token); expected the "
                            f"complete image model base_imagenet.pt: download it again")
        raise EvlpError(f"{where}: no IMAGE encoder in this Data2Vec2 checkpoint (it has "
                        f"{', '.join(encoders) or 'none'}); expected the image model base_imagenet.pt")
    # fairseq's layer_norm_first=True variant is pre-LN with a final norm, a different computation from this tower's.
    if cfg.get("layer_norm_first", False) or cfg.get("norm_eps", 1e-6) != 1e-6:
        raise EvlpError(f"{where}: cfg.model has layer_norm_first={cfg.get('layer_norm_first')}, norm_eps="
                        f"{cfg.get('norm_eps')}; the image tower is base_imagenet.pt's post-LN blocks with eps 1e-6")
    cls = tensor(state, PREFIX + "extra_tokens", where, ndim=3)  # (1, num_extra_tokens, D)
    patch = tensor(state, PREFIX + "local_encoder.proj.weight", where, ndim=4)  # (D, 3, p, p)
    positions = tensor(state, PREFIX + "fixed_positional_encoder.positions", where, ndim=3)  # (1, N, D)
    fc1 = tensor(state, "blocks.0.mlp.fc1.weight", where, ndim=2)  # (hidden, D)
    if cls.shape[1] != 1:
        raise EvlpError(f"{where}: {cls.shape[1]} extra tokens; the image tower has exactly one CLS token")
    embed_dim, grid = cls.shape[-1], isqrt(positions.shape[1])
    if grid * grid != positions.shape[1] or patch.shape[1] != 3 or patch.shape[2] != patch.shape[3]:
        raise EvlpError(f"{where}: expected square RGB patches on a square grid, got patch weights "
                        f"{tuple(patch.shape)} and {positions.shape[1]} positions")
    heads = resolve_heads(cfg.get("num_heads"), num_heads, embed_dim, where)
    return TowerSpec("data2vec2-image", embed_dim, count_blocks(state), heads,
                     img_size=grid * patch.shape[-1], patch_size=patch.shape[-1], mlp_ratio=fc1.shape[0] / embed_dim)


def map_state_dict(ckpt: dict, depth: int, spec: TowerSpec, where: str) -> tuple[dict, dict[str, list[str]]]:
    """fairseq keys -> tower keys for the first ``depth`` blocks. A key no rule drops or renames passes through as
    it is, so that ``load_exact`` names it as unexpected."""
    mapped, dropped = {}, {}
    for key, value in ckpt["model"].items():
        index = block_index(key)
        if key == "_ema":
            dropped.setdefault("_ema (EMA teacher)", []).append(key)
        elif "decoder" in key:
            dropped.setdefault("decoder (pretraining only)", []).append(key)
        elif index is not None and index >= depth:
            dropped.setdefault("blocks beyond the kept depth", []).append(key)
        else:
            mapped[RENAMES.get(key, key)] = value
    return mapped, dropped


def file_key(tower_key: str) -> str:
    return FILE_KEYS.get(tower_key, tower_key)
