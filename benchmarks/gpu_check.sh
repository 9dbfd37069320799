#!/usr/bin/env bash
# The GPU check of the training step, for docs/benchmarks.md ("GPU (H100/H200)").
#
#   benchmarks/gpu_check.sh                         # one NVIDIA GPU: ~5 minutes, well under 8
#   benchmarks/gpu_check.sh --device cpu --tiny     # the same flow on a tiny config on CPU: a flow check (~30 s)
#
# Runs `evlp bench train` (as `python -m evlp.bench train`) on the full training/s_smke architecture with random
# weights, batch 256, bf16-mixed: once eager and once with trainer.compile=true, each timed against open_clip with
# matching towers in the same process. --tiny keeps the config's fp32 (bf16 is emulated on CPUs without AVX512-BF16).
# Prints a Markdown section (card, date, torch, commands, table) and writes it to $OUT/gpu_check.md when OUT is set;
# a run that fails is reported as failed and the other still makes the table. Installs nothing beyond the project's
# own set-up (.venv, as ./dev makes it).
set -euo pipefail
cd "$(dirname "$0")/.."
invocation="benchmarks/gpu_check.sh${*:+ $*}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

device=cuda tiny=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --tiny) tiny=1; shift ;;
    *) echo "usage: benchmarks/gpu_check.sh [--device cuda|cpu] [--tiny]" >&2; exit 2 ;;
  esac
done

if [ ! -x .venv/bin/python ]; then  # the same install line as ./dev test
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
fi
PY=.venv/bin/python

if [ "$tiny" = 1 ]; then
  config=quickstart
  overrides=(model.depth=1 model.teacher.depth=1 loss.memory_bank_size=256)
  # aot_eager: Dynamo capture + AOTAutograd without code generation (inductor takes minutes on a small CPU).
  run=(--batch-size 8 --steps 2 --warmup 1 --compile-backend aot_eager)
else
  config=training/s_smke
  overrides=()
  run=(--batch-size 256 --steps 20 --warmup 5)
fi
if [ "$device" = cuda ]; then
  overrides+=(trainer.precision=bf16-mixed)  # what `auto` picks on GPU, spelled out
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bench_args() {  # all key=value overrides must stay together, right after --config
  echo "--config $config ${overrides[*]}${*:+ $*} ${run[*]} --device $device --vs open_clip --json"
}
commands=() results=() failed=()
for mode in eager compiled; do
  if [ "$mode" = compiled ]; then args=$(bench_args trainer.compile=true); else args=$(bench_args); fi
  commands+=("evlp bench train $args")
  echo "== $mode: evlp bench train $args" >&2
  start=$SECONDS
  # shellcheck disable=SC2086  # the arguments are plain words
  if "$PY" -m evlp.bench train $args > "$tmp/$mode.json"; then
    results+=("$tmp/$mode.json")
  else
    failed+=("$mode")
  fi
  echo "== $mode: $((SECONDS - start)) s" >&2
done
if [ ${#results[@]} -eq 0 ]; then
  echo "gpu_check: every run failed (see above)" >&2
  exit 1
fi

read -r card torch_version < <("$PY" -c \
  'import json,sys; r=json.load(open(sys.argv[1])); print(r["device"].replace(" ", "_"), r["torch"])' "${results[0]}")
report="$tmp/gpu_check.md"
{
  echo "### ${card//_/ }, $(date -u +%Y-%m-%d)"
  echo
  echo "torch $torch_version; produced by \`$invocation\`, which ran:"
  echo
  for c in "${commands[@]}"; do echo "    $c"; done
  echo
  "$PY" -m evlp.bench.report "${results[@]}"
  for mode in ${failed[@]+"${failed[@]}"}; do echo; echo "The $mode run failed; its error is in the script's stderr."; done
} > "$report"
cat "$report"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$report" "$OUT/gpu_check.md"
fi
