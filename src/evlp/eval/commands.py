"""``evlp eval {zeroshot,retrieval}``: benchmark a checkpoint, with the protocol written beside every number.

    evlp eval zeroshot --dataset imagenet --data-path /data model.model_path=/data/models/S-SMKE/model-...ckpt
    evlp eval retrieval --dataset coco --data-path /data --checkpoint /data/models/S-SMKE/model-...ckpt
    evlp eval retrieval --dataset flickr30k model_path=.../model-...-val.ckpt model_name=S-SMKE   # original grammar

``--data-path`` defaults to the checkpoint run's ``data_path``. Results go to ``--out`` (default
``<log_dir or data_path>/eval/<checkpoint stem>/``) as ``<task>_<dataset>.json`` and ``.md``; ``--save-examples``
adds ``<task>_<dataset>_examples.png``. Everything the user can get wrong (the checkpoint's kind, a missing split file,
image or caption, a folder in another layout) is checked before the long work and reported as one ``EvlpError``.
The zero-shot classifier (1,000 classes x 80 prompts) is cached per checkpoint under
``<data_path>/.cache/evlp/zeroshot/`` (``--cache-dir``).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import os
from datetime import datetime, timezone
from pathlib import Path

import evlp
from evlp.errors import EvlpError

# The original scripts' `key=value` grammar: `model.model_path=` (fine-tuning configs), `model_path=` and
# `model_name=` (run_image_text_retrieval.py).
PATH_KEYS = ("model.model_path", "model_path")
NAME_KEYS = ("model.model_name", "model_name")
STUDENT_NAMES = ("s-smke", "s_smke", "retrieval_finetune")  # model names whose checkpoints hold an S-SMKE student

TEACHER_NOTE = ("The BEiTv2 teacher (beitv2_base_patch16_224_pt1k) and the Data2Vec2 image tower (base_imagenet) were "
                "self-supervised on ImageNet-1K training images (no labels): the images' domain is not new to the "
                "model, though no ImageNet label or class name was used.")
DATASET_NOTES = {
    "coco": "COCO is in the S-SMKE pretraining data (Karpathy train + restval, 566,747 pairs; the test images are "
            "not): COCO retrieval is in-domain, not zero-shot.",
    "flickr30k": "Flickr30K is not in the S-SMKE pretraining data (COCO, CC3M, CC12M): zero-shot for a pretrained "
                 "checkpoint.",
}
FINETUNE_NOTE = "For a checkpoint fine-tuned on this dataset the numbers are fine-tuned, not zero-shot."
DATASET_TITLES = {"imagenet": "ImageNet-1K", "coco": "COCO Karpathy", "flickr30k": "Flickr30K Karpathy"}


def checkpoint_path(args: argparse.Namespace) -> Path:
    """The checkpoint named by ``--checkpoint`` or a ``model.model_path=`` / ``model_path=`` item."""
    named = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise EvlpError(f"'{item}' is not of the form key=value (e.g. model.model_path=CKPT)")
        if key not in PATH_KEYS + NAME_KEYS:
            close = difflib.get_close_matches(key, PATH_KEYS + NAME_KEYS, n=1) or [PATH_KEYS[0]]
            raise EvlpError(f"unknown key '{key}'; evlp eval takes {', '.join(PATH_KEYS + NAME_KEYS)} "
                            f"(did you mean {close[0]}?)")
        named[key] = value
    for key in NAME_KEYS:
        if key in named and named[key].lower() not in STUDENT_NAMES:
            raise EvlpError(f"{key}={named[key]}: evlp evaluates S-SMKE students (model_name=S-SMKE); other models of "
                            f"the original have no image-text evaluation")
    paths = {p for p in [args.checkpoint, *(named.get(k) for k in PATH_KEYS)] if p}
    if not paths:
        raise EvlpError("no checkpoint: pass model.model_path=CKPT (or --checkpoint CKPT)")
    if len(paths) > 1:
        raise EvlpError(f"two different checkpoints given: {' and '.join(sorted(paths))}")
    return Path(paths.pop()).expanduser()


def _device(name: str | None):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise EvlpError("--device cuda: no CUDA device is visible")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _out_dir(args: argparse.Namespace, ckpt, data_path: Path) -> Path:
    if args.out:
        return Path(args.out)
    log_dir = Path(ckpt.cfg.log_dir)
    return (log_dir if log_dir.is_dir() else data_path) / "eval" / ckpt.path.stem


def _protocol(ckpt, checkpoint_sha256: str, tokenizer, image_size: int, device) -> dict:
    """The fields every result shares: which model, how images and text were fed, when and with what."""
    import torch

    from evlp.eval.benchmarks import precision_name

    return {
        "resolution": image_size,
        "image_transform": f"resize to {image_size}x{image_size} (bicubic, antialiased, no crop), ImageNet mean/std "
                           f"(the pretraining eval transform)",
        "text": f"{type(tokenizer.tokenizer).__name__} {tokenizer.tokenizer.name_or_path}, "
                f"[CLS] text [SEP], at most {tokenizer.max_len} tokens (the checkpoint's max_text_len)",
        "embedding": "L2-normalised CLS of the shared block's output (x)",
        "precision": precision_name(device),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "checkpoint": str(ckpt.path.resolve()),
        "checkpoint_sha256": checkpoint_sha256,
        "checkpoint_step": ckpt.step,
        "checkpoint_train_data": list(ckpt.cfg.data.train),
        "checkpoint_ignored": ckpt.ignored,
        "evlp_version": evlp.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _print_result(result: dict, paths: list[Path]) -> None:
    from evlp.eval.report import metrics_table, summary_line

    print()
    print(f"{result['title']}\n")
    print(metrics_table(result))
    print(f"\nprotocol: {summary_line(result)}")
    for path in paths:
        print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------------------------


def cmd_zeroshot(args: argparse.Namespace) -> int:
    from evlp.eval.benchmarks import (ZEROSHOT_DEFINITION, PromptTokens, build_classifier, cached_classifier,
                                      run_zeroshot)
    from evlp.eval.checkpoint import build_from_checkpoint, read_student_checkpoint
    from evlp.eval.datasets import (STANDARD_IMAGENET_VAL, file_sha256, imagenet_classnames, load_imagenet_val,
                                    openai_imagenet_templates, text_sha256)
    from evlp.eval.report import save_zeroshot_examples, write_result

    ckpt = read_student_checkpoint(checkpoint_path(args))
    data_path = Path(args.data_path or ckpt.cfg.data_path)
    data = load_imagenet_val(data_path)
    device = _device(args.device)
    classnames, templates = imagenet_classnames(), openai_imagenet_templates()
    print(f"ImageNet val: {len(data.paths):,} images in {data.root}; {len(classnames):,} classes x "
          f"{len(templates)} templates")
    checkpoint_sha256 = file_sha256(ckpt.path)
    student, tokenizer, image_size = build_from_checkpoint(ckpt, device)

    # The classifier depends on the weights, the prompts and the numerics, and on nothing else.
    protocol = _protocol(ckpt, checkpoint_sha256, tokenizer, image_size, device)
    key_text = " ".join([checkpoint_sha256, text_sha256(classnames), text_sha256(templates), protocol["precision"]])
    cache_dir = Path(args.cache_dir) if args.cache_dir else data_path / ".cache" / "evlp" / "zeroshot"
    cache_file = cache_dir / f"{hashlib.sha256(key_text.encode()).hexdigest()[:32]}.pt"
    progress = not args.no_progress
    classifier, cached = cached_classifier(cache_file, lambda: build_classifier(
        student, PromptTokens(tokenizer, classnames, templates, progress=progress), classnames, templates, device,
        progress=progress))
    if cached:
        print(f"zero-shot classifier: cached {cache_file}")
    run = run_zeroshot(student, data, classifier, image_size, device, args.batch_size, args.workers, progress)

    n, c = len(data.paths), len(classnames)
    notes = [TEACHER_NOTE]
    if n != STANDARD_IMAGENET_VAL:
        notes.append(f"This folder has {n:,} images, not the standard 50,000 of ImageNet val: the numbers are "
                     f"not comparable to published ones.")
    result = {
        "task": "zeroshot",
        "title": f"Zero-shot ImageNet-1K classification: {ckpt.path.name}",
        "metrics": run.metrics,
        "chance": {f"top{k}": 100.0 * k / c for k in (1, 5)},
        "definitions": {f"top{k}": f"% of the {n:,} val images whose label is among the {k} best of {c:,} classes "
                                   f"({len(templates)} prompts each)" for k in (1, 5)},
        "protocol": {
            "dataset": DATASET_TITLES["imagenet"], "split": "val", "image_folder": str(data.root),
            "file_list_sha256": data.list_sha256, "images": n, "standard_split": n == STANDARD_IMAGENET_VAL,
            "classes": c, "classnames": "OpenAI's ImageNet class names (as open_clip's IMAGENET_CLASSNAMES)",
            "classnames_sha256": text_sha256(classnames), "templates": len(templates),
            "templates_source": "OpenAI's 80 ImageNet prompt templates", "templates_sha256": text_sha256(templates),
            "labels": "position of the file name's synset in the sorted 1,000 ILSVRC2012 synsets",
            "classifier": ZEROSHOT_DEFINITION,
            **protocol,
        },
        "notes": notes,
    }
    out = _out_dir(args, ckpt, data_path)
    paths = list(write_result(result, out, "zeroshot_imagenet"))
    if args.save_examples:
        paths.append(save_zeroshot_examples(data, run.image_embeddings, run.classifier, classnames,
                                            out / "zeroshot_imagenet_examples.png"))
    _print_result(result, paths)
    return 0


def cmd_retrieval(args: argparse.Namespace) -> int:
    from evlp.eval.benchmarks import RECALL_DEFINITION, run_retrieval
    from evlp.eval.checkpoint import build_from_checkpoint, read_student_checkpoint
    from evlp.eval.datasets import STANDARD_TEST_SIZES, file_sha256, load_karpathy_split
    from evlp.eval.report import save_retrieval_examples, write_result

    ckpt = read_student_checkpoint(checkpoint_path(args))
    data_path = Path(args.data_path or ckpt.cfg.data_path)
    split = load_karpathy_split(args.dataset, data_path, "test")
    n, m = len(split.image_paths), len(split.captions)
    print(f"{args.dataset} Karpathy test: {n:,} images, {m:,} captions from {split.split_file}")
    device = _device(args.device)
    checkpoint_sha256 = file_sha256(ckpt.path)
    student, tokenizer, image_size = build_from_checkpoint(ckpt, device)
    run = run_retrieval(student, tokenizer, split, image_size, device, args.batch_size, args.workers,
                        progress=not args.no_progress)

    standard = (n, m) == STANDARD_TEST_SIZES[args.dataset]
    notes = [DATASET_NOTES[args.dataset], FINETUNE_NOTE]
    if not standard:
        sn, sm = STANDARD_TEST_SIZES[args.dataset]
        notes.append(f"This split has {n:,} images / {m:,} captions, not the standard Karpathy test's {sn:,} / "
                     f"{sm:,}: the numbers are not comparable to published ones.")
    definitions = {}
    for k in (1, 5, 10):
        definitions[f"TR@{k}"] = (f"image->text: % of the {n:,} images with any of their captions among the {k} "
                                  f"best-scored of {m:,} captions")
    for k in (1, 5, 10):
        definitions[f"IR@{k}"] = (f"text->image: % of the {m:,} captions whose image is among the {k} best-scored "
                                  f"of {n:,} images")
    definitions["mean_recall"] = "mean of the six recalls above (the original's average_score)"
    definitions["R@1"] = "(TR@1 + IR@1) / 2, the 'R@1' column of the seed README's results table"
    result = {
        "task": "retrieval",
        "title": f"{DATASET_TITLES[args.dataset]} test image-text retrieval: {ckpt.path.name}",
        "metrics": run.metrics,
        "chance": run.chance,
        "definitions": definitions,
        "protocol": {
            "dataset": DATASET_TITLES[args.dataset], "split": "test", "split_file": str(split.split_file),
            "split_sha256": split.split_sha256, "images": n, "captions": m, "standard_split": standard,
            "captions_source": "the 'raw' sentences of the split file, stripped",
            "recall": RECALL_DEFINITION,
            **_protocol(ckpt, checkpoint_sha256, tokenizer, image_size, device),
        },
        "notes": notes,
    }
    out = _out_dir(args, ckpt, data_path)
    paths = list(write_result(result, out, f"retrieval_{args.dataset}"))
    if args.save_examples:
        paths.append(save_retrieval_examples(split, run.image_embeddings, run.text_embeddings,
                                             out / f"retrieval_{args.dataset}_examples.png"))
    _print_result(result, paths)
    return 0


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="model.model_path=CKPT (or model_path=CKPT; model_name=S-SMKE is accepted)")
    parser.add_argument("--checkpoint", default=None, help="the .ckpt to evaluate (same as model.model_path=)")
    parser.add_argument("--data-path", default=None,
                        help="folder holding imagenet/, coco/, flickr30k/ (default: the checkpoint run's data_path)")
    parser.add_argument("--out", default=None,
                        help="results folder (default: <log_dir or data_path>/eval/<checkpoint stem>/)")
    parser.add_argument("--save-examples", action="store_true", help="also write a PNG grid of top-5 results")
    parser.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="image loading processes (default: min(8, CPUs))")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``eval {zeroshot,retrieval}`` to the ``evlp`` sub-command parsers."""
    evaluate = subparsers.add_parser("eval", help="zero-shot ImageNet-1K and COCO/Flickr30K retrieval of a checkpoint")
    tasks = evaluate.add_subparsers(dest="eval_command", required=True)

    zeroshot = tasks.add_parser("zeroshot", help="CLIP-style zero-shot classification (1,000 classes, 80 prompts)",
                                description="Top-1/top-5 zero-shot accuracy on <data_path>/imagenet/val/.")
    zeroshot.add_argument("--dataset", choices=["imagenet"], required=True)
    zeroshot.add_argument("--cache-dir", default=None,
                          help="where the classifier is cached (default: <data_path>/.cache/evlp/zeroshot)")
    _add_common(zeroshot)
    zeroshot.set_defaults(handler=cmd_zeroshot)

    retrieval = tasks.add_parser("retrieval", help="image-text retrieval recall@1/5/10 on a Karpathy test split",
                                 description="TR@1/5/10, IR@1/5/10, their mean and R@1 on the Karpathy test split.")
    retrieval.add_argument("--dataset", choices=["coco", "flickr30k"], required=True)
    _add_common(retrieval)
    retrieval.set_defaults(handler=cmd_retrieval)
    return evaluate
