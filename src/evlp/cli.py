"""The ``evlp`` command. Every user error becomes one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys

from evlp.errors import EvlpError


def one_line(message: str) -> str:
    """``message`` with every control character (newline, ANSI escape, ...) written as an escape: an error quotes
    file names, keys and values from the user or from files, and none of them may break the line or drive the
    terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="packaged config name, e.g. training/s_smke (default: "
                        "quickstart), or a YAML file of your own (my.yaml; `extends: training/s_smke` in it starts "
                        "from a packaged config)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. base_dir=/data")


def _pretraining_config(args):
    """The config of ``evlp train`` / ``evlp info``: a pretraining one (a fine-tuning config has another schema and
    command)."""
    from evlp.config import config_root, load_config

    if (config_root(args.config) or "").startswith("fine_tuning/"):
        raise EvlpError(f"--config {args.config} is a fine-tuning config: run `evlp finetune --config {args.config} "
                        f"model.model_path=CHECKPOINT ...`")
    return load_config(args.config, args.overrides)


def cmd_train(args) -> int:
    from evlp.train.recipe import quiet_third_party_logs, run_pretraining
    from evlp.train.report import results_table

    cfg = _pretraining_config(args)
    quiet_third_party_logs()
    results = run_pretraining(cfg)
    if results:
        print()
        print(results_table(results))
        print(f"\nrun folder: {os.path.join(cfg.log_dir, cfg.run_name)}")
    return 0


def cmd_info(args) -> int:
    from evlp.info import data_tokenizer, describe, format_info, info_json

    cfg = _pretraining_config(args)
    info = describe(cfg, tokenizer=data_tokenizer(cfg))
    print(info_json(info) if args.json else format_info(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evlp", description="Efficient vision-language pretraining (S-SMKE).")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="pretrain (no config: the embedded quickstart on CPU)")
    _add_config_args(train)
    train.set_defaults(handler=cmd_train)

    info = sub.add_parser("info", help="architecture and parameter counts, without loading weights")
    _add_config_args(info)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(handler=cmd_info)

    from evlp.data.commands import register as register_data

    register_data(sub)  # download {weights,cc3m,cc12m,coco,flickr30k,imagenet,glue}, data convert
    from evlp.pretrained.commands import register as register_weights

    register_weights(sub)
    from evlp.api_commands import register as register_api

    register_api(sub)  # export, index, search, serve
    from evlp.eval.commands import register as register_eval

    register_eval(sub)  # eval {zeroshot,retrieval}
    from evlp.finetune.commands import register as register_finetune

    register_finetune(sub)  # finetune, sweep {glue,retrieval,vision}
    from evlp.bench.commands import register as register_bench

    register_bench(sub)  # bench {train,max-batch,data,eval}
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except EvlpError as e:
        print(f"evlp: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evlp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
