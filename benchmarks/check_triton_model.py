"""End-to-end check of the fused Triton kernel on the real model, without a GPU.

Quantizes SmolLM2 with DuQuant++ (MXFP4 W4A4, RTN weights, small calibration), then scores the same
WikiText-2 tokens with the torch online path and with `DUQUANT_TRITON=1`, the kernel running in
Triton's CPU interpreter (set before triton is imported). Prints and writes both NLLs and the largest
logit difference (the kernel's fp32 dot sums in another order than torch's matmul):

    python benchmarks/check_triton_model.py --tokens 256 --out results/bench/triton_model.json
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from _common import machine, write_json  # noqa: E402

from duquant.data import calibration_windows, eval_text  # noqa: E402
from duquant.methods import get_method  # noqa: E402
from duquant.models import adapter_for, load_model  # noqa: E402
from duquant.pipeline import QuantConfig, quantize_model  # noqa: E402
from duquant.qlinear import TRITON_ENV  # noqa: E402


def nll_and_logits(model, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean next-token NLL of `ids` [1, T] and the logits."""
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return float(nll), logits


def main() -> None:
    """Quantize once, score with and without the kernel, compare."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--method", default="duquant++")
    p.add_argument("--out", default="results/bench/triton_model.json")
    args = p.parse_args()
    lm = load_model()
    windows, _ = calibration_windows(lm.tokenizer, 4, 256, 0)
    quantize_model(lm.model, adapter_for(lm.model), get_method(args.method), QuantConfig(), windows)
    text, _ = eval_text("wikitext2")
    ids = lm.tokenizer(text[:20000], return_tensors="pt").input_ids[:, : args.tokens]
    os.environ.pop(TRITON_ENV, None)
    t = time.perf_counter()
    nll_torch, logits_torch = nll_and_logits(lm.model, ids)
    t_torch = time.perf_counter() - t
    os.environ[TRITON_ENV] = "1"
    t = time.perf_counter()
    nll_kernel, logits_kernel = nll_and_logits(lm.model, ids)
    t_kernel = time.perf_counter() - t
    os.environ.pop(TRITON_ENV, None)
    diff = (logits_kernel - logits_torch).abs()
    res = {
        "method": args.method,
        "tokens": args.tokens,
        "nll_torch": nll_torch,
        "nll_triton_interpreter": nll_kernel,
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "identical_logits": bool(torch.equal(logits_kernel, logits_torch)),
        "seconds_torch": t_torch,
        "seconds_triton_interpreter": t_kernel,
        "machine": machine(),
    }
    print({k: v for k, v in res.items() if k != "machine"})
    write_json(res, args.out)


if __name__ == "__main__":
    main()
