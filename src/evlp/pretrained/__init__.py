"""Loaders for the upstream pretrained checkpoints the S-SMKE towers start from.

    from evlp.pretrained import load_data2vec2_image, load_beitv2, load_bert, detect_format

    image = load_data2vec2_image("models/base_imagenet.pt", depth=6)             # fairseq Data2Vec 2.0 -> timm ViT
    teacher = load_beitv2("models/beitv2_base_patch16_224_pt1k.pth")              # unilm BEiT v2 -> frozen timm Beit
    text, tokenizer = load_bert("bert-base-uncased", depth=6)                      # Hugging Face BERT
    detect_format("models/base_imagenet.pt")                                       # 'data2vec2-fairseq'

Every tensor of a file is either loaded or dropped by a documented rule (``data2vec2``, ``beitv2``, ``bert``); anything
else is an ``EvlpError`` naming the tensors. No file is unpickled with code execution (``safe_pickle``), nothing is
downloaded except by ``evlp download weights`` (``download``), and ``evlp weights convert`` (``loaders``) turns an
upstream file into safetensors that later loads prefer.

Other donors (``kind: timm:<name>`` / ``kind: hf``, docs/training.md "Other donors"): ``timm_weights`` reads, maps and
checks weight files for any timm model (torchvision's MobileNetV2 included), ``hf_text`` loads any BERT-like Hugging
Face encoder as a text tower.
"""

from evlp.pretrained.bert import load_bert
from evlp.pretrained.files import detect_format
from evlp.pretrained.loaders import load_beitv2, load_data2vec2_image

__all__ = ["detect_format", "load_beitv2", "load_bert", "load_data2vec2_image"]
