"""``evlp download {weights,cc3m,cc12m,coco,flickr30k,imagenet,glue}`` and ``evlp data convert``.

``register(subparsers)`` adds both commands to the ``evlp`` parser. Handlers print one summary line per dataset (or
split) and return 0; user problems raise ``EvlpError``. Heavy imports happen inside the handlers. See docs/data.md.
"""

from __future__ import annotations

import argparse

from evlp.data.fetch import FetchOptions
from evlp.data.imaging import ImageOptions


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _rows(text: str) -> int | str:
    from evlp.data.web import ALL_ROWS

    if text == ALL_ROWS:
        return ALL_ROWS
    try:
        return _positive(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of rows or '{ALL_ROWS}', got {text!r}") from None


def _seconds(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {value}")
    return value


def _image_options(args) -> ImageOptions:
    return ImageOptions(size=args.image_size, min_size=args.min_size)


def _fetch_options(args) -> FetchOptions:
    return FetchOptions(timeout=args.timeout, retries=args.retries)


# -- handlers ------------------------------------------------------------------------------------------------------


def cmd_download_weights(args) -> int:
    from evlp.pretrained.commands import download_weights

    download_weights(args.data_path, base_url=args.base_url, convert=args.convert)
    return 0


def cmd_download_web(args) -> int:
    from evlp.data.web import download_hub, download_web

    if args.source == "hub":
        print(download_hub(args.what, args.data_path, repo=args.repo, token=args.token))
        return 0
    extra = {"index_url": args.index_url} if args.what == "cc12m" else {}
    result = download_web(
        args.what, args.data_path, index=args.index, shard_size=args.shard_size, image_options=_image_options(args),
        fetch_options=_fetch_options(args), concurrency=args.concurrency, workers=args.workers,
        max_rows=args.max_rows, **extra,
    )  # fmt: skip
    print(result.line())
    return 0


def cmd_download_captions(args) -> int:
    from evlp.data.coco import download_coco, download_flickr30k

    download = download_coco if args.what == "coco" else download_flickr30k
    results = download(args.data_path, base_url=args.base_url, shard_size=args.shard_size,
                       image_options=_image_options(args), workers=args.workers, keep_archives=args.keep_archives)
    for result in results:
        print(result.line())
    return 0


def cmd_download_imagenet(args) -> int:
    from evlp.data.imagenet import download_imagenet

    print(download_imagenet(args.data_path, token=args.token, keep_archives=args.keep_archives))
    return 0


def cmd_download_glue(args) -> int:
    from evlp.data.glue import download_glue

    for line in download_glue(args.data_path, args.task):
        print(line)
    return 0


def cmd_data_convert(args) -> int:
    from evlp.data.convert import convert

    result = convert(
        args.input, args.out, image_column=args.image_column, caption_column=args.caption_column,
        shard_size=args.shard_size, image_options=_image_options(args), fetch_options=_fetch_options(args),
        concurrency=args.concurrency, workers=args.workers, val_fraction=args.val_fraction,
    )  # fmt: skip
    print(result.line())
    return 0


# -- parsers -------------------------------------------------------------------------------------------------------


def _add_data_path(p) -> None:
    p.add_argument("--data-path", required=True, help="base_dir of the configs: everything goes under it")


def _add_image_args(p, workers_help: str) -> None:
    p.add_argument("--shard-size", type=_positive, default=1000, help="rows per shard (default 1000)")
    p.add_argument("--image-size", type=_non_negative, default=256,
                   help="shorter side of the stored JPEGs, never enlarged; 0 keeps the original size (default 256)")
    p.add_argument("--min-size", type=_positive, default=2,
                   help="skip images whose shorter side is below this (default 2: drops 1-pixel placeholders)")
    p.add_argument("--workers", type=_positive, default=None, help=workers_help)


def _add_fetch_args(p) -> None:
    p.add_argument("--concurrency", type=_positive, default=128, help="HTTP requests in flight (default 128)")
    p.add_argument("--timeout", type=_seconds, default=10.0, help="seconds per request, body included (default 10)")
    p.add_argument("--retries", type=_non_negative, default=2,
                   help="retries after timeouts, connection errors, 408/429/5xx, with exponential back-off (default 2)")


def _add_download(sub) -> None:
    download = sub.add_parser("download", help="fetch and prepare data or weights under --data-path",
                              description="Fetch and prepare data or weights under --data-path; see docs/data.md.")
    targets = download.add_subparsers(dest="what", required=True, metavar="{weights,cc3m,cc12m,coco,flickr30k,"
                                      "imagenet,glue}")
    workers_help = "threads decoding and re-encoding images (default: one per CPU)"

    p = targets.add_parser("weights", help="the Data2Vec2 and BEiTv2 checkpoints into DATA_PATH/models/")
    _add_data_path(p)
    p.add_argument("--base-url", default=None, help="mirror to fetch the files from (file names appended)")
    p.add_argument("--convert", action="store_true", help="also write safetensors copies, preferred later")
    p.set_defaults(handler=cmd_download_weights)

    for name, folder in (("cc3m", "conceptual_captions_3m"), ("cc12m", "conceptual_captions_12m")):
        p = targets.add_parser(
            name, help=f"crawl {name.upper()} into DATA_PATH/{folder}/shards/ (resumable)",
            description=f"Crawl the images of {name.upper()} from the URLs of its index into WebDataset shards in "
                        f"DATA_PATH/{folder}/shards/ (plus stats files). Rerunning resumes: finished shards are "
                        f"kept and their rows not fetched again. --source hub takes pre-crawled shards instead.",
        )  # fmt: skip
        _add_data_path(p)
        index_help = "Train-GCC-training.tsv (the 'Training split' of the official download page); later runs " \
                     "reuse the copy kept in the dataset folder" if name == "cc3m" else \
                     "a local cc12m.tsv (default: the copy in the dataset folder, else downloaded from --index-url)"
        p.add_argument("--index", default=None, help=index_help)
        if name == "cc12m":
            p.add_argument("--index-url", default=None, help="where to fetch the index from (default: "
                                                             "https://storage.googleapis.com/conceptual_12m/cc12m.tsv)")
        default_rows = "the first 3,000,000 rows, what the thesis crawled" if name == "cc12m" else "all"
        p.add_argument("--max-rows", type=_rows, default=None, metavar="N|all",
                       help=f"crawl only the first N rows of the index, rounded up to whole shards, or all of them "
                            f"(default: {default_rows}); rerun with a larger value to continue")
        p.add_argument("--source", choices=["web", "hub"], default="web",
                       help="web: crawl the URLs (default); hub: download pre-crawled shards from Hugging Face")
        p.add_argument("--repo", default=None, help=f"hub dataset for --source hub (default pixparse/{name}-wds)")
        p.add_argument("--token", default=None, help="Hugging Face token for --source hub (default: your login)")
        _add_image_args(p, workers_help)
        _add_fetch_args(p)
        p.set_defaults(handler=cmd_download_web)

    flickr_note = (" Flickr30K's images are not public: request them at https://forms.illinois.edu/sec/229675 and "
                   "unpack flickr30k-images/ into DATA_PATH/flickr30k/ first.")
    for name, what in (("coco", "COCO 2014 images"), ("flickr30k", "the Flickr30K images you placed")):
        p = targets.add_parser(
            name, help=f"{what} + the Karpathy split -> DATA_PATH/{name}/shards/{{train,val,test}}",
            description=f"Prepare {what} with the Karpathy split: raw files under DATA_PATH/{name}/ for evaluation and "
                        f"WebDataset shards (one sample per caption) in DATA_PATH/{name}/shards/{{train,val,test}}."
                        + (flickr_note if name == "flickr30k" else ""),
        )  # fmt: skip
        _add_data_path(p)
        p.add_argument("--base-url", default=None, help="mirror holding the archives (file names appended)")
        p.add_argument("--keep-archives", action="store_true", help="keep the zips after extracting them")
        _add_image_args(p, workers_help)
        p.set_defaults(handler=cmd_download_captions)

    p = targets.add_parser("imagenet", help="ImageNet-1K train/val from the hub (gated: accept its terms, log in)",
                           description="Download ImageNet-1K from https://huggingface.co/datasets/ILSVRC/imagenet-1k "
                                       "(accept the terms there, then `hf auth login`) and extract it into "
                                       "DATA_PATH/imagenet/{train,val}/.")
    _add_data_path(p)
    p.add_argument("--token", default=None, help="Hugging Face token (default: your login or HF_TOKEN)")
    p.add_argument("--keep-archives", action="store_true", help="keep the .tar.gz files after extracting them")
    p.set_defaults(handler=cmd_download_imagenet)

    from evlp.data.glue import TASKS

    p = targets.add_parser("glue", help="GLUE tasks from the hub into DATA_PATH/glue/<task>/ (needs `datasets`)")
    _add_data_path(p)
    p.add_argument("--task", action="append", choices=TASKS, default=None,
                   help="a task to fetch; repeat for several (default: all nine)")
    p.set_defaults(handler=cmd_download_glue)


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="prepare your own data")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="{convert}")
    p = commands.add_parser(
        "convert", help="your image-text pairs (CSV/TSV/JSONL or a folder of images + .txt) -> WebDataset shards",
        description="Convert image-text pairs into WebDataset shards + stats files that training reads. INPUT is a "
                    "CSV, TSV or JSON-lines file with an image column (path relative to the file, or http(s) URL) "
                    "and a caption column, or a folder of images each with a same-named .txt caption. Rerunning "
                    "resumes. Relative paths are taken from the current folder (image cells: from the table's).",
    )  # fmt: skip
    p.add_argument("input", help="a .csv, .tsv, .jsonl file or a folder")
    p.add_argument("--out", required=True, help="folder for the shards")
    p.add_argument("--val-fraction", type=_fraction, default=None,
                   help="hold out about this fraction of the pairs (e.g. 0.1): OUT/train and OUT/val, decided by the "
                        "hash of each image's bytes, so a re-conversion keeps every pair on its side")
    p.add_argument("--image-column", default=None, help="column with the image path or URL (default: the first of "
                                                        "image, image_path, filepath, path, file, filename, url, ...)")
    p.add_argument("--caption-column", default=None, help="column with the caption (default: the first of caption, "
                                                          "text, txt, title, sentence, description, alt)")
    _add_image_args(p, "threads decoding and re-encoding images (default: one per CPU)")
    _add_fetch_args(p)
    p.set_defaults(handler=cmd_data_convert)


def register(subparsers) -> None:
    """Add ``download`` (all targets, ``weights`` included) and ``data`` to the ``evlp`` sub-command parsers."""
    _add_download(subparsers)
    _add_data(subparsers)
