"""The ``evlp bench`` command group. ``register(subparsers)`` adds ``bench`` and its subcommands (``train``,
``max-batch``; others plug in beside them with their own ``_add_<name>(kinds)``). Heavy imports happen inside the
handlers."""

from __future__ import annotations

import argparse
import json


def cmd_bench_train(args) -> int:
    from evlp.bench.report import format_result
    from evlp.bench.train import run_bench
    from evlp.config import load_config

    cfg = load_config(args.config, args.overrides)
    result = run_bench(cfg, args.config or "quickstart", batch_size=args.batch_size, steps=args.steps,
                       warmup=args.warmup, device=args.device, vs=args.vs, compile_backend=args.compile_backend)
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0


def _add_train(kinds) -> None:
    p = kinds.add_parser(
        "train", help="time full training steps (teacher, student fwd+bwd, losses, AdamW) on synthetic inputs",
        description="Times full training steps of the config's architecture (random weights, synthetic batch) and "
                    "reports pairs/s, analytic GFLOPs per pair, achieved FLOP/s, MFU on known GPUs and peak memory. "
                    "Switches come from the config: trainer.precision, trainer.compile, trainer.grad_checkpointing.",
    )
    p.add_argument("--config", default=None, help="packaged config name, e.g. training/s_smke (default: quickstart)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. trainer.compile=true")
    p.add_argument("--steps", type=int, default=20, help="timed steps per model (median reported; default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first, compilation included (default 5)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per step (default: data.batch_size)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--vs", choices=["open_clip"], default=None,
                   help="also time open_clip with matching towers, alternating with evlp in this process")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend when trainer.compile=true (aot_eager: a quick capture check)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_bench_train)


def cmd_bench_max_batch(args) -> int:
    from evlp.bench.report import format_max_batch
    from evlp.bench.train import run_max_batch
    from evlp.config import load_config

    cfg = load_config(args.config, args.overrides)
    result = run_max_batch(cfg, args.config or "quickstart", start=args.start, limit=args.limit,
                           multiple=args.multiple, time_limit=args.time_limit, steps=args.steps, device=args.device,
                           compile_backend=args.compile_backend)
    print(json.dumps(result, indent=2) if args.json else format_max_batch(result))
    return 0


def _add_max_batch(kinds) -> None:
    p = kinds.add_parser(
        "max-batch", help="the largest batch of the training step that fits in GPU memory",
        description="Builds the config's training step once (random weights) and runs full steps on synthetic "
                    "batches of growing size: doubling from --start until one runs out of memory, then bisection "
                    "to a multiple of --multiple, within --time-limit. Reports each probe's peak memory.",
    )
    p.add_argument("--config", default=None, help="packaged config name, e.g. training/s_smke (default: quickstart)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. trainer.grad_checkpointing=true")
    p.add_argument("--start", type=int, default=256, help="first batch size tried (default 256)")
    p.add_argument("--limit", type=int, default=None, help="largest batch size tried (required on CPU)")
    p.add_argument("--multiple", type=int, default=32, help="answer to this multiple (default 32)")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds after which no probe starts (default 60)")
    p.add_argument("--steps", type=int, default=2, help="steps per probe (default 2: the first creates AdamW's state)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend when trainer.compile=true")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_bench_max_batch)


def register(subparsers) -> argparse.ArgumentParser:
    bench = subparsers.add_parser("bench", help="measure the toolkit: training step vs open_clip, largest batch, "
                                                "data pipeline, evaluation ranking")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    _add_train(kinds)
    _add_max_batch(kinds)
    from evlp.bench.data import register_data
    from evlp.bench.eval import register_eval

    register_data(kinds)
    register_eval(kinds)
    return bench
