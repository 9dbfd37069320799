"""``evlp bench eval``: how long retrieval ranking takes at COCO 5k-test size (5,000 images x 25,010 captions).

Times ``retrieval_metrics`` (the full TR/IR@1/5/10 ranking, in blocks) on random L2-normalised embeddings, so the
number is the evaluator's own cost, without any model or image decoding. Beside it, alternating run by run so that
load from other processes hits both alike, it times the score matrix alone: the same blocks' matrix products
(``ScoreBlocks``) with nothing counted, the floor any ranking of these embeddings in float32 has on the device.
``register_eval(kinds)`` adds the ``eval`` subcommand to the ``bench`` group; torch is imported only when the bench
runs, so the ``evlp`` command stays light.
"""

from __future__ import annotations

import json
import statistics
import time


def coco_like_mapping(num_images: int, num_captions: int):
    """``(num_captions,)`` image index of each caption: every image gets ``num_captions // num_images`` and the first
    ``num_captions % num_images`` one more (COCO's test split: 5 each, 10 images with 6)."""
    import torch

    per_image = torch.full((num_images,), num_captions // num_images)
    per_image[: num_captions % num_images] += 1
    return torch.repeat_interleave(torch.arange(num_images), per_image)


def run_bench(num_images: int = 5000, num_captions: int = 25010, dim: int = 768, runs: int = 5,
              device: str | None = None, chunk_size: int = 1024, seed: int = 0) -> dict:
    """Median/min/max seconds of ``retrieval_metrics`` over ``runs`` timed runs (after one untimed warm-up), and the
    median of the score matrix alone (``matmul_*``), timed in alternation with it."""
    import torch
    import torch.nn.functional as F

    from evlp.eval.retrieval import ScoreBlocks, retrieval_metrics

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(num_images, dim, generator=g), dim=-1).to(device)
    texts = F.normalize(torch.randn(num_captions, dim, generator=g), dim=-1).to(device)
    text_to_image = coco_like_mapping(num_images, num_captions).to(device)

    def rank() -> None:
        retrieval_metrics(images, texts, text_to_image, chunk_size=chunk_size)

    @torch.inference_mode()
    def matmul() -> None:
        for _ in ScoreBlocks(images, texts, text_to_image, chunk_size):
            pass

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    rank(), matmul()  # warm-up
    times, matmul_times = [], []
    for _ in range(runs):
        times.append(timed(rank))
        matmul_times.append(timed(matmul))
    gflop = 2 * num_images * num_captions * dim / 1e9  # the score matrix, which dominates
    return {
        "images": num_images, "captions": num_captions, "dim": dim, "chunk_size": chunk_size, "runs": runs,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
        "matmul_median_s": statistics.median(matmul_times), "matmul_min_s": min(matmul_times),
        "matmul_max_s": max(matmul_times),
        "gflop": gflop,
    }


def format_result(r: dict) -> str:
    return (f"retrieval ranking, {r['images']:,} images x {r['captions']:,} captions, {r['dim']}-d, "
            f"blocks of {r['chunk_size']} images, on {r['device']}"
            + (f" ({r['threads']} threads)" if r["device"] == "cpu" else "") + "\n"
            f"median {r['median_s'] * 1e3:.1f} ms over {r['runs']} runs (min {r['min_s'] * 1e3:.1f}, "
            f"max {r['max_s'] * 1e3:.1f}); score matrix {r['gflop']:.0f} GFLOP, "
            f"{r['gflop'] / r['median_s']:.0f} GFLOP/s\n"
            f"the score matrix alone (same blocks, nothing counted; runs alternating with the ranking): median "
            f"{r['matmul_median_s'] * 1e3:.1f} ms (min {r['matmul_min_s'] * 1e3:.1f}, max "
            f"{r['matmul_max_s'] * 1e3:.1f}), {r['gflop'] / r['matmul_median_s']:.0f} GFLOP/s")


def cmd_bench_eval(args) -> int:
    result = run_bench(args.images, args.captions, args.dim, args.runs, args.device, args.chunk_size)
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0


def register_eval(kinds) -> None:
    """Add ``eval`` to the ``bench`` subcommands."""
    p = kinds.add_parser(
        "eval", help="time retrieval ranking at COCO 5k-test size (random embeddings)",
        description="Times TR/IR@1/5/10 ranking (retrieval_metrics) of random L2-normalised embeddings, 5,000 images "
                    "x 25,010 captions x 768-d by default, and prints the median of a few runs.",
    )
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--captions", type=int, default=25010)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up (median reported; default 5)")
    p.add_argument("--chunk-size", type=int, default=1024,
                   help="images per block of the score matrix (x the captions of as many images)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_bench_eval)
