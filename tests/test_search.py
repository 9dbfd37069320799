"""evlp index / evlp search: incremental updates, model identity, faiss = matrix product, the right image first."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from evlp.api import load_model
from evlp.data.synthetic import COLOURS, generate_sample
from evlp.errors import EvlpError
from evlp.search import ImageIndex, build_index, search_text
from evlp.cli import main as evlp_main
from tests.api_support import TOY_EXPORT, toy_run  # noqa: F401  (toy_run: session fixture)
from tests.needs import need_module


class CountingModel:
    """Wraps a loaded model's ``encode_image`` to count the images it embeds."""

    def __init__(self, loaded):
        self.loaded, self.count = loaded, 0
        encode = loaded.model.encode_image

        def counted(images):
            self.count += len(images)
            return encode(images)

        loaded.model.encode_image = counted

    def embedded(self) -> int:
        count, self.count = self.count, 0
        return count


def write_image(path: Path, index: int, size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    generate_sample(index, split="val", image_size=size).image.save(path)
    return path


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    for i, name in enumerate(["a.png", "b.jpg", "trip/c.webp", "trip/deeper/d.PNG", "e.jpeg"]):
        write_image(root / name, i)
    (root / "trip" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    write_image(root / ".hidden" / "thumb.png", 9)
    return root


def test_index_is_incremental(toy_run, photos, tmp_path, capsys):
    loaded = load_model(toy_run[0])
    counter = CountingModel(loaded)
    out = tmp_path / "index.safetensors"

    stats = build_index(photos, loaded, out, progress=False)
    assert (stats.total, stats.embedded, stats.unreadable, counter.embedded()) == (5, 5, 1, 5)
    index = ImageIndex.load(out)
    assert sorted(f.path for f in index.files) == ["a.png", "b.jpg", "e.jpeg", "trip/c.webp", "trip/deeper/d.PNG"]
    assert index.root == photos.resolve() and index.embeddings.shape == (5, 32)
    assert "trip/broken.jpg" in index.unreadable

    # Nothing changed: nothing embedded, the broken file not retried.
    stats = build_index(photos, loaded, out, progress=False)
    assert (stats.embedded, stats.reused, stats.removed, counter.embedded()) == (0, 5, 0, 0)

    # One file added, one changed (new content and mtime), one deleted: two embedded, one row dropped.
    write_image(photos / "f.png", 10)
    write_image(photos / "b.jpg", 11)
    os.utime(photos / "b.jpg", ns=(1, 1))
    (photos / "trip" / "c.webp").unlink()
    stats = build_index(photos, loaded, out, progress=False)
    assert (stats.total, stats.embedded, stats.reused, stats.removed, counter.embedded()) == (5, 2, 3, 1, 2)
    index = ImageIndex.load(out)
    assert sorted(f.path for f in index.files) == ["a.png", "b.jpg", "e.jpeg", "f.png", "trip/deeper/d.PNG"]
    # Every row is the embedding of the file as it is now.
    names = [f.path for f in index.files]
    with torch.no_grad():
        fresh = loaded.model.encode_image(torch.stack([loaded.preprocess(Image.open(photos / n)) for n in names]))
    torch.testing.assert_close(index.embeddings, fresh, atol=1e-6, rtol=0)

    # The CLI reports the same counts (and takes the model from the index when --model is left out).
    assert evlp_main(["index", str(photos), "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    assert "5 images (0 embedded, 5 unchanged, 0 removed, 1 unreadable skipped)" in capsys.readouterr().out


def test_an_interrupted_run_keeps_what_it_embedded(toy_run, photos, tmp_path, monkeypatch):
    loaded = load_model(toy_run[0])
    counter = CountingModel(loaded)
    counted = loaded.model.encode_image
    monkeypatch.setattr("evlp.search.SAVE_EVERY", 2)

    def dies_on_the_third_batch(images):  # batches: a.png b.jpg | e.jpeg (trip/broken.jpg) | trip/c.webp ...
        if counter.count >= 3:
            raise KeyboardInterrupt
        return counted(images)

    loaded.model.encode_image = dies_on_the_third_batch
    out = tmp_path / "index.safetensors"
    with pytest.raises(KeyboardInterrupt):
        build_index(photos, loaded, out, batch_size=2, progress=False)
    assert len(ImageIndex.load(out)) == 3 and counter.embedded() == 3

    loaded.model.encode_image = counted
    stats = build_index(photos, loaded, out, batch_size=2, progress=False)
    assert (stats.total, stats.embedded, stats.reused, counter.embedded()) == (5, 2, 3, 2)


def test_same_weights_share_an_index_and_other_weights_rebuild_it(toy_run, photos, tmp_path, capsys):
    checkpoint = load_model(toy_run[0])
    out = tmp_path / "index.safetensors"
    build_index(photos, checkpoint, out, progress=False)

    # Its export has the same weights, hence the same fingerprint: nothing to re-embed.
    export = tmp_path / "export"
    assert evlp_main(["export", str(toy_run[0]), "--out", str(export)]) == 0
    assert build_index(photos, load_model(export), out, progress=False).embedded == 0

    # Other weights: every image is re-embedded, and the old model can no longer search the index.
    state = load_file(export / "model.safetensors")
    state["shared.fc2.bias"] += 0.01
    save_file(state, export / "model.safetensors")
    changed = load_model(export)
    stats = build_index(photos, changed, out, progress=False, log=print)
    assert (stats.embedded, stats.removed) == (5, 5)
    assert "built with another model" in capsys.readouterr().out
    with pytest.raises(EvlpError, match="built with another model"):
        search_text(ImageIndex.load(out), checkpoint, ["a red circle"])


def test_search_ranks_by_cosine_and_faiss_agrees(toy_run, photos, tmp_path, capsys, monkeypatch):
    loaded = load_model(toy_run[0])
    out = tmp_path / "index.safetensors"
    build_index(photos, loaded, out, progress=False)
    index = ImageIndex.load(out)
    query = "two small red circles at the top left"

    hits = search_text(index, loaded, [query], top=3)[0]
    token_ids, padding_mask = loaded.tokenizer([query])
    with torch.no_grad():
        scores = (index.embeddings @ loaded.model.encode_text(token_ids, padding_mask)[0]).tolist()
    expected = sorted(zip(scores, (f.path for f in index.files)), reverse=True)[:3]
    assert [p for p, _ in hits] == [p for _, p in expected]
    assert [s for _, s in hits] == pytest.approx([s for s, _ in expected], abs=1e-6)

    need_module("faiss")
    monkeypatch.setattr("evlp.search.FAISS_MIN_VECTORS", 1)
    faiss_hits = search_text(ImageIndex.load(out), loaded, [query], top=3)[0]
    assert [p for p, _ in faiss_hits] == [p for p, _ in hits]
    assert [s for _, s in faiss_hits] == pytest.approx([s for _, s in hits], abs=1e-5)

    assert evlp_main(["search", query, "--index", str(out), "--top", "3", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines] == [str(photos.resolve() / p) for p, _ in hits]


def test_search_finds_the_held_out_image_its_caption_describes(tmp_path):
    """A trained toy model (its quickstart training learnt colours) finds, for the caption of each of six held-out
    pictures of different colours, that picture first."""
    loaded = load_model(TOY_EXPORT)
    samples, start = {}, 0
    while len(samples) < len(COLOURS):
        sample = generate_sample(start, split="val", image_size=loaded.image_size)
        samples.setdefault(sample.meta["colour"], sample)
        start += 1
    root = tmp_path / "held_out"
    root.mkdir()
    for colour, sample in samples.items():
        sample.image.save(root / f"{colour}.png")
    build_index(root, loaded, tmp_path / "index.safetensors", progress=False)
    index = ImageIndex.load(tmp_path / "index.safetensors")
    hits = search_text(index, loaded, [s.caption for s in samples.values()], top=1)
    assert [h[0][0] for h in hits] == [f"{colour}.png" for colour in samples]


def test_bad_input_is_one_line(toy_run, tmp_path, capsys):
    loaded = load_model(toy_run[0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvlpError, match="no images"):
        build_index(tmp_path / "empty", loaded, tmp_path / "index.safetensors", progress=False)
    with pytest.raises(EvlpError, match="is not a folder"):
        build_index(tmp_path / "missing", loaded, tmp_path / "index.safetensors", progress=False)
    (tmp_path / "fake.safetensors").write_bytes(b"nonsense")
    with pytest.raises(EvlpError, match="not an evlp image index"):
        ImageIndex.load(tmp_path / "fake.safetensors")
    save_file({"embeddings": torch.zeros(1, 2)}, tmp_path / "plain.safetensors")
    with pytest.raises(EvlpError, match="not an evlp image index"):
        ImageIndex.load(tmp_path / "plain.safetensors")

    assert evlp_main(["search", "a dog", "--index", str(tmp_path / "none.safetensors")]) == 2
    assert evlp_main(["index", str(tmp_path / "empty"), "--out", str(tmp_path / "i.safetensors")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "does not exist" in errors[0] and "--model is required" in errors[1]
