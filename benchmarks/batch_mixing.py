"""What the training batches of one loader worker are made of, at the thesis' source sizes, against i.i.d. sampling.

COCO (566,747 pairs), CC3M (1,516,133) and CC12M (1,181,988) as shards of 1,000 (567 + 1,516 + 1,182 shards) go
through ``ImageTextShards`` in training mode with ``training/s_smke``'s settings (8 loader workers, batches of 256, a
2,000-sample shuffle buffer) and the records of worker 0's first ``--batches`` batches are examined: nothing is
decoded (the tar reader is replaced by one that makes 1,000 tiny samples per shard), so this measures only which
pairs end up together. Per batch: COCO's share, the number of shards it came from and the share of the largest.
The i.i.d. column draws each batch's 256 pairs uniformly from all 3,264,868.

    .venv/bin/python benchmarks/batch_mixing.py                        # this checkout, data.open_shards 1 / 8 / 32
    PYTHONPATH=<older checkout>/src python benchmarks/batch_mixing.py  # code without open_shards: its default
"""

from __future__ import annotations

import argparse
import inspect
import io
import itertools
import statistics
from collections import Counter

import numpy as np
from PIL import Image

import evlp.data.shards as shards

SOURCES = {"coco": 566_747, "cc3m": 1_516_133, "cc12m": 1_181_988}
SHARD = 1000


def _tiny_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _fake_reader(jpeg: bytes):
    def tar_samples(url, on_error=None):
        for j in range(SHARD):
            yield {"__key__": f"{j:06d}", "__url__": url, "jpg": jpeg, "txt": b"a caption"}

    return tar_samples


def summarise(batches: list[list[str]]) -> dict:
    """``batches``: the shard (URL) of each pair of each batch."""
    coco = [sum(u.startswith("/coco/") for u in b) / len(b) for b in batches]
    counts = [Counter(b) for b in batches]
    return dict(coco_share=statistics.mean(coco), coco_share_sd=statistics.pstdev(coco),
                batches_over_half_coco=sum(c > 0.5 for c in coco) / len(coco),
                shards_per_batch=statistics.mean(len(c) for c in counts),
                largest_shard_share=statistics.mean(max(c.values()) / len(b) for c, b in zip(counts, batches)))


def run(urls: list[list[str]], open_shards: int | None, workers: int, batch: int, buffer: int, batches: int) -> dict:
    if open_shards is None:  # code before data.open_shards: its default, the sources' shards concatenated
        ds = shards.ImageTextShards([u for source in urls for u in source], None, None, batch, train=True, seed=42,
                                    shuffle_buffer=buffer)
    else:
        ds = shards.ImageTextShards(urls, None, None, batch, train=True, seed=42, shuffle_buffer=buffer,
                                    open_shards=open_shards)
    ds.configure(0)
    records = ds._slot_records(0, workers)  # worker 0 of `workers`, before decoding
    return summarise([[r["url"] for r in itertools.islice(records, batch)] for _ in range(batches)])


def iid(urls: list[list[str]], batch: int, batches: int, seed: int = 0) -> dict:
    flat = [u for source in urls for u in source]
    rng = np.random.default_rng(seed)
    return summarise([[flat[i] for i in rng.integers(0, len(flat), size=batch)] for _ in range(batches)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--open-shards", type=int, nargs="*", default=[1, 8, 32])
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shuffle-buffer", type=int, default=2000)
    p.add_argument("--batches", type=int, default=300)
    args = p.parse_args(argv)
    shards.tar_samples = _fake_reader(_tiny_jpeg())
    shards.shard_counts = lambda urls: [SHARD] * len(urls)
    shards.count_samples = lambda urls: SHARD * len(shards.expand_urls(urls))
    shards.expand_urls = lambda u: [x for e in ([u] if isinstance(u, str) else u)
                                    for x in ([e] if isinstance(e, str) else e)]  # no files: the names as given
    urls = [[f"/{name}/{i:06d}.tar" for i in range(round(n / SHARD))] for name, n in SOURCES.items()]
    has_open_shards = "open_shards" in inspect.signature(shards.ImageTextShards.__init__).parameters
    rows = {f"open_shards={w}": run(urls, w, args.workers, args.batch_size, args.shuffle_buffer, args.batches)
            for w in (args.open_shards if has_open_shards else [None])}
    if not has_open_shards:
        rows = {"this code's default": rows.pop("open_shards=None")}
    rows["i.i.d."] = iid(urls, args.batch_size, args.batches)
    print(f"{shards.__file__}; worker 0 of {args.workers}, batches of {args.batch_size}, shuffle buffer "
          f"{args.shuffle_buffer}, {args.batches} batches; COCO is {SOURCES['coco'] / sum(SOURCES.values()):.1%} of "
          f"the pairs")
    print("| reader | COCO share (mean) | COCO share sd | batches > half COCO | shards per batch | largest shard |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['coco_share']:.3f} | {r['coco_share_sd']:.3f} | {r['batches_over_half_coco']:.1%} | "
              f"{r['shards_per_batch']:.1f} | {r['largest_shard_share']:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
