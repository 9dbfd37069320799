"""The quickstart generator: determinism, captions and pixels that match the metadata, idempotent preparation,
and a vocabulary that covers every caption and prompt."""

import io
import json
import os
import random
import tarfile

import numpy as np
import pytest
from transformers import AutoTokenizer

from evlp.data import synthetic
from evlp.data.synthetic import (
    COLOURS,
    COUNT_WORDS,
    DIAMETERS,
    PLURALS,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SIZE_JITTER,
    SIZE_WORDS,
    generate_sample,
    prepare_quickstart,
    zero_shot_tasks,
)


def _png(sample) -> bytes:
    return synthetic._encode_png(sample.image)


def test_samples_are_deterministic_and_order_independent():
    forward = [_png(generate_sample(i, seed=3)) for i in range(12)]
    backward = [_png(generate_sample(i, seed=3)) for i in reversed(range(12))][::-1]
    assert forward == backward
    assert generate_sample(5, seed=3).caption == generate_sample(5, seed=3).caption
    assert _png(generate_sample(5, seed=4)) != forward[5]
    assert _png(generate_sample(5, seed=3, split="val")) != forward[5]
    assert len(set(forward)) == len(forward)


def test_every_attribute_combination_fits_its_cell():
    size = 32
    third = size / 3
    for count in (1, 2, 3):
        for name, fraction in DIAMETERS.items():
            diameter = fraction * size * (1 + SIZE_JITTER)
            for cell in range(9):
                for trial in range(5):
                    centres = synthetic._place_group(random.Random(trial), count, cell, diameter, size)
                    xs, ys = [c[0] for c in centres], [c[1] for c in centres]
                    assert min(xs + ys) >= diameter / 2 - 1e-6 and max(xs + ys) <= size - diameter / 2 + 1e-6
                    row, col = divmod(cell, 3)
                    assert int(np.mean(xs) // third) == col and int(np.mean(ys) // third) == row, (count, name)


def test_captions_name_exactly_the_metadata():
    for i in range(300):
        s = generate_sample(i, image_size=32)
        m, text = s.meta, s.caption.lower()
        noun = m["shape"] if m["count"] == 1 else PLURALS[m["shape"]]
        assert f" {noun}" in f" {text}" or f"{m['shape']} shape" in text, text
        assert any(f"{w} " in f" {text}" for w in COUNT_WORDS[m["count"]]), text
        assert any(w in text.split() for w in SIZE_WORDS[m["size"]]), text
        assert m["colour"] in text.split(), text
        assert any(p in text for p in POSITION_PHRASES[m["position"]]), text
        words = set(text.replace(".", " ").split())
        assert words & set(COLOURS) == {m["colour"]}
        assert words & set(SHAPES) <= {m["shape"]}
        assert words & {w for ws in SIZE_WORDS.values() for w in ws} <= set(SIZE_WORDS[m["size"]])


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean image, as arrays of (y, x)."""
    seen = np.zeros_like(mask)
    parts = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, part = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            part.append((y, x))
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= yy < mask.shape[0] and 0 <= xx < mask.shape[1] and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        parts.append(np.array(part))
    return parts


def test_pixels_show_what_the_metadata_says():
    size, areas = 64, {(shape, s): [] for shape in SHAPES for s in DIAMETERS}
    for i in range(120):
        s = generate_sample(i, image_size=size)
        pixels = np.asarray(s.image, dtype=np.float32)
        target = np.array(COLOURS[s.meta["colour"]], dtype=np.float32)
        mask = np.abs(pixels - target).max(axis=-1) < 40  # object interiors; backgrounds are light greys
        parts = [p for p in _components(mask) if len(p) >= 3]
        assert len(parts) == s.meta["count"], (i, s.meta)
        centre = np.concatenate(parts).mean(axis=0)  # (y, x)
        assert POSITIONS[int(centre[0] // (size / 3)) * 3 + int(centre[1] // (size / 3))] == s.meta["position"]
        areas[s.meta["shape"], s.meta["size"]].append(np.mean([len(p) for p in parts]))
    for shape in SHAPES:  # the same shape is always clearly larger when "large"
        assert min(areas[shape, "large"]) > 1.5 * max(areas[shape, "small"]), shape


def test_zero_shot_tasks_label_metadata():
    tasks = {t.name: t for t in zero_shot_tasks()}
    assert set(tasks) == {"shape", "colour", "size", "count", "position"}
    meta = generate_sample(7).meta
    for task in tasks.values():
        assert len(set(task.classnames)) == len(task.classnames) == len(task.values)
        assert all(t.count("{}") == 1 for t in task.templates)
        assert task.label({}) is None
        assert task.values[task.label(meta)] == meta[task.attribute]
    assert tasks["count"].label({"count": 3}) == 2
    assert tasks["colour"].label({"colour": "magenta"}) is None


def _read_shard(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def test_prepare_writes_shards_stats_and_vocab(tmp_path):
    data = prepare_quickstart(tmp_path, num_train=25, num_val=12, image_size=32, shard_size=10, seed=1)
    assert [os.path.basename(u) for u in data.train_urls] == ["000000.tar", "000001.tar", "000002.tar"]
    assert len(data.val_urls) == 2 and (data.num_train, data.num_val) == (25, 12)
    stats = json.loads((tmp_path / "train" / "stats.json").read_text())
    assert stats["num_samples"] == 25 and stats["shards"] == {"000000.tar": 10, "000001.tar": 10, "000002.tar": 5}
    assert stats["params"]["seed"] == 1

    val = {}
    for url in data.val_urls:
        val.update(_read_shard(url))
    keys = sorted({name.split(".")[0] for name in val})
    assert len(keys) == 12
    for k in keys:  # exactly one image, one caption and the metadata per validation image
        assert {n for n in val if n.startswith(k + ".")} == {f"{k}.png", f"{k}.txt", f"{k}.json"}
        meta = json.loads(val[f"{k}.json"])
        expected = generate_sample(int(k), seed=1, split="val", image_size=32)
        assert meta == json.loads(json.dumps(expected.meta)) and isinstance(meta["image_id"], int)
        assert val[f"{k}.txt"].decode() == expected.caption
        assert val[f"{k}.png"] == _png(expected)

    tok = AutoTokenizer.from_pretrained(data.vocab_dir)
    assert tok.pad_token_id == 0 and tok.do_lower_case


def _mtimes(root):
    return {p: p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def test_prepare_is_idempotent(tmp_path):
    prepare_quickstart(tmp_path, num_train=20, num_val=5, image_size=32, shard_size=10)
    before = _mtimes(tmp_path)
    again = prepare_quickstart(tmp_path, num_train=20, num_val=5, image_size=32, shard_size=10)
    assert _mtimes(tmp_path) == before
    assert len(again.train_urls) == 2

    # Other parameters: that split is regenerated, stale shards removed.
    prepare_quickstart(tmp_path, num_train=8, num_val=5, image_size=32, shard_size=10)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["000000.tar", "stats.json"]
    assert (tmp_path / "val" / "000000.tar").stat().st_mtime_ns == before[tmp_path / "val" / "000000.tar"]


def test_interrupted_preparation_is_redone(tmp_path):
    data = prepare_quickstart(tmp_path, num_train=20, num_val=5, image_size=32, shard_size=10)
    good = {url: open(url, "rb").read() for url in data.train_urls}
    # What a crash during the second shard leaves: no stats.json, a partial temporary file, a truncated shard.
    (tmp_path / "train" / "stats.json").unlink()
    (tmp_path / "train" / "000001.tar.999.tmp").write_bytes(b"partial")
    with open(data.train_urls[1], "r+b") as f:
        f.truncate(1000)
    prepare_quickstart(tmp_path, num_train=20, num_val=5, image_size=32, shard_size=10)
    assert not list((tmp_path / "train").glob("*.tmp"))
    assert {url: open(url, "rb").read() for url in data.train_urls} == good  # byte-identical regeneration
    assert (tmp_path / "train" / "stats.json").exists()


def test_vocabulary_covers_captions_and_prompts(tmp_path):
    vocab_dir = synthetic.write_vocab(tmp_path / "vocab")
    tok = AutoTokenizer.from_pretrained(vocab_dir)
    lines = (vocab_dir / "vocab.txt").read_text().splitlines()
    assert lines[0] == "[PAD]" and len(lines) == len(set(lines)) == len(tok)
    texts = [generate_sample(i, image_size=16).caption for i in range(2000)]
    texts += [generate_sample(i, split="val", image_size=16).caption for i in range(200)]
    for task in zero_shot_tasks():
        texts += [t.format(c) for t in task.templates for c in task.classnames]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids, (text, tok.convert_ids_to_tokens(ids))
    # An unseen word is spelled out in characters rather than lost.
    assert tok.unk_token_id not in tok("a zebra")["input_ids"]


@pytest.mark.parametrize("bad", [dict(num_train=0, num_val=1), dict(num_train=1, num_val=1, image_size=8)])
def test_prepare_rejects_bad_parameters(tmp_path, bad):
    with pytest.raises(ValueError):
        prepare_quickstart(tmp_path, **bad)


def test_png_roundtrip_is_exact():
    from PIL import Image

    s = generate_sample(0, image_size=32)
    decoded = Image.open(io.BytesIO(_png(s)))
    assert np.array_equal(np.asarray(decoded), np.asarray(s.image))
