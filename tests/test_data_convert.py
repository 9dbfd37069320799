"""``evlp data convert``: the user's CSV / TSV / JSONL / folder of image-text pairs -> shards the trainer reads."""

import csv
import json
import tarfile
from collections import Counter

import pytest

from evlp.cli import main
from evlp.data.convert import convert
from evlp.data.fetch import FetchOptions
from evlp.data.imaging import ImageOptions
from evlp.errors import EvlpError
from tests.test_data_download import GOOD, encode, photo, read_pairs, server  # noqa: F401 (server is a fixture)

FAST = FetchOptions(timeout=1.0, retries=0)


def write_images(folder, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"img{i}.jpg" if i % 2 == 0 else f"img{i}.png"
        (folder / name).write_bytes(encode(photo(300, 280, seed=i), "JPEG" if i % 2 == 0 else "PNG"))
        names.append(name)
    return names


def test_csv_with_local_paths_and_urls(server, tmp_path):
    names = write_images(tmp_path / "pics", 3)
    table = tmp_path / "pairs.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "file_name", "Caption"])  # "Caption": column names are matched case-insensitively
        writer.writerow([0, f"pics/{names[0]}", "a photo, with a comma"])
        writer.writerow([1, f"{server.url}/img/pic.webp", "fetched over http"])
        writer.writerow([2, "pics/missing.jpg", "no such file"])
        writer.writerow([3, f"pics/{names[1]}", ""])  # no caption
        writer.writerow([4, str(tmp_path / "pics" / names[2]), "an absolute path\nover two lines"])
        writer.writerow([5, f"{server.url}/status/404", "gone"])
    with pytest.raises(EvlpError, match="which column holds the image.*pass --image-column"):
        convert(table, tmp_path / "out")
    result = convert(table, tmp_path / "out", image_column="file_name", shard_size=4, fetch_options=FAST,
                     concurrency=4, workers=1)
    assert result.succeeded == 3 and result.failed == Counter(missing_file=1, no_caption=1, http_404=1)
    pairs = read_pairs(str(tmp_path / "out"), tmp_path)
    assert [(p["image_id"], p["caption"]) for p in pairs] == [
        (0, "a photo, with a comma"), (1, "fetched over http"), (4, "an absolute path\nover two lines")]
    assert pairs[0]["meta"]["path"] == f"pics/{names[0]}" and pairs[1]["meta"]["url"].endswith("/img/pic.webp")
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["shards"] == {"000000.tar": 2, "000001.tar": 1} and stats["params"]["image"] == "file_name"

    with pytest.raises(EvlpError, match="no column 'nope'; its columns: id, file_name, Caption"):
        convert(table, tmp_path / "out2", image_column="nope")


def test_tsv_and_jsonl_use_default_columns(tmp_path):
    names = write_images(tmp_path, 2)
    (tmp_path / "pairs.tsv").write_text(f"image\tcaption\n{names[0]}\tfirst\n{names[1]}\tsecond\n")
    convert(tmp_path / "pairs.tsv", tmp_path / "tsv", workers=1)
    assert [p["caption"] for p in read_pairs(str(tmp_path / "tsv"), tmp_path)] == ["first", "second"]

    lines = [json.dumps({"url": names[1], "text": "from jsonl"}), "", json.dumps({"url": names[0], "text": "two"})]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    result = convert(tmp_path / "pairs.jsonl", tmp_path / "jsonl", workers=1, image_options=ImageOptions(size=0))
    pairs = read_pairs(str(tmp_path / "jsonl"), tmp_path)
    assert [p["caption"] for p in pairs] == ["from jsonl", "two"] and result.succeeded == 2
    assert (pairs[0]["meta"]["width"], pairs[0]["meta"]["height"]) == (300, 280)  # --image-size 0 keeps the size

    (tmp_path / "broken.jsonl").write_text('{"image": "a.jpg", "caption": "ok"}\nnot json\n')
    with pytest.raises(EvlpError, match="broken.jsonl:2: not a JSON object"):
        convert(tmp_path / "broken.jsonl", tmp_path / "broken")
    with pytest.raises(EvlpError, match="unknown table format .xlsx"):
        (tmp_path / "pairs.xlsx").write_bytes(b"")
        convert(tmp_path / "pairs.xlsx", tmp_path / "x")


def test_folder_of_images_with_txt_captions_resumes(tmp_path):
    folder = tmp_path / "mine"
    names = write_images(folder / "sub", 3) + write_images(folder, 2)
    for i, name in enumerate(names[:4]):
        parent = folder / "sub" if i < 3 else folder
        (parent / name).with_suffix(".txt").write_text(f"  caption of {name} \n")
    (folder / "notes.md").write_text("not an image")
    (folder / names[4]).with_suffix(".txt").unlink(missing_ok=True)  # the last image has no caption
    result = convert(folder, tmp_path / "out", shard_size=2, workers=1)
    assert result.succeeded == 4 and result.failed == Counter(no_caption=1)
    pairs = read_pairs(str(tmp_path / "out"), tmp_path)
    # Sorted by path inside the folder: img0.jpg, img1.png (top level) before sub/...
    assert [p["meta"]["path"] for p in pairs] == ["img0.jpg", "sub/img0.jpg", "sub/img1.png", "sub/img2.jpg"]
    assert pairs[1]["caption"] == "caption of img0.jpg"

    (tmp_path / "out" / "000001.stats.json").unlink()
    result = convert(folder, tmp_path / "out", shard_size=2, workers=1)
    assert result.attempted == 2 and result.succeeded == 2

    (folder / "sub" / "img9.jpg").write_bytes(GOOD["photo.jpg"][0])  # the folder changed: rows would shift
    with pytest.raises(EvlpError, match="rows=5.*rows=6"):
        convert(folder, tmp_path / "out", shard_size=2, workers=1)
    with pytest.raises(EvlpError, match="no images"):
        convert(tmp_path / "out", tmp_path / "elsewhere")


# -- relative paths, bad captions, what a finished shard holds, the held-out split ---------------------------------


def tar_captions(folder) -> dict[str, str]:
    """``{key: caption}`` of every shard of a folder, read straight from the tars."""
    captions = {}
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".txt"):
                    captions[member.name[: -len(".txt")]] = tar.extractfile(member).read().decode()
    return captions


def captioned(folder, names_and_captions: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, caption) in enumerate(names_and_captions.items()):
        (folder / name).write_bytes(encode(photo(40, 30, seed=100 + i), "PNG"))
        (folder / name).with_suffix(".txt").write_text(caption)


def test_relative_paths_everywhere(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    captioned(tmp_path / "data" / "photos", {"a.png": "first", "b.png": "second"})
    assert main(["data", "convert", "data/photos", "--out", "data/shards", "--workers", "1"]) == 0
    assert "2 of 2 rows" in capsys.readouterr().out
    assert sorted(tar_captions(tmp_path / "data" / "shards").values()) == ["first", "second"]
    # a table in another folder: its image cells are relative to the table's folder
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "pairs.csv").write_text("image,caption\n../data/photos/b.png,from a table\n")
    monkeypatch.chdir(tmp_path / "data")
    assert main(["data", "convert", "../lists/pairs.csv", "--out", "table-shards", "--workers", "1"]) == 0
    assert "1 of 1 rows" in capsys.readouterr().out
    assert list(tar_captions(tmp_path / "data" / "table-shards").values()) == ["from a table"]


def test_bad_captions_are_counted_by_reason_and_never_stop_a_run(tmp_path):
    folder = tmp_path / "photos"
    captioned(folder, {"a.png": "fine", "b.png": "", "c.png": "  \n", "d.png": "x", "e.png": "with a BOM"})
    (folder / "d.txt").write_bytes("caf\xe9 in latin-1".encode("latin-1"))
    (folder / "e.txt").write_bytes("\ufeffwith a BOM".encode("utf-8"))
    result = convert(folder, tmp_path / "out", workers=1)
    assert result.succeeded == 2 and result.failed == Counter(no_caption=2, bad_caption=1)
    assert sorted(tar_captions(tmp_path / "out").values()) == ["fine", "with a BOM"]

    lines = ['{"image": "photos/a.png", "caption": "ok"}', '{"image": "photos/a.png", "caption": "lone \\ud800"}',
             '{"image": "\\udc00.png", "caption": "a path no file system can name"}',
             '{"image": "photos/a.png", "caption": ""}']
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    result = convert(tmp_path / "pairs.jsonl", tmp_path / "jsonl", workers=1)
    assert result.succeeded == 1 and result.failed == Counter(bad_caption=1, invalid_row=1, no_caption=1)

    (tmp_path / "pairs.csv").write_bytes(b"\xef\xbb\xbfimage,caption\nphotos/a.png,good\nphotos/a.png,bad \xff byte\n"
                                         b"photos/\xff.png,no such file\n")
    result = convert(tmp_path / "pairs.csv", tmp_path / "csv", workers=1)
    assert result.succeeded == 1 and result.failed == Counter(bad_caption=1, missing_file=1)


def test_a_shard_is_finished_only_while_it_holds_what_its_rows_give(tmp_path, capsys):
    folder = tmp_path / "photos"
    captioned(folder, {"a.png": "one", "b.png": "two", "c.png": "three", "d.png": "four"})
    (folder / "c.txt").unlink()
    table = tmp_path / "pairs.csv"
    table.write_text("image,caption\npics/a.png,one\npics/b.png,two\n")  # the wrong folder: every row is missing
    run = ["data", "convert", str(table), "--out", str(tmp_path / "table-out"), "--workers", "1"]
    assert main(run) == 0
    assert "failed: missing_file 2" in capsys.readouterr().out
    (tmp_path / "photos").rename(tmp_path / "pics")  # fixed, same command
    assert main(run) == 0
    assert "2 of 2 rows" in capsys.readouterr().out
    assert main(run) == 0
    assert "nothing left to do; 2 pairs" in capsys.readouterr().out

    result = convert(tmp_path / "pics", tmp_path / "out", shard_size=2, workers=1)
    assert result.succeeded == 3 and result.failed == Counter(no_caption=1)
    assert convert(tmp_path / "pics", tmp_path / "out", shard_size=2, workers=1).attempted == 0
    (tmp_path / "pics" / "c.txt").write_text("three")  # the missing caption, added: only its shard is redone
    result = convert(tmp_path / "pics", tmp_path / "out", shard_size=2, workers=1)
    assert (result.attempted, result.succeeded) == (2, 2) and result.folder["num_samples"] == 4
    (tmp_path / "pics" / "a.txt").write_text("")  # a caption emptied: shard 0 now holds b only
    convert(tmp_path / "pics", tmp_path / "out", shard_size=2, workers=1)
    assert sorted(tar_captions(tmp_path / "out").values()) == ["four", "three", "two"]
    (tmp_path / "pics" / "b.txt").write_text("")  # no pair left in shard 0: its tar goes
    result = convert(tmp_path / "pics", tmp_path / "out", shard_size=2, workers=1)
    assert not (tmp_path / "out" / "000000.tar").exists() and result.folder["num_samples"] == 2


def split_sides(out) -> dict[str, str]:
    return {caption: side for side in ("train", "val") for caption in tar_captions(out / side).values()}


def test_held_out_split_by_image_content_survives_a_reconversion(tmp_path, capsys):
    folder = tmp_path / "photos"
    captioned(folder, {f"p{i:02d}.png": f"photo {i}" for i in range(40)})
    (folder / "copy.png").write_bytes((folder / "p07.png").read_bytes())  # the same image under another name
    (folder / "copy.txt").write_text("photo 7, copied")
    run = ["data", "convert", str(folder), "--out", str(tmp_path / "out"), "--val-fraction", "0.25",
           "--shard-size", "16", "--workers", "1"]
    assert main(run) == 0
    assert "folder now train " in capsys.readouterr().out
    sides = split_sides(tmp_path / "out")
    assert len(sides) == 41 and 4 <= list(sides.values()).count("val") <= 18
    assert sides["photo 7"] == sides["photo 7, copied"]
    for side in ("train", "val"):
        stats = json.loads((tmp_path / "out" / side / "stats.json").read_text())
        assert stats["params"]["val_fraction"] == 0.25 and stats["params"]["split"] == side
        assert stats["num_samples"] == list(sides.values()).count(side)
    assert main(run) == 0
    assert "nothing left to do" in capsys.readouterr().out

    # Rows shift (new photos sort first, one is removed) and the shards change size: every pair keeps its side.
    captioned(folder, {f"a{i}.png": f"new {i}" for i in range(12)})
    (folder / "p03.png").unlink()
    convert(folder, tmp_path / "again", shard_size=7, workers=1, val_fraction=0.25)
    again = split_sides(tmp_path / "again")
    assert {c: again[c] for c in sides if c != "photo 3"} == {c: s for c, s in sides.items() if c != "photo 3"}
    # a larger fraction only moves pairs from train to val
    convert(folder, tmp_path / "more", workers=1, val_fraction=0.5)
    more = split_sides(tmp_path / "more")
    assert all(more[c] == "val" for c, s in again.items() if s == "val")

    with pytest.raises(EvlpError, match="holds a split conversion"):
        convert(folder, tmp_path / "out", workers=1)
    convert(folder, tmp_path / "unsplit-first", workers=1)
    with pytest.raises(EvlpError, match="converted without --val-fraction"):
        convert(folder, tmp_path / "unsplit-first", workers=1, val_fraction=0.1)
    with pytest.raises(EvlpError, match="val_fraction=0.25.*val_fraction=0.3"):
        convert(folder, tmp_path / "out", shard_size=16, workers=1, val_fraction=0.3)
