#!/usr/bin/env bash
# The prepared device check of issue 7: the training-step benchmark at the paper's shapes on one
# H200 in bf16 (clips/s, step time, peak GPU memory, MFU), then the compiled step and the
# featurizer on the GPU. Budget: under 8 minutes; each part has its own timeout.
#
#   bash benchmarks/gpu.sh             # on the GPU machine, from the repo root
#   bash benchmarks/gpu.sh --dry-run   # anywhere: CPU, tiny shapes, one step: the same code path
#
# Installs nothing from a registry. It needs a python with torch 2.11 + torchaudio + timm (the
# repo's .venv if there is one, else python3) and imports cmkd from this checkout (PYTHONPATH).
# cmkd's other needs that a bare CUDA image lacks (gin-config, soundfile + cffi, pycparser) are
# taken from wheels in .whl/ if it holds them (installed into a temporary folder, offline); fetch
# them once where pip works with the command printed below, and carry .whl to the machine.
# Output: tables on stdout; JSON and logs under $OUT (the device tool's folder) or runs/gpu-bench/.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT="${OUT:-runs/gpu-bench}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

PY=python3
if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then PY=.venv/bin/python; fi

# cmkd's imports that the image may lack: from carried wheels, never from the network.
if ! "$PY" -c "import gin, soundfile" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    SITE="$(mktemp -d)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:$SITE"  # after the image's own packages: only fills the gaps
  else
    echo "gpu.sh: $PY cannot import gin/soundfile and there is no .whl/ to install them from. Where pip works:" >&2
    echo "  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\" >&2
    echo "    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\" >&2
    echo "    -d .whl gin-config==0.5.0 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12" >&2
    exit 2
  fi
fi
"$PY" -c "import cmkd, timm, torch, torchaudio; print('python', __import__('sys').version.split()[0], '| torch', torch.__version__, '| timm', timm.__version__, '| cuda', torch.cuda.is_available())"

if [[ $DRY == 1 ]]; then
  DEVICE=cpu; SHAPES=tiny; STEPS=1; ROUNDS=1; WORKERS=0; PEAK=(); T_STEP=300; T_COMPILE=0; T_FEAT=120
  echo "gpu.sh --dry-run: CPU, tiny shapes, 1 step x 1 round, no compiled variant (the H200 run: paper shapes, bf16)"
else
  DEVICE=cuda; SHAPES=paper; STEPS=10; ROUNDS=3; WORKERS=8; PEAK=(--peak-tflops 790);  # the issue's H200 bf16 dense figure; --measure-peak also reports MFU against the measured matmul rate
  T_STEP=270; T_COMPILE=120; T_FEAT=40  # 430 s of timeouts + start-up < 8 min
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: no CUDA device; use --dry-run')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
fi

echo "== step benchmark: $SHAPES shapes on $DEVICE, both directions, 4 variants (timeout ${T_STEP}s)"
timeout "$T_STEP" "$PY" benchmarks/step.py --device "$DEVICE" --shapes "$SHAPES" --steps "$STEPS" --rounds "$ROUNDS" \
  --workers "$WORKERS" --flops --measure-peak "${PEAK[@]}" --json >"$OUT/step.json" 2>"$OUT/step.log" \
  || { echo "step benchmark failed or timed out (exit $?); tail of $OUT/step.log:"; tail -30 "$OUT/step.log"; }
[[ -s "$OUT/step.json" ]] && "$PY" - "$OUT/step.json" <<'EOF'
import json, sys
sys.path.insert(0, "benchmarks")
from step import table
print(table(json.load(open(sys.argv[1]))))
EOF

if [[ $T_COMPILE -gt 0 ]]; then
  echo "== torch.compile (train.compile = True), CNN -> AST only (timeout ${T_COMPILE}s)"
  timeout "$T_COMPILE" "$PY" benchmarks/step.py --device "$DEVICE" --shapes "$SHAPES" --steps "$STEPS" --rounds 2 \
    --workers "$WORKERS" --directions cnn_to_ast --variants cmkd --compile --no-parity "${PEAK[@]}" \
    >"$OUT/compile.txt" 2>"$OUT/compile.log" && cat "$OUT/compile.txt" \
    || { echo "compiled run failed or timed out (exit $?); tail of $OUT/compile.log:"; tail -15 "$OUT/compile.log"; }
fi

echo "== featurizer on $DEVICE (timeout ${T_FEAT}s)"
timeout "$T_FEAT" "$PY" benchmarks/features.py --device "$DEVICE" --threads 1 --rounds 9 --batch 24 --floor \
  2>"$OUT/features.log" | tee "$OUT/features.txt" || echo "featurizer benchmark failed or timed out; see $OUT/features.log"
echo "== done; JSON and logs in $OUT"
