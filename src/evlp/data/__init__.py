"""Data: WebDataset image-text shards, tokenisation, image transforms and the embedded quickstart dataset."""

from evlp.data.shards import ImageTextShards, count_samples, expand_urls, make_loader
from evlp.data.synthetic import QuickstartData, ZeroShotTask, prepare_quickstart, zero_shot_tasks
from evlp.data.tokenizer import TextTokenizer, load_tokenizer
from evlp.data.transforms import eval_transform, train_transform

__all__ = [
    "ImageTextShards",
    "QuickstartData",
    "TextTokenizer",
    "ZeroShotTask",
    "count_samples",
    "eval_transform",
    "expand_urls",
    "load_tokenizer",
    "make_loader",
    "prepare_quickstart",
    "train_transform",
    "zero_shot_tasks",
]
