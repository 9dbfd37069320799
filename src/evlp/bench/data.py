"""``evlp bench data``: pairs/s of the training input pipeline, shards vs loose files, in one run.

Three readers of the same pre-resized JPEGs (shorter side 256, as the downloaders store them), each doing the
per-sample work of pretraining -- decode, random resized crop to 224 (scale 0.9-1, bicubic, antialiased), flip 0.5,
colour jitter (brightness, contrast, saturation 0.4; no hue, as evlp's ``data.color_jitter: 0.4``), tokenisation of
the captions with ``TextTokenizer`` (max 64 tokens, one call per batch) -- and batching:

* **evlp shards (ImageTextShards)**: ``ImageTextShards`` in training mode (tar shards, shuffle buffer, per-sample
  seeding, each image transformed by ``train_transform(224, crop_scale=(0.9, 1.0), color_jitter=0.4)`` straight
  into its row of the batch);
* **loose files, evlp transform**: a map-style dataset over the images as loose files (one file read per image, the
  same evlp transform on its bytes, the caption from a ``.txt`` next to each image), batched by a ``DataLoader``
  with shuffling and ``default_collate``: the ``ImageFolder`` layout with evlp's transform;
* **ImageFolder + stock torchvision**: what the torchvision tutorial has one write -- the same loose files opened by
  torchvision's default loader (``datasets.folder.pil_loader``: ``Image.open(...).convert("RGB")``), the stock
  ``transforms.v2`` pipeline RandomResizedCrop(224, scale=(0.9, 1.0), bicubic, antialias) -> RandomHorizontalFlip
  -> ColorJitter(0.4, 0.4, 0.4) -> ToImage -> ToDtype(float32, scale=True) -> Normalize(ImageNet mean/std) on the
  PIL image, the same tokenisation per batch, ``default_collate``.

As in ``evlp train``, the two evlp readers produce uint8 batches and leave the normalisation to the device
(``PretrainModule.on_after_batch_transfer``); ``--normalize-on-cpu`` makes them produce float32 batches normalised
in the reader instead. The stock reader always normalises on the CPU into float32 batches, as torchvision users do.

Two ceilings are timed in the same rounds, on the same images held in memory: the JPEG decode alone
(``torchvision.io.decode_jpeg``, the decoder the evlp transform uses) and decode + evlp transform without reading,
batching or tokenising.

With ``--workers 0`` (the default) everything runs in this process on one torch thread, as in a loader worker, so
the figures are pairs/s **per loader worker**; with ``--workers N`` they are the total of N worker processes (per
worker = total / N while N <= cores).
The readers alternate for ``--rounds`` rounds (noise from other load hits all three) and each round times ``--batches``
batches after ``--warmup`` untimed ones; the median over rounds is reported. Without ``--shards`` it writes
synthetic photo-like JPEG shards (smooth colour fields plus noise, ~28 KB each, close to web photos at 256 px) to a
temporary folder; with ``--shards`` the loose-file copy is made from the first samples of those shards.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.datasets.folder import pil_loader
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode, v2
from webdataset.tariterators import tarfile_samples

from evlp.data.shards import IMAGE_EXTENSIONS, TEXT_EXTENSIONS, ImageTextShards, expand_urls, make_loader
from evlp.data.tokenizer import TextTokenizer, load_tokenizer
from evlp.data.transforms import IMAGENET_MEAN, IMAGENET_STD, train_transform
from evlp.errors import EvlpError

CAPTION_WORDS = ("a photo of a small red car parked near the old stone bridge in the evening light with people "
                 "walking along the river and trees in the background").split()


def _write_synthetic_shard(path: str, indices: range, seed: int) -> None:
    """One shard of ``write_synthetic_shards``: its images depend on ``seed`` and the shard's first index only."""
    rng = np.random.default_rng([seed, indices.start])
    with wds.TarWriter(path, encoder=False) as sink:
        for i in indices:
            width = int(rng.choice([256, 341, 384]))  # square, 4:3 and 3:2 landscapes
            low = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
            field = Image.fromarray(low).resize((width, 256), Image.Resampling.BICUBIC)
            pixels = np.asarray(field, dtype=np.int16) + rng.normal(0, 10, size=(256, width, 3)).astype(np.int16)
            buffer = io.BytesIO()
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
            caption = " ".join(rng.choice(CAPTION_WORDS, size=int(rng.integers(6, 20))))
            sink.write({"__key__": f"{i:09d}", "jpg": buffer.getvalue(), "txt": caption.encode(),
                        "json": json.dumps({"image_id": i}).encode()})


def write_synthetic_shards(directory: Path, num_images: int, shard_size: int = 1000, seed: int = 0,
                           workers: int = 1) -> Path:
    """Photo-like 256-px JPEG shards (+ stats.json) in ``directory``. ``workers`` processes write shards side by
    side (~5 ms per image per process); the samples are the same whatever their number."""
    directory.mkdir(parents=True, exist_ok=True)
    shards = {f"{k:06d}.tar": range(k * shard_size, min(num_images, (k + 1) * shard_size))
              for k in range(math.ceil(num_images / shard_size))}
    jobs = [(str(directory / name), indices, seed) for name, indices in shards.items()]
    if workers > 1 and len(jobs) > 1:
        # spawn: a clean interpreter per process, whatever threads torch has started in this one
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
            for done in [pool.submit(_write_synthetic_shard, *job) for job in jobs]:
                done.result()
    else:
        for job in jobs:
            _write_synthetic_shard(*job)
    counts = {name: len(indices) for name, indices in shards.items()}
    (directory / "stats.json").write_text(json.dumps({"num_samples": num_images, "shards": counts}))
    return directory


def write_loose_files(shards: list[str], directory: Path, limit: int) -> list[tuple[str, str]]:
    """The first ``limit`` samples of ``shards`` as ``<key>.<ext>`` + ``<key>.txt`` files; returns (image, caption
    file) pairs."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for sample in tarfile_samples([dict(url=url) for url in shards]):
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        text_ext = next((e for e in TEXT_EXTENSIONS if e in sample), None)
        if image_ext is None or text_ext is None:
            continue
        stem = directory / f"{len(files):09d}"
        image, text = stem.with_suffix(f".{image_ext}"), stem.with_suffix(".txt")
        image.write_bytes(sample[image_ext])
        text.write_bytes(sample[text_ext])
        files.append((str(image), str(text)))
        if len(files) == limit:
            break
    return files


class LooseFiles(Dataset):
    """The ImageFolder-style reader: one image file and one caption file per item."""

    def __init__(self, files: list[tuple[str, str]], transform):
        self.files = files
        self.transform = transform
        self.takes_bytes = hasattr(transform, "into")  # TrainTransform decodes encoded bytes itself

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        image_path, text_path = self.files[i]
        if self.takes_bytes:
            pixels = self.transform(Path(image_path).read_bytes())
        else:
            with Image.open(image_path) as image:
                pixels = self.transform(image)
        return pixels, Path(text_path).read_text(encoding="utf-8").strip()


def stock_transform(size: int = 224) -> v2.Compose:
    """The stock torchvision v2 pipeline with the semantics of ``train_transform(size, crop_scale=(0.9, 1.0),
    color_jitter=0.4)``: PIL image in, normalised float32 (3, size, size) out."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(0.5),
        v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class StockImageFolder(Dataset):
    """The torchvision-tutorial reader: torchvision's default ``pil_loader`` and a stock transform per item."""

    def __init__(self, files: list[tuple[str, str]], transform):
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        image_path, text_path = self.files[i]
        return self.transform(pil_loader(image_path)), Path(text_path).read_text(encoding="utf-8").strip()


class _Collate:
    """Stack images and tokenise captions in the worker, as ImageTextShards does (picklable for worker processes)."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer

    def __call__(self, items):
        images, captions = zip(*items)
        text, padding_mask = self.tokenizer(list(captions))
        # default_collate stacks straight into shared memory in a worker, as the DataLoader's default does.
        return dict(image=default_collate(list(images)), text=text, padding_mask=padding_mask)


def _time_stage(images: list[bytes], work, count: int) -> float:
    """Pairs/s of ``work`` applied to the first ``count`` images (cycling), after one untimed image."""
    work(images[0])
    start = time.perf_counter()
    for i in range(count):
        work(images[i % len(images)])
    return count / (time.perf_counter() - start)


def _time(loader, warmup: int, batches: int) -> float:
    """Pairs/s over ``batches`` batches after ``warmup`` untimed ones (worker start-up included in the warm-up)."""
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    start, pairs = time.perf_counter(), 0
    for _ in range(batches):
        pairs += len(next(iterator)["image"])
    return pairs / (time.perf_counter() - start)


READERS = {"shards": "evlp shards (ImageTextShards)", "files": "loose files, evlp transform",
           "stock": "ImageFolder + stock torchvision"}


def run_data_bench(
    shards: str | None = None,
    num_images: int = 2048,
    batch_size: int = 64,
    batches: int = 12,
    warmup: int = 2,
    workers: int = 0,
    rounds: int = 3,
    tokenizer: str | None = None,
    normalize_on_cpu: bool = False,
    readers: tuple[str, ...] = tuple(READERS),
) -> dict:
    if min(num_images, batch_size, batches, rounds) < 1 or warmup < 0 or workers < 0:
        raise EvlpError("bench data needs --num-images, --batch-size, --batches, --rounds >= 1 and "
                        "--warmup, --workers >= 0")
    unknown = [name for name in readers if name not in READERS]
    if unknown or not readers:
        raise EvlpError(f"--readers {','.join(readers)}: expected one or more of {', '.join(READERS)}, "
                        "comma-separated")
    needed = batch_size * (warmup + batches)
    if num_images < needed:
        raise EvlpError(f"{warmup} + {batches} batches of {batch_size} need --num-images >= {needed}")
    load = _load()  # before we add our own: how busy the machine already was
    transform = train_transform(224, crop_scale=(0.9, 1.0), color_jitter=0.4, normalize=normalize_on_cpu)
    with tempfile.TemporaryDirectory(prefix="evlp-bench-data-") as tmp:
        tmp = Path(tmp)
        if tokenizer is None:
            from evlp.data.synthetic import write_vocab

            tokenizer_name = "quickstart vocabulary"
            text_tokenizer = TextTokenizer(load_tokenizer(write_vocab(tmp / "vocab")), max_len=64)
        else:
            tokenizer_name = tokenizer
            text_tokenizer = TextTokenizer(load_tokenizer(tokenizer), max_len=64)
        urls = expand_urls(shards) if shards else expand_urls(str(write_synthetic_shards(tmp / "shards", num_images)))
        files = write_loose_files(urls, tmp / "files", num_images)
        if len(files) < needed:
            raise EvlpError(f"the shards hold {len(files)} readable samples; {needed} are needed")
        image_bytes = statistics.mean(os.path.getsize(image) for image, _ in files)

        shard_set = ImageTextShards(urls, text_tokenizer, transform, batch_size, train=True, seed=0,
                                    num_samples=len(files))
        map_sets = {"files": LooseFiles(files, transform), "stock": StockImageFolder(files, stock_transform(224))}
        collate = _Collate(text_tokenizer)
        in_memory = [Path(image).read_bytes() for image, _ in files[:needed]]
        results = {name: [] for name in (*readers, "decode_only", "decode_transform")}
        threads = torch.get_num_threads()
        if workers == 0:
            torch.set_num_threads(1)  # what a DataLoader worker process gets: the figures are per worker
        try:
            for r in range(rounds):
                if "shards" in readers:
                    shard_set.configure(epoch=r)
                    results["shards"].append(_time(make_loader(shard_set, workers), warmup, batches))
                for name in (name for name in ("files", "stock") if name in readers):
                    torch.manual_seed(r)
                    loader = DataLoader(map_sets[name], batch_size=batch_size, shuffle=True, num_workers=workers,
                                        collate_fn=collate, drop_last=True)
                    results[name].append(_time(loader, warmup, batches))
                with torch.random.fork_rng():  # one thread, in this process: per core whatever --workers says
                    torch.set_num_threads(1)
                    count = batch_size * batches
                    results["decode_only"].append(_time_stage(in_memory, _decode, count))
                    results["decode_transform"].append(_time_stage(in_memory, transform, count))
                    torch.set_num_threads(threads if workers else 1)
        finally:
            torch.set_num_threads(threads)
    rates = {name: statistics.median(results[name]) for name in readers}
    # ratios of the medians, and the range of the per-round ratios (the readers alternate within a round)
    ratios = {}
    for other in (name for name in ("files", "stock") if name in readers and "shards" in readers):
        ratios[f"shards_over_{other}"] = rates["shards"] / rates[other]
        ratios[f"per_round_shards_over_{other}"] = _ratio_range(results["shards"], results[other])
    return dict(
        **{f"{name}_pairs_per_s": rate for name, rate in rates.items()},
        readers={name: READERS[name] for name in readers},
        ratios=ratios,
        decode_only_pairs_per_s=statistics.median(results["decode_only"]),
        decode_transform_pairs_per_s=statistics.median(results["decode_transform"]),
        rounds=results,
        workers=workers,
        image_dtype="float32" if normalize_on_cpu else "uint8",
        stock_image_dtype="float32",  # always normalised on the CPU, as torchvision users do
        per_worker={name: rate / max(workers, 1) for name, rate in rates.items()},
        batch_size=batch_size,
        batches=batches,
        warmup=warmup,
        images=len(files),
        mean_image_bytes=round(image_bytes),
        source=shards or "synthetic 256-px JPEG shards",
        tokenizer=tokenizer_name,
        machine=f"{platform.machine()}, {os.cpu_count()} logical CPUs, load average {load} at the start",
        cpu=_cpu_model(),
        date=time.strftime("%Y-%m-%d"),
    )


def _ratio_range(a: list[float], b: list[float]) -> tuple[float, float]:
    ratios = [x / y for x, y in zip(a, b)]
    return min(ratios), max(ratios)


def _decode(data: bytes) -> torch.Tensor:
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: platform.processor() in "machine" is all there is
    return platform.processor() or "unknown"


def format_data_result(r: dict) -> str:
    who = "per loader worker (in-process)" if r["workers"] == 0 else f"total of {r['workers']} workers"
    batches = {name: ("uint8, normalised on the device" if r["image_dtype"] == "uint8"
                      else "float32, normalised on the CPU") for name in ("shards", "files")}
    batches["stock"] = "float32, normalised on the CPU (always, as torchvision users do)"
    lines = [
        f"evlp bench data: {r['images']} images ({r['mean_image_bytes'] / 1000:.1f} KB mean JPEG) from {r['source']}, "
        f"batch {r['batch_size']}, {r['batches']} timed batches after {r['warmup']}, "
        f"{len(r['rounds']['decode_only'])} rounds, tokenizer {r['tokenizer']}",
        f"machine: {r['cpu']} ({r['machine']}), {r['date']}",
        f"pairs/s {who}, median over rounds:",
        *(f"  {label:<34} {r[f'{name}_pairs_per_s']:8.1f}   {batches[name]}" for name, label in r["readers"].items()),
    ]
    others = [name for name in ("files", "stock") if f"shards_over_{name}" in r["ratios"]]
    if others:
        lines.append("evlp shards / ... (ratio of medians; per-round range):")
    for name in others:
        low, high = r["ratios"][f"per_round_shards_over_{name}"]
        lines.append(f"  / {READERS[name]:<32} {r['ratios'][f'shards_over_{name}']:8.2f}   ({low:.2f}-{high:.2f})")
    lines += [
        "ceilings, one thread, images in memory:",
        f"  JPEG decode alone                  {r['decode_only_pairs_per_s']:8.1f}",
        f"  decode + evlp train transform      {r['decode_transform_pairs_per_s']:8.1f}",
    ]
    if r["workers"]:
        per_worker = (f"{READERS[name]} {rate:.1f}" for name, rate in r["per_worker"].items())
        lines.append("per worker: " + ", ".join(per_worker))
    return "\n".join(lines)


def cmd_bench_data(args) -> int:
    result = run_data_bench(args.shards, num_images=args.num_images, batch_size=args.batch_size,
                            batches=args.batches, warmup=args.warmup, workers=args.workers, rounds=args.rounds,
                            tokenizer=args.tokenizer, normalize_on_cpu=args.normalize_on_cpu,
                            readers=tuple(args.readers.split(",")))
    print(json.dumps(result, indent=2) if args.json else format_data_result(result))
    return 0


def register_data(bench_subparsers) -> None:
    """Add ``data`` to the ``evlp bench`` sub-commands."""
    p = bench_subparsers.add_parser(
        "data", help="pairs/s of the input pipeline: JPEG shards vs loose files (evlp and stock torchvision "
                     "transforms)",
        description="Pairs/s of one loader worker (or of --workers processes) reading 256-px JPEG shards with the "
                    "pretraining transforms and tokenisation, next to two map-style readers of the same images as "
                    "loose files: one with the same evlp transform, one torchvision-ImageFolder-style with the stock "
                    "torchvision v2 transforms (PIL loader, always normalised on the CPU). Synthetic shards are "
                    "generated in a temporary folder unless --shards is given.",
    )
    p.add_argument("--shards", default=None, help="shards to read (folder or brace pattern; default: synthetic ones)")
    p.add_argument("--num-images", type=int, default=2048, help="images used (default 2048)")
    p.add_argument("--batch-size", type=int, default=64, help="pairs per batch (default 64)")
    p.add_argument("--batches", type=int, default=12, help="timed batches per reader and round (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first (default 2)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0: in-process)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per reader; the median is "
                                                       "reported (default 3)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or cached hub name, e.g. bert-base-uncased "
                                                     "(default: the quickstart vocabulary, needs nothing)")
    p.add_argument("--normalize-on-cpu", action="store_true",
                   help="float32 batches normalised in the reader for the two evlp readers (default: uint8, "
                        "normalised on the device as evlp train does); the stock torchvision reader always "
                        "normalises on the CPU")
    p.add_argument("--readers", default=",".join(READERS),
                   help="which readers to time, comma-separated (default: shards,files,stock; `shards` alone times "
                        "the training reader only)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_bench_data)
