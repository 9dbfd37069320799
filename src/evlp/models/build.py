"""Build the student and the teacher from a run config (``cfg.model``), with or without pretrained weights.

Each part names its donor with ``kind``: the recipe's built-in ones (``data2vec2`` image tower, ``bert`` text tower,
``beitv2`` teacher, read from their upstream files), ``timm:<model name>`` for an image tower or a teacher (weights
from ``path``, from timm's own pretrained weights with ``pretrained_hub: true``, or random), and ``hf`` for a
BERT-like Hugging Face text encoder named by ``path``. ``load_weights=False`` builds the same architecture without
reading any weights (``evlp info``, FLOP counts, rebuilding a student from its checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from evlp.errors import EvlpError
from evlp.models.image import Data2Vec2ImageTower
from evlp.models.s_smke import SSMKE
from evlp.models.teacher import BEiTv2Teacher
from evlp.models.text import BertTextTower, bert_config, set_dropout
from evlp.models.timm_donors import TimmImageTower, TimmTeacher, create_timm_model, timm_name
from evlp.pretrained.commands import WEIGHT_URLS

# Where the seed README tells users to get each upstream file.
DOWNLOAD_URLS = {
    "data2vec2": WEIGHT_URLS["base_imagenet.pt"],
    "beitv2": WEIGHT_URLS["beitv2_base_patch16_224_pt1k.pth"],
}


def check_weight_files(model_cfg: DictConfig) -> None:
    """Fail before any work on a donor that cannot be built: a missing weight file (saying where it was expected and
    where to get it; ``evlp download weights --data-path DIR`` fetches the built-in ones), an unknown timm model, a
    weight file that does not fit the named architecture, a depth the donor does not allow, a Hugging Face text model
    without a tokenizer. Nothing is allocated: the timm donors are checked on the meta device."""
    for part in ("image_tower", "teacher"):
        cfg, where = model_cfg[part], f"model.{part}"
        name = timm_name(cfg.kind)
        if name is not None:
            _check_timm(cfg, name, where, teacher=part == "teacher")
        elif cfg.path is not None and not Path(cfg.path).exists():
            url = DOWNLOAD_URLS.get(cfg.kind, "")
            raise EvlpError(
                f"{where}.path: {cfg.path} does not exist; download {url} to that path "
                f"(or run `evlp download weights --data-path <base_dir>`), or set {where}.path=..."
            )
    if model_cfg.text_tower.kind == "hf":
        _check_hf_text(model_cfg.text_tower)


def _check_timm(cfg: DictConfig, name: str, where: str, teacher: bool) -> None:
    from evlp.pretrained.timm_weights import check_timm_weights

    with torch.device("meta"):  # name, model_kwargs, depth and target, at no cost
        (build_teacher if teacher else build_image_tower)(cfg, load_weights=False)
    if cfg.path is not None:
        if cfg.pretrained_hub:
            raise EvlpError(f"{where}: both path and pretrained_hub are set; give one source of weights")
        check_timm_weights(name, cfg.img_size, where, cfg.path, cfg.model_kwargs,
                           keep_classifier=teacher and cfg.target == "logits")


def _check_hf_text(cfg: DictConfig) -> None:
    from evlp.data.tokenizer import load_tokenizer
    from evlp.pretrained.hf_text import hf_config

    where = "model.text_tower"
    if cfg.path is None:
        raise EvlpError(f"{where}.path: kind hf needs a Hugging Face model name or folder")
    config = hf_config(cfg.path, where)
    with torch.device("meta"):  # the layer list and the depth
        build_text_tower(cfg, load_weights=False)
    source = cfg.tokenizer or cfg.path
    try:
        tokenizer = load_tokenizer(source)
    except EvlpError as e:
        raise EvlpError(f"{where}: no tokenizer for {cfg.path} ({e}); set {where}.tokenizer to the Hugging Face "
                        f"name or folder of the tokenizer the model was trained with") from None
    if len(tokenizer) > config.vocab_size:
        raise EvlpError(f"{where}: the tokenizer {source} has {len(tokenizer):,} tokens, but {cfg.path} embeds only "
                        f"{config.vocab_size:,}; set {where}.tokenizer to the model's own tokenizer")


def build_image_tower(cfg: DictConfig, load_weights: bool = True):
    name = timm_name(cfg.kind)
    if name is not None:
        if load_weights:
            from evlp.pretrained.timm_weights import load_timm_model

            model = load_timm_model(name, cfg.img_size, "model.image_tower", cfg.path, cfg.pretrained_hub,
                                    cfg.model_kwargs)
        else:
            model = create_timm_model(name, cfg.img_size, 0, "model.image_tower", cfg.model_kwargs)
        return TimmImageTower(model, name, cfg.img_size, cfg.depth)
    if cfg.kind != "data2vec2":
        raise EvlpError(f"model.image_tower.kind: unknown kind '{cfg.kind}'; expected 'data2vec2' or "
                        f"'timm:<model name>'")
    if cfg.path is not None and load_weights:
        from evlp.pretrained import load_data2vec2_image

        return load_data2vec2_image(cfg.path, depth=cfg.depth, num_heads=cfg.num_heads)
    return Data2Vec2ImageTower(cfg.img_size, cfg.patch_size, cfg.width, cfg.depth or 12, cfg.num_heads)


def build_text_tower(cfg: DictConfig, tokenizer=None, load_weights: bool = True):
    """``tokenizer`` (an HF tokenizer) sets the vocabulary size of a randomly initialised ``bert`` tower;
    ``cfg.dropout``, when set, replaces every dropout probability of the tower."""
    tower = _text_tower(cfg, tokenizer, load_weights)
    dropout = cfg.get("dropout")  # absent from the configs of checkpoints written before it existed
    if dropout is not None:
        if not 0 <= dropout < 1:
            raise EvlpError(f"model.text_tower.dropout={dropout}: expected a probability in [0, 1)")
        set_dropout(tower, dropout)
    return tower


def _text_tower(cfg: DictConfig, tokenizer, load_weights: bool):
    if cfg.kind == "hf":
        from evlp.pretrained.hf_text import load_hf_text

        if cfg.path is None:
            raise EvlpError("model.text_tower.path: kind hf needs a Hugging Face model name or folder")
        return load_hf_text(cfg.path, cfg.depth, load_weights)
    if cfg.kind != "bert":
        raise EvlpError(f"model.text_tower.kind: unknown kind '{cfg.kind}'; expected 'bert' or 'hf'")
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


def build_teacher(cfg: DictConfig, load_weights: bool = True):
    name = timm_name(cfg.kind)
    if name is not None:
        logits = cfg.target == "logits"
        if load_weights:
            from evlp.pretrained.timm_weights import load_timm_model

            model = load_timm_model(name, cfg.img_size, "model.teacher", cfg.path, cfg.pretrained_hub,
                                    cfg.model_kwargs, keep_classifier=logits)
        else:
            model = create_timm_model(name, cfg.img_size, None if logits else 0, "model.teacher", cfg.model_kwargs)
        return TimmTeacher(model, name, cfg.img_size, cfg.target, cfg.depth)
    if cfg.kind != "beitv2":
        raise EvlpError(f"model.teacher.kind: unknown kind '{cfg.kind}'; expected 'beitv2' or 'timm:<model name>'")
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
