#!/usr/bin/env bash
# GPU check: ICU training-step throughput, peak memory and MFU of a 1.1B Llama (TinyLlama shape,
# random init) under DeepSpeed ZeRO-3 bf16, trained engine + frozen ZeRO-3 reference, on all
# GPUs of this machine (bench/gpu_step.py says exactly what is timed and how MFU is counted).
#
#   bash bench/gpu_check.sh [gpu_step.py args, e.g. --steps 20 --pairs 16, --lora]   # GPU machine, repo root
#   bash bench/gpu_check.sh --cpu-smoke                                     # tiny CPU logic check
#
# Needs a python3 with CUDA torch + transformers (PYTHON=... to choose one). DeepSpeed and its
# small pure-python needs, if missing or older there, are installed (--no-deps, never torch) into
# a fresh private folder (mktemp -d) from the wheels in bench/wheels/ (git-ignored: carry it, 5 MB). Made with:
#   pip wheel deepspeed==0.19.8 --no-deps --no-build-isolation -w bench/wheels
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d bench/wheels hjson==3.1.0 pydantic==2.14.4 \
#     pydantic_core==2.50.5 typing-inspection==0.4.5 annotated-types==0.8.0 typing_extensions==4.16.0
#   pip download --no-deps -d bench/wheels peft==0.21.0 PyYAML==6.0.4   # for --lora (pipeline.adapter)
# Lines with results start with RESULT; with $OUT set, the log and a JSON go there too.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

if [[ "${1:-}" == "--cpu-smoke" ]]; then
  shift
  PY=${PYTHON:-.venv/bin/python}
  export DS_ACCELERATOR=cpu
  exec timeout --kill-after=10 300 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 \
    bench/gpu_step.py --cpu --tiny "$@"
fi

PY=${PYTHON:-python3}
export DS_ACCELERATOR=cuda
if ! "$PY" -c "import deepspeed" 2>/dev/null; then
  ls bench/wheels/*.whl >/dev/null 2>&1 || { echo "ERROR: deepspeed is not importable and bench/wheels/ is empty" \
    "(carry bench/wheels)"; exit 1; }
  # only the wheels whose package is missing or older than the wheel's version
  WHEELS=$("$PY" - <<'EOF'
import glob, importlib.metadata as md
from packaging.version import Version
for path in sorted(glob.glob("bench/wheels/*.whl")):
    name, version = path.rsplit("/", 1)[1].split("-")[:2]
    try:
        if Version(md.version(name)) >= Version(version):
            continue
    except md.PackageNotFoundError:
        pass
    print(path)
EOF
)
  [[ -n "$WHEELS" ]] || { echo "ERROR: deepspeed fails to import though its wheels' packages are installed:"; \
    "$PY" -c "import deepspeed"; exit 1; }
  SITE=$(mktemp -d)  # ours alone: a fixed /tmp path put first on PYTHONPATH is anyone's to fill
  trap 'rm -rf "$SITE"' EXIT
  echo "installing into $SITE: $(echo $WHEELS | xargs -n1 basename | tr '\n' ' ')"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $WHEELS
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  "$PY" -c "import deepspeed" || { echo "ERROR: deepspeed still fails to import (see above)"; exit 1; }
fi
"$PY" -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__)" 2>&1 | grep -v WARNING || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
[[ "$NGPU" -ge 1 ]] || { echo "ERROR: torch sees no CUDA GPU (use --cpu-smoke for the CPU logic check)"; exit 1; }

LOG=${OUT:+$OUT/gpu_check.log}
JSON=${OUT:-$(mktemp -d)}/gpu_step.json
set -o pipefail
timeout --kill-after=15 "${GPU_STEP_TIMEOUT:-300}" "$PY" -m torch.distributed.run --standalone \
  --nproc_per_node "$NGPU" bench/gpu_step.py --json "$JSON" "$@" 2>&1 | tee ${LOG:-/dev/null}
