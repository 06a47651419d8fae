"""Serve a duquant export in vLLM and compare its WikiText-2 perplexity with duquant's (GPU machine).

Not run in duquant's CI (no GPU there). On a machine with an NVIDIA GPU, in a fresh environment:

    python -m venv .venv-vllm && . .venv-vllm/bin/activate
    pip install -r benchmarks/requirements-vllm.txt      # vllm==0.34.0 and the versions it pins
    duquant run --method duquant++mx --weights gptq --save exports/dqpp-mx   # in duquant's own env
    PYTHONPATH=src python benchmarks/vllm_export_ppl.py exports/dqpp-mx --seqlen 2048 \
        --out results/export/vllm_dqpp-mx.json

The perplexity protocol is duquant's (`duquant.eval.perplexity`): WikiText-2 test tokenized once by
the export's tokenizer, non-overlapping windows of `--seqlen` tokens, mean NLL of tokens 2..N of
each window, exp. vLLM gives the log-probability of every prompt token (`prompt_logprobs`), so the
same windows are scored without generating. duquant's figure is read from the export's
`duquant.json` (same seqlen and windows required), or recomputed with `--duquant-eval`.

What vLLM computes (0.34.0, read from its wheel, not run here; see docs/export.md):
- Blackwell (sm100+): true W4A4 MXFP4 GEMMs; activations quantized at run time with E8M0 scales.
- Hopper / Ampere: a weight-only Marlin MXFP4 path: activations stay in 16 bits (vLLM warns), so
  the perplexity is that of a W4A16 model and is expected to be lower than duquant's W4A4 figure.
- The emulation backend (any GPU; how it is selected differs between releases: see `vllm/envs.py` of
  the installed version) fake-quantizes activations as compressed-tensors does on CPU: the closest
  match to duquant's number. The JSON records every VLLM_* variable set.
- Transforms of type `random-hadamard` run as a dense 32 x 32 GEMM in the model dtype after dividing
  the stored matrix by sqrt(32); tensor parallel > 1 and linears with a bias are rejected.
Expect agreement to a few 1e-3 relative in bfloat16, not bit for bit (other GEMM kernels and dtype).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path


def wikitext_ids(tokenizer) -> list[int]:
    """WikiText-2 test tokenized as duquant's perplexity does (`duquant.data.eval_text`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from duquant.data import eval_text

    text, _ = eval_text("wikitext2")
    return tokenizer(text).input_ids


def vllm_ppl(export: str, ids: list[int], seqlen: int, windows: int, dtype: str) -> dict:
    """Perplexity of the export served by vLLM over the first `windows` windows."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=export, dtype=dtype, max_model_len=seqlen + 1, tensor_parallel_size=1)
    load_s = time.perf_counter() - start
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    prompts = [
        TokensPrompt(prompt_token_ids=ids[i * seqlen : (i + 1) * seqlen]) for i in range(windows)
    ]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    nll, per_window = 0.0, []
    for prompt, out in zip(prompts, outs, strict=True):
        toks = prompt["prompt_token_ids"]
        # entry j holds {token: Logprob} for prompt token j (None for the first token)
        w = -sum(out.prompt_logprobs[j][toks[j]].logprob for j in range(1, len(toks)))
        per_window.append(w)
        nll += w
    n_tokens = windows * (seqlen - 1)
    return {
        "ppl": math.exp(nll / n_tokens),
        "window_nll": per_window,
        "windows": windows,
        "seqlen": seqlen,
        "load_seconds": load_s,
        "eval_seconds": time.perf_counter() - start,
    }


def duquant_ppl(export: str, seqlen: int, windows: int, recompute: bool) -> dict | None:
    """duquant's figure for the same windows: from the sidecar, or recomputed from the export."""
    side = json.loads((Path(export) / "duquant.json").read_text())
    rec = side.get("perplexity", {}).get("wikitext2")
    if not recompute and rec and rec.get("seqlen") == seqlen and rec.get("windows") == windows:
        return {"ppl": rec["ppl"], "source": "duquant.json (in-process, at export time)"}
    if not recompute:
        return None
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from duquant.api import run
    from duquant.config import RunConfig

    res = run(RunConfig(model=export, method="fp", seqlen=seqlen, max_windows=windows))
    return {"ppl": res["metrics"]["wikitext2"]["ppl"], "source": "duquant reload of the export"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export", help="a directory written by `duquant run --save`")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None, help="default: all full windows")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--duquant-eval", action="store_true", help="recompute duquant's perplexity")
    p.add_argument("--out", default="results/export/vllm_ppl.json")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.export)
    ids = wikitext_ids(tok)
    windows = len(ids) // args.seqlen
    if args.max_windows:
        windows = min(windows, args.max_windows)
    ours = duquant_ppl(args.export, args.seqlen, windows, args.duquant_eval)
    theirs = vllm_ppl(args.export, ids, args.seqlen, windows, args.dtype)
    import torch
    import vllm

    result = {
        "export": args.export,
        "vllm": theirs,
        "duquant": ours,
        "relative_difference": None if ours is None else theirs["ppl"] / ours["ppl"] - 1.0,
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__},
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_")},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("relative_difference", "gpu")}, indent=2))
    print(
        f"vLLM ppl {theirs['ppl']:.4f}; duquant {ours['ppl'] if ours else 'n/a'}; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
