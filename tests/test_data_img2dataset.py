"""Shards written by the real img2dataset (tests/fixtures/img2dataset, with the command that made them) are read as
they are: counted from img2dataset's own stats files, every pair with its caption, and trained on by `evlp train`."""

from __future__ import annotations

import json
from pathlib import Path

import evlp.data.shards as shards
from evlp.cli import main
from evlp.data import ImageTextShards, count_samples, eval_transform
from tests.test_data_download import tokenizer
from tests.test_own_data import own_data_overrides

FIXTURE = Path(__file__).parent / "fixtures" / "img2dataset" / "shards"
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
CAPTIONS = {f"a {COLOURS[i % 8]} {['square', 'circle', 'bar'][i // 8 % 3]} number {i}" for i in range(16)}


def test_counts_come_from_img2dataset_stats_without_opening_a_tar(monkeypatch):
    def no_tar_reading(url):
        raise AssertionError(f"{url} was read to count it")

    monkeypatch.setattr(shards, "_count_tar", no_tar_reading)
    stats = [json.loads(p.read_text()) for p in sorted(FIXTURE.glob("*_stats.json"))]
    assert count_samples(str(FIXTURE)) == sum(s["successes"] for s in stats) == 17


def test_every_crawled_pair_is_read_with_its_caption(tmp_path):
    dataset = ImageTextShards(str(FIXTURE), tokenizer(tmp_path), eval_transform(32), batch_size=4, train=False)
    pairs = [dict(image_id=i, caption=c, meta=m) for batch in dataset
             for i, c, m in zip(batch["image_id"].tolist(), batch["caption"], batch["meta"])]
    assert {p["caption"] for p in pairs} == CAPTIONS and len(pairs) == 16
    assert dataset.skipped() == {"missing_caption": 1}  # img2dataset keeps a row with an empty caption
    # image_id: img2dataset's numeric key (shard + row), distinct per image; its json fields are kept as meta
    assert len({p["image_id"] for p in pairs}) == 16
    assert all(p["meta"]["status"] == "success" and min(p["meta"]["width"], p["meta"]["height"]) == 64 for p in pairs)


def test_evlp_train_reads_img2dataset_output_as_it_is(tmp_path):
    data = str(FIXTURE)
    assert main(["train", *own_data_overrides(tmp_path, data, data), "trainer.max_steps=2"]) == 0
    results = json.loads((tmp_path / "logs" / "quickstart" / "results.json").read_text())
    assert results["steps"] == 2
    assert results["skipped_samples"] == {"missing_caption": 1}  # img2dataset keeps a row with an empty caption
    assert results["protocol"]["images"] == 16 and results["protocol"]["captions"] == 16
