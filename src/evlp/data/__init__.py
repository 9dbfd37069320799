"""Data: WebDataset image-text shards, tokenisation, image transforms and the embedded quickstart dataset."""

from evlp.data.shards import ImageTextShards, count_samples, expand_urls, make_loader
from evlp.data.synthetic import QuickstartData, ZeroShotTask, prepare_quickstart, zero_shot_tasks
from evlp.data.tokenizer import TextTokenizer, load_tokenizer
from evlp.data.transforms import TrainTransform, eval_transform, normalize_images, train_transform

__all__ = [
    "ImageTextShards",
    "QuickstartData",
    "TextTokenizer",
    "TrainTransform",
    "ZeroShotTask",
    "count_samples",
    "eval_transform",
    "expand_urls",
    "load_tokenizer",
    "make_loader",
    "normalize_images",
    "prepare_quickstart",
    "train_transform",
    "zero_shot_tasks",
]
