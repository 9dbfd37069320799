"""Turn ``cfg.data`` into shard lists, a tokenizer and the training / validation datasets."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from evlp.data.shards import ImageTextShards, check_weights, expand_urls
from evlp.data.synthetic import prepare_quickstart
from evlp.data.tokenizer import TextTokenizer, load_tokenizer
from evlp.data.transforms import eval_transform, train_transform
from evlp.errors import EvlpError

QUICKSTART = "quickstart"


@dataclass
class RunData:
    train_sources: list[list[str]]  # the shards of each data.train entry
    val_urls: list[str]
    tokenizer_source: str | None  # tokenizer name/folder implied by the data (the quickstart ships its own vocab)
    quickstart: bool = False
    num_train: int | None = None
    notes: list[str] = field(default_factory=list)
    train_weights: list[float] | None = None  # data.train_weights, checked


def expand_source(entry: str) -> list[str]:
    """A folder of ``.tar`` shards, a brace pattern or a single ``.tar`` -> the list of shard paths, all present."""
    urls = expand_urls(entry)
    missing = [u for u in urls if "://" not in u and not Path(u).is_file()]
    if missing:
        raise EvlpError(f"data source {entry}: {len(missing)} of {len(urls)} shards do not exist "
                        f"(first: {missing[0]}); check data_path/base_dir or download the data first")
    return urls


def prepare_run_data(cfg: DictConfig) -> RunData:
    """Resolve every train/val source; generate the quickstart shards on first use."""
    d = cfg.data
    val, tokenizer_source, is_quickstart, num_train = [], None, False, None
    if d.open_shards < 1:
        raise EvlpError(f"data.open_shards must be at least 1, got {d.open_shards}")
    weights = d.get("train_weights")
    if weights is not None:  # before any work: one clear line
        weights = check_weights(weights, len(d.train), name="data.train_weights")
    if QUICKSTART in list(d.train) + list(d.val):
        q = d.quickstart
        qs = prepare_quickstart(Path(q.root), q.num_train, q.num_val, q.image_size, q.shard_size, q.seed)
        tokenizer_source, is_quickstart, num_train = str(qs.vocab_dir), True, qs.num_train
    sources = [list(qs.train_urls) if entry == QUICKSTART else expand_source(entry) for entry in d.train]
    for entry in d.val:
        val += qs.val_urls if entry == QUICKSTART else expand_source(entry)
    if not any(sources):
        raise EvlpError("data.train is empty; name at least one shard folder, brace pattern or `quickstart`")
    if d.train != [QUICKSTART]:
        num_train = None  # counted from the shards' stats
    return RunData(sources, val, tokenizer_source, is_quickstart, num_train, train_weights=weights)


def build_tokenizer(cfg: DictConfig, run_data: RunData):
    """The HF tokenizer: ``model.text_tower.tokenizer``, else the text tower's own, else the data's."""
    t = cfg.model.text_tower
    source = t.tokenizer or t.path or run_data.tokenizer_source
    if source is None:
        raise EvlpError("no tokenizer: set model.text_tower.tokenizer (a Hugging Face name or folder)")
    return load_tokenizer(source)


def build_datasets(cfg: DictConfig, run_data: RunData, hf_tokenizer):
    d = cfg.data
    text = TextTokenizer(hf_tokenizer, max_len=d.max_text_len)
    # uint8 batches, normalised on the device by PretrainModule.on_after_batch_transfer (a quarter of the bytes to
    # write, to pass through shared memory and to copy to the GPU)
    transform = train_transform(d.image_size, crop_scale=tuple(d.crop_scale), color_jitter=d.color_jitter,
                                hflip=d.hflip, normalize=False)
    # Each data.train entry is a source: mixed pair by pair, by size or by data.train_weights (evlp.data.shards).
    train = ImageTextShards(run_data.train_sources, text, transform, d.batch_size, train=True, seed=cfg.seed,
                            shuffle_buffer=d.shuffle_buffer, num_samples=run_data.num_train,
                            weights=run_data.train_weights, open_shards=d.open_shards)
    if rank_zero_only.rank == 0:
        for line in train.mixture_summary():
            print(f"data mixture: {line}", file=sys.stderr)
    val = None
    if run_data.val_urls:
        val = ImageTextShards(run_data.val_urls, text, eval_transform(d.image_size), d.eval_batch_size, train=False)
    return text, train, val
