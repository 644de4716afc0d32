#!/usr/bin/env bash
# The device run: one prepared script for a lent H100/H200 (16 cores, no internet), within 8 minutes in all.
# Runs from the repository root with a CUDA torch in $PYTHON (default: .venv/bin/python if its torch has CUDA, else the
# machine's python3); wheels in .device-wheels/ (carried: the machine has no internet) are installed into it first.
# Writes to $OUT:
#   gpu_train.json, gpu_train.log    bench/gpu_train.py: production vs TRL defaults vs TRL tuned, full rows
#   bench_export.json, bench_export.log   bench/bench_export.py: the full-shape export, ours vs the plain route
#   table.txt                        the table printed at the end, naming the card (nvidia-smi)
# Budgets are explicit: each stage runs under `timeout`; a stage that runs out is reported as such (rc 124), its
# partial log kept. docs/gpu-box.md, "The device run", has the tool call. Nothing is downloaded: the models are
# built from the repository (seeded random weights, the tiny model's tokenizer).
set -uo pipefail

if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    if .venv/bin/python -c 'import torch, sys; sys.exit(torch.version.cuda is None)' 2>/dev/null; then PYTHON=.venv/bin/python; fi
fi
OUT=${OUT:-$(mktemp -d)}
WHEELS_BUDGET_S=${WHEELS_BUDGET_S:-30}             # pip install of .device-wheels/, if carried
TRAIN_BUDGET_S=${TRAIN_BUDGET_S:-180}              # gpu_train.py, whole
EXPORT_BUDGET_S=${EXPORT_BUDGET_S:-240}            # bench_export.py, whole (the 2.6B model built, trained, exported)
mkdir -p "$OUT"

if compgen -G ".device-wheels/*.whl" >/dev/null; then
    timeout "$WHEELS_BUDGET_S" "$PYTHON" -m pip install --quiet --no-index --no-deps .device-wheels/*.whl \
        >"$OUT/wheels.log" 2>&1 || { echo "error: installing .device-wheels failed (see wheels.log)" >&2; exit 2; }
fi
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: $PYTHON has no usable CUDA torch (card: ${card:-none seen by nvidia-smi}); carry its wheels in .device-wheels/ or set PYTHON" >&2
    exit 2
fi

own_work=${WORK:+no}
WORK=${WORK:-$(mktemp -d /tmp/device-run.XXXXXX)}  # local disk: the export writes ~35 GB
export HF_HUB_OFFLINE=1 GEMMA_LORA_BENCH_CACHE="$WORK/cache"  # the bench model, built here

stage() {  # name, budget, command...: runs it under timeout, its output to $OUT/<name>.log; prints rc and seconds
    local name=$1 budget=$2 start rc
    shift 2
    start=$(date +%s)
    timeout --signal=TERM --kill-after=5 "$budget" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "$name $rc $(($(date +%s) - start))"
}

# Training: 3 variants on full rows, 2 warm-up + 5 timed steps each; no variant starts after 150 s, none runs 85 s.
train=$(stage gpu_train "$TRAIN_BUDGET_S" "$PYTHON" bench/gpu_train.py \
    --variants production@full,trl@full,trl-tuned@full --steps 5 --warmup 2 \
    --budget-s 150 --variant-timeout-s 85 --workdir "$WORK/train")
cp "$WORK/train/results.json" "$OUT/gpu_train.json" 2>/dev/null

# Export: ours (verification included, the reference on the GPU: verify.device auto) against the plain route.
export_=$(stage bench_export "$EXPORT_BUDGET_S" "$PYTHON" bench/bench_export.py \
    --workdir "$WORK/export" --out "$OUT/bench_export.json")

"$PYTHON" - "$card" "$OUT" "$train" "$export_" <<'PY' | tee "$OUT/table.txt"
import json, sys
from pathlib import Path

card, out, *stages = sys.argv[1:]
print(f"card: {card or 'unknown'}")
print("| stage | exit | seconds | result |")
print("|---|---|---|---|")
for line in stages:
    name, rc, seconds = line.split()
    status = "ok" if rc == "0" else "timed out" if rc in ("124", "137") else f"failed ({rc})"
    path = Path(out) / f"{name}.json"
    result = "-"
    if path.is_file():
        data = json.loads(path.read_text())
        if name == "gpu_train":
            result = ", ".join(
                f"{r['variant']} {r['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in r else f"{r.get('variant')} -"
                for r in data.get("rows", [])
            )
        else:
            result = f"{path.name} ({', '.join(sorted(data)[:6])})"
    print(f"| {name} | {status} | {seconds} | {result} |")
PY
[ "$own_work" = no ] || rm -rf "$WORK"  # only the folder made here
