#!/usr/bin/env bash
# The demo under DVC, grown (issue #21): a clone of this checkout builds the demo up to its features at 4
# training + 2 validation clips a class (48 classes, 20 pretraining steps), then one more training clip a
# class is added (world.train_per_class: 5) and each stage is re-run and timed; last, the grown frames and
# features are rebuilt from scratch for comparison. Run on demand: `benchmarks/bench_demo_grow.sh`
# (after `make setup`; about 2 minutes on 2 cores). Prints one line per step, in seconds.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export PATH="$repo/.venv/bin:$PATH"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/demo" && cd "$work/demo"
set_params() {
  python - "$@" <<'PY'
import sys, pathlib, yaml
p = pathlib.Path("params.yaml"); d = yaml.safe_load(p.read_text())
for item in sys.argv[1:]:
    key, value = item.split("=")
    group, name = key.split(".")
    d[group][name] = int(value)
p.write_text(yaml.safe_dump(d, sort_keys=False))
PY
}
timed() {  # label, then the command
  local label=$1; shift
  local a b; a=$(date +%s.%N); "$@" > "$work/$label.log" 2>&1; b=$(date +%s.%N)
  printf '%-28s %6.1f s   %s\n' "$label" "$(echo "$b - $a" | bc)" "$(grep -h 'added' "$work/$label.log" | tr '\n' ' ')"
}
set_params world.train_per_class=4 world.val_per_class=2 pretrain.steps=20
timed "first build (dvc repro features)" dvc repro features
set_params world.train_per_class=5
for stage in world frames pretrain features; do timed "grown: $stage" dvc repro -s "$stage"; done
rm -rf cache/frames/demo cache/features/demo
for stage in frames features; do timed "rebuilt from scratch: $stage" dvc repro -s "$stage"; done
