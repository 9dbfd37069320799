#!/usr/bin/env bash
# The wheels the lent GPU machine needs for evlp and benchmarks/gpu_check.sh, into benchmarks/gpu_wheels/ (git
# ignores it). Run it here, where PyPI is reachable, after the last change to src/evlp; then carry that folder to
# the machine, which reaches no package index (benchmarks/README.md).
#
#   benchmarks/gpu_wheels.sh            # PYTHON=python3 by default: any Python with pip, the wheels are pure Python
#
# Exactly what that machine's python3 (CPython 3.12, benchmarks/gpu_machine_packages.txt) lacks, each named, at
# the versions of constraints.txt, fetched with --no-deps for CPython 3.12 manylinux x86-64; plus a wheel of evlp
# itself and the hash of the src/evlp it was built from (evlp-source.sha256, which gpu_check.sh compares). Then it
# checks that nothing in the folder is already on the machine and that every requirement of every wheel is either
# on the machine or in the folder (machine-requirements.txt lists the former, for benchmarks/gpu_dryrun.sh), and
# prints the wheels with their sizes (the whole working tree that travels with
# a call is limited to 64 MiB; this script refuses more than 16 MiB of wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
dest=benchmarks/gpu_wheels

# Missing there, and why each is needed (its own requirements that the machine has are left out here).
needed=(
  omegaconf               # evlp: typed configs
  antlr4-python3-runtime  # omegaconf's parser (an sdist only, pure Python: built into a wheel below)
  webdataset              # evlp: shard writing and reading
  braceexpand             # webdataset's
  open_clip_torch         # the check: evlp bench train --vs open_clip
  ftfy                    # open_clip's
  wcwidth                 # ftfy's
)
pinned() {  # name==version from constraints.txt, or a clear failure
  local line
  line=$(grep -i -m1 "^$1==" constraints.txt) || { echo "gpu_wheels: $1 has no pin in constraints.txt" >&2; exit 2; }
  echo "$line"
}

tmp="$dest.partial"
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
pip=("$py" -m pip --disable-pip-version-check)
for name in "${needed[@]}"; do
  spec=$(pinned "$name")
  if [ "$name" = antlr4-python3-runtime ]; then
    "${pip[@]}" wheel --quiet --no-deps --no-binary=:all: -w "$tmp" "$spec"
  else
    "${pip[@]}" download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$tmp" "$spec"
  fi
done
"${pip[@]}" wheel --quiet --no-deps -w "$tmp" .
"$py" benchmarks/gpu_check.py source-hash > "$tmp/evlp-source.sha256"

"$py" - "$tmp" benchmarks/gpu_machine_packages.txt <<'EOF'
import re, sys, zipfile
from email.parser import Parser
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # any pip carries it
    from pip._vendor.packaging.requirements import Requirement

norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
folder, listing = Path(sys.argv[1]), Path(sys.argv[2])
machine = {norm(re.split(r"[=<>]", line)[0].strip()) for line in listing.read_text().splitlines()
           if line.strip() and not line.startswith("#")}
# The GPU machine: CPython 3.12.3, Linux x86-64; no extras.
where = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
         "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
         "platform_python_implementation": "CPython", "extra": ""}
wheels = {}
for wheel in sorted(folder.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
    wheels[norm(meta["Name"])] = (wheel, meta.get_all("Requires-Dist") or [])
problems = [f"{name} is on the GPU machine already: carrying it would shadow the machine's"
            for name in wheels if name in machine]
from_machine = {"packaging"}  # gpu_check.py's `versions` reads evlp's requirements with it
for name, (wheel, requires) in wheels.items():
    for req in map(Requirement, requires):
        if req.marker is not None and not req.marker.evaluate(where):
            continue
        if norm(req.name) in machine:
            from_machine.add(norm(req.name))
        elif norm(req.name) not in wheels:
            problems.append(f"{wheel.name} requires {req}, which is neither on the GPU machine nor in {folder}")
if problems:
    sys.exit("gpu_wheels: " + "\ngpu_wheels: ".join(problems))
# What the wheels take from the machine: benchmarks/gpu_dryrun.sh installs these to emulate it.
(folder / "machine-requirements.txt").write_text("\n".join(sorted(from_machine)) + "\n")
EOF

size=$(du -cb "$tmp"/*.whl | tail -1 | cut -f1)
if [ "$size" -gt $((16 * 1024 * 1024)) ]; then
  echo "gpu_wheels: $((size / 1024)) KiB of wheels: more than the 16 MiB this check allows itself" >&2
  exit 1
fi
rm -rf "$dest"
mv "$tmp" "$dest"
echo "$dest: every requirement is on the GPU machine or here; $((size / 1024)) KiB in all"
for wheel in "$dest"/*.whl; do
  printf '  %8s KiB  %s\n' "$(( $(stat -c %s "$wheel") / 1024 ))" "${wheel##*/}"
done
