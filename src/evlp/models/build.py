"""Build the student and the teacher from a run config (``cfg.model``), with or without pretrained weights."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from evlp.errors import EvlpError
from evlp.models.image import Data2Vec2ImageTower
from evlp.models.s_smke import SSMKE
from evlp.models.teacher import BEiTv2Teacher
from evlp.models.text import BertTextTower, bert_config
from evlp.pretrained.commands import WEIGHT_URLS

# Where the seed README tells users to get each upstream file.
DOWNLOAD_URLS = {
    "data2vec2": WEIGHT_URLS["base_imagenet.pt"],
    "beitv2": WEIGHT_URLS["beitv2_base_patch16_224_pt1k.pth"],
}


def check_weight_files(model_cfg: DictConfig) -> None:
    """Fail before any work when a configured weight file is missing, saying where it was expected and where to get
    it (``evlp download weights --data-path DIR`` fetches both)."""
    for part, kind in (("image_tower", model_cfg.image_tower.kind), ("teacher", model_cfg.teacher.kind)):
        path = model_cfg[part].path
        if path is not None and not Path(path).exists():
            url = DOWNLOAD_URLS.get(kind, "")
            raise EvlpError(
                f"model.{part}.path: {path} does not exist; download {url} to that path "
                f"(or run `evlp download weights --data-path <base_dir>`), or set model.{part}.path=..."
            )


def build_image_tower(cfg: DictConfig, load_weights: bool = True):
    if cfg.kind != "data2vec2":
        raise EvlpError(f"model.image_tower.kind: unknown kind '{cfg.kind}'; expected 'data2vec2'")
    if cfg.path is not None and load_weights:
        from evlp.pretrained import load_data2vec2_image

        return load_data2vec2_image(cfg.path, depth=cfg.depth, num_heads=cfg.num_heads)
    return Data2Vec2ImageTower(cfg.img_size, cfg.patch_size, cfg.width, cfg.depth or 12, cfg.num_heads)


def build_text_tower(cfg: DictConfig, tokenizer=None, load_weights: bool = True) -> BertTextTower:
    """``tokenizer`` (an HF tokenizer) sets the vocabulary size of a randomly initialised tower."""
    if cfg.kind != "bert":
        raise EvlpError(f"model.text_tower.kind: unknown kind '{cfg.kind}'; expected 'bert'")
    if cfg.path is not None and load_weights:
        from evlp.pretrained import load_bert

        tower, _ = load_bert(cfg.path, depth=cfg.depth)
        return tower
    config = bert_config(
        vocab_size=len(tokenizer) if tokenizer is not None else 30522,
        hidden_size=cfg.width,
        num_attention_heads=cfg.num_heads,
        intermediate_size=4 * cfg.width,
        max_position_embeddings=cfg.max_positions,
        num_hidden_layers=cfg.depth or 12,
    )
    return BertTextTower(config)


def build_teacher(cfg: DictConfig, load_weights: bool = True) -> BEiTv2Teacher:
    if cfg.kind != "beitv2":
        raise EvlpError(f"model.teacher.kind: unknown kind '{cfg.kind}'; expected 'beitv2'")
    if cfg.path is not None and load_weights:
        from evlp.pretrained import load_beitv2

        return load_beitv2(cfg.path, depth=cfg.depth, num_heads=cfg.num_heads)
    return BEiTv2Teacher(cfg.img_size, cfg.patch_size, cfg.width, cfg.depth or 12, cfg.num_heads)


def build_student(model_cfg: DictConfig, kd_dim: int, init_temperature: float = 0.07, tokenizer=None,
                  load_weights: bool = True) -> SSMKE:
    return SSMKE(
        image_tower=build_image_tower(model_cfg.image_tower, load_weights),
        text_tower=build_text_tower(model_cfg.text_tower, tokenizer, load_weights),
        embed_dim=model_cfg.embed_dim,
        num_heads=model_cfg.num_heads,
        mlp_ratio=model_cfg.mlp_ratio,
        shared_layer_scale=model_cfg.shared_layer_scale,
        tte_layer_scale=model_cfg.tte_layer_scale,
        dropout=model_cfg.dropout,
        kd_dim=kd_dim,
        init_temperature=init_temperature,
    )
