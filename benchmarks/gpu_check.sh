#!/usr/bin/env bash
# The GPU check of docs/benchmarks.md ("GPU (H100/H200)"): what it measures is in benchmarks/gpu_check.py, how to
# run it on a lent GPU machine that reaches no package index in benchmarks/README.md.
#
#   benchmarks/gpu_check.sh                          # GPU machine: its python3 + the carried wheels, ~6 minutes
#   benchmarks/gpu_check.sh --device cpu --tiny      # the same, at toy size on a CPU (~70 s on 2 cores)
#   benchmarks/gpu_check.sh --python .venv/bin/python --device cpu --tiny    # an environment that has evlp
#
# --python PY: the interpreter (default: $EVLP_PYTHON, else python3). --wheels DIR: the wheel folder to install
# (default: benchmarks/gpu_wheels, made by benchmarks/gpu_wheels.sh, unless --python or EVLP_PYTHON names an
# interpreter, which is then used as it is). The wheels -- what the GPU machine's python3 lacks, and evlp itself --
# go with `pip install --no-index --no-deps --target` into a temporary folder put first on PYTHONPATH: nothing is
# fetched, no venv is made, and the interpreter's own packages (its torch above all) are the ones used. If the
# evlp wheel was built from other sources than this checkout's src/evlp, src/evlp is used, and the report says so.
# --device, --tiny, --budget, --parts, --out: as `benchmarks/gpu_check.py run` (the report goes to $OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
invocation="benchmarks/gpu_check.sh${*:+ $*}"
usage="usage: benchmarks/gpu_check.sh [--device cuda|cpu] [--tiny] [--python PY] [--wheels DIR] [--budget S] \
[--parts P,...] [--out DIR]"

py=${EVLP_PYTHON:-} wheels=default check_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --python|--wheels|--device|--budget|--parts|--out)
      [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; } ;;&
    --python) py="$2"; shift 2 ;;
    --wheels) wheels="$2"; shift 2 ;;
    --device|--budget|--parts|--out) check_args+=("$1" "$2"); shift 2 ;;
    --tiny) check_args+=("$1"); shift ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
if [ "$wheels" = default ]; then
  if [ -z "$py" ]; then wheels=benchmarks/gpu_wheels; else wheels=; fi
fi
py=${py:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

site=$(mktemp -d -t evlp-gpu-site-XXXXXX)
trap 'rm -rf "$site"' EXIT
if [ -n "$wheels" ]; then
  shopt -s nullglob
  found=("$wheels"/*.whl)
  shopt -u nullglob
  if [ ${#found[@]} -eq 0 ]; then
    echo "gpu_check: no wheels in $wheels: run benchmarks/gpu_wheels.sh where PyPI is reachable and carry that" \
         "folder to the GPU machine (benchmarks/README.md)" >&2
    exit 2
  fi
  "$py" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$site" "${found[@]}"
  echo "gpu_check: installed into $site with --no-index --no-deps: ${found[*]##*/}" >&2
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  if [ "$(cat "$wheels/evlp-source.sha256" 2>/dev/null || true)" != "$("$py" benchmarks/gpu_check.py source-hash)" ]
  then
    echo "gpu_check: the evlp wheel in $wheels was built from other sources than src/evlp here (rerun" \
         "benchmarks/gpu_wheels.sh); running src/evlp instead" >&2
    export PYTHONPATH="$PWD/src:$PYTHONPATH"
  fi
fi
status=0
"$py" benchmarks/gpu_check.py run --invocation "$invocation" ${check_args[@]+"${check_args[@]}"} || status=$?
exit "$status"
