#!/bin/bash
# One prepared GPU check, about 6-9 minutes on one H100. Run from anywhere:
#
#   bash benchmarks/gpu_check.sh            # figures to benchmarks/results/gpu_check/
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Steps (each with its own timeout; a failing step is recorded and the next one runs):
#   cuda        torch sees a GPU (otherwise the GPU tests below would only be skipped)
#   tests       pytest -m gpu tests/unit_tests/test_gpu_fast_path.py tests/integration_tests/test_gpu.py
#               (bf16, no host sync, fp16, K-at-once, compile, NCCL)
#   nccl_small  torchrun, 1 GPU: the digits model, 3 rounds, aggregation through a 1-rank NCCL group
#   unet_bf16   the 23.2M U-Net at batch 512 in bf16, synthetic 32x32 data, with the plain baseline
#   k_small     the digits model with 5 clients at once (compare with nccl_small)
#   k_unet      the 23.2M U-Net, batch 512, 2 clients at once (compare with unet_bf16)
#   unet_compile  as unet_bf16 with torch.compile (longest: compilation)
# Everything lands in $OUT/gpu_check.json (one object: machine, each step's status, time and
# figures); the raw per-step JSON and logs stay next to it.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
BUDGET="${GPU_CHECK_BUDGET_S:-560}"  # skip the steps that would start after this many seconds
START=$(date +%s)
STATUS="$OUT/steps.tsv"
: > "$STATUS"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

# step NAME TIMEOUT_S CMD...: runs CMD with a timeout, logs to $OUT/NAME.log, records the outcome
step() {
  local name="$1" limit="$2"
  shift 2
  local now elapsed rc t0
  now=$(date +%s)
  elapsed=$((now - START))
  if (( elapsed + 30 > BUDGET )); then
    printf '%s\tskipped\t0\ttime budget spent (%ss)\n' "$name" "$elapsed" >> "$STATUS"
    echo "== $name: skipped (time budget)" >&2
    return 0
  fi
  echo "== $name (timeout ${limit}s): $*" >&2
  t0=$(date +%s)
  set +e
  timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  set -e
  local took=$(( $(date +%s) - t0 ))
  if (( rc == 0 )); then
    printf '%s\tok\t%s\t\n' "$name" "$took" >> "$STATUS"
  elif (( rc == 124 || rc == 137 )); then
    printf '%s\ttimeout\t%s\tafter %ss\n' "$name" "$took" "$limit" >> "$STATUS"
  else
    printf '%s\tfailed\t%s\texit %s\n' "$name" "$took" "$rc" >> "$STATUS"
  fi
  tail -n 5 "$OUT/$name.log" >&2 || true
  return 0
}

BENCH=(benchmarks/round_throughput.py)
DIGITS=(--config configs/digits.toml --data.name digits --eval.enabled false --fed.local_epochs 2)
UNET=(--optim.batch_size 512 --train.precision bf16 --fed.local_epochs 2 --data.synthetic_size 5000)

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

step cuda 60 "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; \
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0), torch.cuda.nccl.version())"
step tests 300 "$PY" -m pytest tests/unit_tests/test_gpu_fast_path.py tests/integration_tests/test_gpu.py -m gpu -q -rA \
  --junitxml="$OUT/tests.xml"
step nccl_small 150 "$PY" -m torch.distributed.run --nproc_per_node=1 --master_port=29561 \
  "${BENCH[@]}" "${DIGITS[@]}" --rounds 3 --out "$OUT/nccl_small.json"
step unet_bf16 180 "$PY" "${BENCH[@]}" "${UNET[@]}" --rounds 4 --out "$OUT/unet_bf16.json"
step k_small 120 "$PY" "${BENCH[@]}" "${DIGITS[@]}" --rounds 3 --no-plain --train.clients_at_once 5 \
  --out "$OUT/k_small.json"
step k_unet 150 "$PY" "${BENCH[@]}" "${UNET[@]}" --rounds 3 --no-plain --train.clients_at_once 2 \
  --out "$OUT/k_unet.json"
step unet_compile 300 "$PY" "${BENCH[@]}" "${UNET[@]}" --rounds 4 --train.compile true \
  --out "$OUT/unet_compile.json"

# one JSON with everything (stdlib only, so it works even if torch is broken)
"$PY" - "$OUT" "$(( $(date +%s) - START ))" <<'EOF'
import json, sys, platform
from pathlib import Path
out, total = Path(sys.argv[1]), int(sys.argv[2])
steps = {}
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, took, note = (line.split("\t") + [""] * 4)[:4]
    entry = {"status": status, "seconds": int(took or 0), "note": note}
    js = out / f"{name}.json"
    if js.exists():
        r = json.loads(js.read_text())
        entry["setup"], entry["summary"] = r.get("setup"), r.get("summary")
        entry["rounds"] = [{k: v for k, v in x.items() if not k.endswith("_per_rank")} for x in r.get("rounds", [])]
        entry["machine"] = r.get("machine")
    log = out / f"{name}.log"
    if status != "ok" and log.exists():
        entry["log_tail"] = log.read_text()[-3000:]
    steps[name] = entry
ok = lambda n: steps.get(n, {}).get("status") == "ok"
def fig(n, key):
    return (steps.get(n, {}).get("summary") or {}).get(key)
derived = {}
if ok("nccl_small") and ok("k_small"):
    derived["k5_over_k1_small"] = round(fig("k_small", "fl_img_per_s_total") / fig("nccl_small", "fl_img_per_s_total"), 3)
if ok("unet_bf16") and ok("k_unet"):
    derived["k2_over_k1_unet"] = round(fig("k_unet", "fl_img_per_s_total") / fig("unet_bf16", "fl_img_per_s_total"), 3)
if ok("unet_bf16") and ok("unet_compile"):
    derived["compile_over_eager_unet"] = round(fig("unet_compile", "fl_img_per_s_total") / fig("unet_bf16", "fl_img_per_s_total"), 3)
result = {"total_seconds": total, "host": platform.node(), "steps": steps, "derived": derived}
(out / "gpu_check.json").write_text(json.dumps(result, indent=2))
print(json.dumps({k: v["status"] for k, v in steps.items()}, indent=1), json.dumps(derived))
EOF
echo "gpu_check: wrote $OUT/gpu_check.json" >&2
