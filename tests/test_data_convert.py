"""``evlp data convert``: the user's CSV / TSV / JSONL / folder of image-text pairs -> shards the trainer reads."""

import csv
import json
from collections import Counter

import pytest

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
