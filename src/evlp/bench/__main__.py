"""``python -m evlp.bench train ...`` runs ``evlp bench train ...`` (used by benchmarks/gpu_check.sh)."""

import argparse
import os
import sys

from evlp.bench.commands import register
from evlp.errors import EvlpError


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(prog="evlp")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.handler(args)
    except EvlpError as e:
        print(f"evlp: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
