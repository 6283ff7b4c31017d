#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a machine with an NVIDIA GPU, in one command:
#   bash benchmarks/gpu_check.sh [--quick] [--out DIR] [--noise ...]
# Installs only what the interpreter lacks: jax with CUDA (jax[cuda12]) and the core dependencies,
# from the package registry, or from wheels in $CLAIR_WHEELS when the machine is offline.
# Runs from the repository root without installing clair_jax itself (PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
missing=$($PY - <<'PY'
import importlib.util
need = ["numpy", "jax", "jaxlib", "optax", "chex", "safetensors", "ml_dtypes"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
  echo "installing: $missing"
  if [ -n "${CLAIR_WHEELS:-}" ]; then
    $PY -m pip install -q --no-index --find-links "$CLAIR_WHEELS" "jax[cuda12]" optax chex safetensors ml_dtypes
  else
    $PY -m pip install -q "jax[cuda12]" optax chex safetensors ml_dtypes
  fi
fi
if ! $PY -c "import jax, sys; sys.exit(jax.default_backend() == 'cpu')" 2>/dev/null && [[ " $* " != *" --quick "* ]]; then
  echo "JAX sees no GPU; on an NVIDIA machine: $PY -m pip install -U 'jax[cuda12]'" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec $PY benchmarks/gpu_check.py "$@"
