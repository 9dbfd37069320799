"""Hostile and careless shards against the training reader: malformed tar headers, degenerate and oversized
images, 16-bit PNGs; bad samples are skipped, counted by reason and reported by a real training run."""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from evlp.data.shards import ImageTextShards, count_samples, make_loader, tar_samples
from evlp.data.synthetic import prepare_quickstart
from evlp.data.tokenizer import TextTokenizer, load_tokenizer
from evlp.data.transforms import eval_transform, train_transform
from evlp.train.recipe import run_pretraining
from tests.test_train import tiny_cfg

# A size field (12 bytes) as an attacker writes it; each stands for the member after 3 good samples.
SIZE_FIELDS = {
    "2^70": b"\x80" + (2**70).to_bytes(11, "big"),  # GNU base-256
    "100 GB": b"\x80" + (100 * 10**9).to_bytes(11, "big"),
    "60 GB": b"%012o" % (60 * 10**9),  # 12 octal digits, no terminator
    "negative": b"\xff" * 12,  # base-256 -1: read(-1) would swallow the rest of the file
    "garbage": b"zz\xff garbage!",
}


def png(width: int, height: int, value: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def claimed_png(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` (what a decompression bomb looks like to a reader)."""
    data = bytearray(png(8, 8))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def tar_header(name: str, size_field: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    header = bytearray(info.tobuf(tarfile.USTAR_FORMAT)[:512])
    header[124:136] = size_field
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)  # a valid checksum: only the size is hostile
    return bytes(header)


def members(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """The tar members of ``(key, {ext: bytes})`` samples, without the end-of-archive blocks."""
    buffer = io.BytesIO()
    tar = tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT)
    for key, fields in samples:
        for ext, data in fields.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()[: tar.offset]


def shard_with_bad_header(path: Path, size_field: bytes, first: int = 0, good: int = 3, compress=False) -> Path:
    """``good`` samples (ids first..), then a member whose header carries ``size_field``, then more samples that
    no reader can reach."""
    body = members([(f"{i:06d}", {"png": png(16, 16), "txt": f"caption {i}".encode(),
                                  "json": json.dumps({"image_id": i}).encode()}) for i in range(first, first + good)])
    body += tar_header(f"{first + good:06d}.png", size_field) + b"\0" * 512
    body += members([(f"{first + good + 1:06d}", {"png": png(16, 16), "txt": b"unreachable"})]) + b"\0" * 1024
    path.write_bytes(gzip.compress(body) if compress else body)
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    data = prepare_quickstart(tmp_path_factory.mktemp("qs"), num_train=8, num_val=8, image_size=32, shard_size=8)
    return TextTokenizer(load_tokenizer(data.vocab_dir), max_len=16)


@pytest.mark.parametrize("compress", [False, True], ids=["tar", "tar.gz"])
@pytest.mark.parametrize("what", list(SIZE_FIELDS))
def test_a_malformed_tar_header_is_a_skipped_counted_shard(tmp_path, tokenizer, caplog, what, compress):
    url = str(shard_with_bad_header(tmp_path / ("bad.tar.gz" if compress else "bad.tar"), SIZE_FIELDS[what],
                                    compress=compress))
    with caplog.at_level(logging.WARNING, logger="evlp.data.shards"):
        samples = list(tar_samples(url))
        assert count_samples(url) in (3, 4)  # the keys before the bad member (and maybe its own)
    assert [s["__key__"] for s in samples][:3] == ["000000", "000001", "000002"] and len(samples) <= 4
    assert url in caplog.text

    ds = ImageTextShards([url], tokenizer, eval_transform(32), 2, train=False, num_samples=3)
    ds.configure(0)
    batches = list(make_loader(ds, 0))
    assert [i for b in batches for i in b["image_id"].tolist()] == [0, 1, 2]
    assert ds.skipped()["unreadable_shard"] == 1


def test_decode_limits_and_reasons_are_those_of_data_convert(tmp_path, tokenizer):
    """The loader refuses what `data convert` refuses (1-pixel placeholders, bombs, non-images), and counts why."""
    samples = {
        0: {"png": png(16, 16)},
        1: {"png": png(1, 1)},  # too_small
        2: {"png": png(300, 1)},  # too_small
        3: {"png": claimed_png(12000, 12000)},  # too_large: 144 Mpx, which Pillow only warns about
        4: {"png": claimed_png(30000, 30000)},  # too_large: Pillow's own bomb error
        5: {"png": b"<html>not found</html>"},  # not_an_image
        6: {"png": png(16, 16)[:60]},  # decode_error: the header parses, the pixels are cut
        7: {},  # missing_image
        8: {"png": png(16, 16), "txt": None},  # missing_caption
        9: {"png": png(16, 16)},
    }
    url = str(tmp_path / "000000.tar")
    with wds.TarWriter(url, encoder=False) as sink:
        for i, fields in samples.items():
            sample = {"__key__": f"{i:06d}", "txt": f"caption {i}".encode(), **fields}
            sink.write({k: v for k, v in sample.items() if v is not None})
    for train in (False, True):
        ds = ImageTextShards([url], tokenizer, train_transform(16) if train else eval_transform(16), 2,
                             train=train, num_samples=10)
        ds.configure(0)
        batches = list(make_loader(ds, 0))
        ids = {i for b in batches for i in b["image_id"].tolist()}
        assert ids == {0, 9}, train
        counts = ds.skipped()
        assert counts["too_small"] >= 2 and counts["too_large"] >= 2 and counts["not_an_image"] >= 1
        assert counts["decode_error"] >= 1 and counts["missing_image"] >= 1 and counts["missing_caption"] >= 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_counts_reach_the_main_process_from_loader_workers(tmp_path, tokenizer, num_workers):
    urls = []
    for s in range(2):
        url = str(tmp_path / f"{s:06d}.tar")
        with wds.TarWriter(url, encoder=False) as sink:
            for k in range(6):
                i = 6 * s + k
                sink.write({"__key__": f"{i:06d}", "png": png(1, 1) if k == 0 else png(16, 16),
                            "txt": f"caption {i}".encode()})
        urls.append(url)
    ds = ImageTextShards(urls, tokenizer, eval_transform(16), 2, train=False, num_samples=12)
    ds.configure(0)
    assert len([b for b in make_loader(ds, num_workers)]) == 5
    assert ds.skipped() == {"too_small": 2} and ds.num_bad == 2


def gray16_png(level: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((24, 32), level, dtype=np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_16_bit_images_keep_their_brightness(tmp_path, tokenizer):
    """A 16-bit greyscale PNG of level 128 * 257 is mid-grey (128), not almost white, as in `data convert`."""
    with Image.open(io.BytesIO(gray16_png(128 * 257))) as opened:
        assert opened.mode.startswith("I")  # what Pillow makes of it: 16-bit integer levels
    url = str(tmp_path / "000000.tar")
    with wds.TarWriter(url, encoder=False) as sink:
        for i in range(4):
            sink.write({"__key__": f"{i:06d}", "png": gray16_png(128 * 257), "txt": b"grey"})
    for transform in (train_transform(16, color_jitter=None, hflip=0, normalize=False), eval_transform(16)):
        ds = ImageTextShards([url], tokenizer, transform, 4, train=True, num_samples=4)
        ds.configure(0)
        images = next(iter(make_loader(ds, 0)))["image"]
        if images.dtype == torch.uint8:
            levels = images.float()
        else:  # normalised: undo it
            mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
            levels = (images * std[:, None, None] + mean[:, None, None]) * 255
        assert levels.mean().item() == pytest.approx(128, abs=1.5), transform


def test_a_training_run_reports_skipped_samples(tmp_path):
    """A real run over shards with a hostile header and bad images finishes and reports the totals by reason in
    its log, metrics.csv and results.json."""
    folder = tmp_path / "shards"
    folder.mkdir()
    shard_with_bad_header(folder / "000000.tar", SIZE_FIELDS["2^70"], first=0, good=12)
    with wds.TarWriter(str(folder / "000001.tar"), encoder=False) as sink:
        for i in range(100, 116):
            image = png(1, 1) if i in (100, 101) else claimed_png(12000, 12000) if i == 102 else png(32, 32)
            sink.write({"__key__": f"{i:06d}", "png": image, "txt": f"a grey square {i}".encode()})
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("evlp").addHandler(handler)
    try:
        results = run_pretraining(tiny_cfg(tmp_path, f"data.train=[{folder}]", "trainer.max_epochs=1"))
    finally:
        logging.getLogger("evlp").removeHandler(handler)
    skipped = results["skipped_samples"]
    assert skipped["unreadable_shard"] >= 1 and skipped["too_small"] >= 2 and skipped["too_large"] >= 1
    saved = json.loads((tmp_path / "logs" / "quickstart" / "results.json").read_text())
    assert saved["skipped_samples"] == skipped
    with (tmp_path / "logs" / "quickstart" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["name"].startswith("data/skipped")]
    last = {r["name"]: float(r["value"]) for r in rows}
    assert last["data/skipped_too_small"] >= 2 and last["data/skipped_unreadable_shard"] >= 1
    lines = [r.getMessage() for r in records]
    assert any("skipped" in m and "too_small" in m and "unreadable_shard" in m for m in lines), lines
    assert any(str(folder / "000000.tar") in m for m in lines), lines
