#!/usr/bin/env bash
# Proof here that benchmarks/gpu_check.sh will run on the lent GPU machine, whose python3 has torch and friends but
# no omegaconf, webdataset or open_clip, and which reaches no package index (benchmarks/README.md):
#
#   benchmarks/gpu_wheels.sh && benchmarks/gpu_dryrun.sh [FOLDER]       # FOLDER: ~/.cache/evlp-gpu-dryrun
#
# 1. FOLDER/python3.12, a venv standing in for the machine's python3: CPython 3.12 ($PYTHON312, else python3.12 on
#    PATH, else pyenv's 3.12) with the machine's packages that the wheels need (gpu_wheels/machine-requirements.txt)
#    at the machine's versions where benchmarks/gpu_machine_packages.txt gives them (torch 2.11.0, torchvision
#    0.26.0, transformers 5.17.0, lightning 2.6.6, ...), from PyPI, once: ~5 GB, as PyPI's torch is a CUDA build
#    (it runs on the CPU). Whatever pip pulled in that the machine does not have is uninstalled again.
# 2. FOLDER/clone, a fresh clone of this repository's HEAD with benchmarks/gpu_wheels copied in; the evlp wheel must
#    have been built from the committed src/evlp.
# 3. In the clone, with a clean environment (no PYTHONPATH, no pip configuration), no network (a network namespace
#    of its own, loopback only, where `unshare` is allowed) and the venv first on PATH, so that `python3` is that
#    venv's: `benchmarks/gpu_check.sh --device cpu --tiny`, the machine's command but for the device and the sizes.
#    The report goes to FOLDER/out.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
folder=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/evlp-gpu-dryrun}
wheels=$repo/benchmarks/gpu_wheels
machine=$repo/benchmarks/gpu_machine_packages.txt
if [ ! -f "$wheels/machine-requirements.txt" ]; then
  echo "gpu_dryrun: no wheel folder: run benchmarks/gpu_wheels.sh first" >&2
  exit 2
fi
py312=${PYTHON312:-}
if [ -z "$py312" ]; then
  for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      py312=$candidate
      break
    fi
  done
fi
if [ -z "$py312" ]; then
  echo "gpu_dryrun: no CPython 3.12 found (python3.12 on PATH or pyenv's); name one with PYTHON312=..." >&2
  exit 2
fi
mkdir -p "$folder"
folder=$(cd "$folder" && pwd)

venv=$folder/python3.12
pins=$folder/machine-pins.txt
grep '==' "$machine" > "$pins"
wanted=$(cat "$pins" "$wheels/machine-requirements.txt" | sha256sum | cut -c1-16)
if [ "$(cat "$venv/.evlp-dryrun" 2>/dev/null || true)" != "$wanted" ]; then
  echo "gpu_dryrun: building $venv (the GPU machine's python3, emulated; a few minutes, ~5 GB)" >&2
  rm -rf "$venv"
  "$py312" -m venv "$venv"
  # shellcheck disable=SC2046  # one requirement name per line
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir -c "$pins" \
    $(cat "$wheels/machine-requirements.txt")
  extra=$("$venv/bin/python" - "$machine" <<'EOF'
import importlib.metadata as md, re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
machine = {norm(re.split(r"[=<>]", line)[0].strip()) for line in open(sys.argv[1]).read().splitlines()
           if line.strip() and not line.startswith("#")}
print(" ".join(sorted({norm(d.metadata["Name"]) for d in md.distributions()} - machine)))
EOF
  )
  if [ -n "$extra" ]; then
    echo "gpu_dryrun: not on the GPU machine, so uninstalled again: $extra" >&2
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip uninstall --quiet --disable-pip-version-check -y $extra
  fi
  echo "$wanted" > "$venv/.evlp-dryrun"
fi

clone=$folder/clone out=$folder/out
rm -rf "$clone" "$out"
git clone --quiet "$repo" "$clone"
cp -r "$wheels" "$clone/benchmarks/gpu_wheels"
cd "$clone"
if [ "$(cat benchmarks/gpu_wheels/evlp-source.sha256)" != "$("$venv/bin/python" benchmarks/gpu_check.py source-hash)" ]
then
  echo "gpu_dryrun: the evlp wheel was not built from the committed src/evlp; commit, rerun benchmarks/gpu_wheels.sh," \
       "then this" >&2
  exit 2
fi
isolate=()
if unshare -n true 2>/dev/null; then
  isolate=(unshare -n)
else
  echo "gpu_dryrun: unshare -n is not allowed here: the network stays reachable (pip still runs with --no-index)" >&2
fi
echo "gpu_dryrun: $(git log --oneline -1); python3 = $venv/bin/python3 ($("$venv/bin/python3" --version))" >&2
env -i HOME="$HOME" LANG=C.UTF-8 PATH="$venv/bin:/usr/sbin:/usr/bin:/sbin:/bin" PIP_CONFIG_FILE=/dev/null OUT="$out" \
  ${isolate[@]+"${isolate[@]}"} bash -c '{ ip link set lo up 2>/dev/null || true; }
                                          benchmarks/gpu_check.sh --device cpu --tiny'
echo "gpu_dryrun: passed; the report is $out/gpu_check.md" >&2
