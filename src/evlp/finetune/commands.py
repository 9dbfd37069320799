"""``evlp finetune`` and ``evlp sweep``."""

from __future__ import annotations

import os

from evlp.errors import EvlpError


def cmd_finetune(args) -> int:
    from evlp.config import config_root, load_config
    from evlp.finetune.runner import run_finetune
    from evlp.train.recipe import quiet_third_party_logs

    if not (config_root(args.config) or "").startswith("fine_tuning/"):
        raise EvlpError(f"--config {args.config}: evlp finetune takes a fine_tuning/<task> config, e.g. "
                        f"fine_tuning/mrpc, or a YAML file that extends one (`extends: fine_tuning/mrpc`); "
                        f"pretraining configs go to evlp train")
    cfg = load_config(args.config, args.overrides)
    quiet_third_party_logs()
    results = run_finetune(cfg)
    if results:
        print()
        print("\n".join(f"{k}: {v:.4g}" for k, v in sorted(results["metrics"].items())))
        print(f"\nbest checkpoint: {results['best']['checkpoint']}")
        print(f"run folder: {os.path.join(cfg.log_dir, cfg.run_name)}")
    return 0


def cmd_sweep(args) -> int:
    from evlp.finetune.sweep import run_sweep, summary_markdown
    from evlp.train.recipe import quiet_third_party_logs

    quiet_third_party_logs()
    rows, out = run_sweep(args.family, args.overrides)
    print()
    print(summary_markdown(args.family, rows))
    print(f"\nsummary: {out / 'summary.md'}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def register(subparsers) -> None:
    finetune = subparsers.add_parser("finetune", help="downstream fine-tuning (ImageNet, CIFAR, GLUE, retrieval)")
    finetune.add_argument("--config", required=True, help="fine_tuning/<task>, e.g. fine_tuning/imagenet, or a YAML "
                          "file with `extends: fine_tuning/<task>`")
    finetune.add_argument("overrides", nargs="*", metavar="key=value",
                          help="config overrides, e.g. base_dir=/data model.model_path=CKPT")
    finetune.set_defaults(handler=cmd_finetune)

    sweep = subparsers.add_parser("sweep", help="every fine-tuning task of a family, with one summary table")
    sweep.add_argument("family", choices=["glue", "retrieval", "vision"])
    sweep.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every task, e.g. "
                       "model.model_path=CKPT base_dir=/data")
    sweep.set_defaults(handler=cmd_sweep)
