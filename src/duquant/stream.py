"""Quantize a safetensors checkpoint block by block (models larger than memory), and evaluate it so."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from duquant.methods import MethodConfig
from duquant.models.streaming import activation_bytes, open_streamed, streamed_logits
from duquant.pipeline import QuantConfig, QuantizeReport, quantize_model

log = logging.getLogger(__name__)


def quantize_streaming(
    path: str | Path,
    method: MethodConfig,
    quant: QuantConfig,
    calib_windows: Tensor | None,
    work_dir: str | Path,
    device: str = "cpu",
    seed: int = 0,
    max_activation_mb: float | None = None,
):
    """Quantize checkpoint folder `path` with one block in memory at a time; the quantized blocks go
    to `work_dir`. Returns (model skeleton, adapter, block store, report)."""
    model, adapter, store = open_streamed(path, work_dir, device)
    if calib_windows is not None:
        need = activation_bytes(
            calib_windows.shape[0], calib_windows.shape[1], model.config.hidden_size
        )
        log.info("calibration activations: %.1f MiB", need / 2**20)
        if max_activation_mb is not None and need > max_activation_mb * 2**20:
            raise ValueError(
                f"calibration activations need {need / 2**20:.0f} MiB, over the budget of "
                f"{max_activation_mb:.0f} MiB: use fewer or shorter calibration windows"
            )
    report: QuantizeReport = quantize_model(
        model, adapter, method, quant, calib_windows, seed=seed, store=store
    )
    return model, adapter, store, report


@torch.no_grad()
def streamed_nll(model, adapter, store, windows: Tensor) -> float:
    """Mean next-token NLL of `windows` (n x seqlen), the model streamed block by block."""
    it = iter(windows)  # streamed_logits hands the windows' logits over in order

    def window_sum(logits: Tensor) -> float:
        w = next(it)
        return F.cross_entropy(logits[0, :-1].float(), w[1:], reduction="sum").item()

    total = sum(streamed_logits(model, adapter, store, windows, fn=window_sum))
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def _parser():
    """The command line of `python -m duquant.stream`."""
    import argparse

    from duquant.methods import METHODS

    p = argparse.ArgumentParser(
        prog="python -m duquant.stream",
        description="Quantize a safetensors checkpoint folder one block at a time (models larger "
        "than memory) and measure WikiText-2 perplexity the same way.",
    )
    p.add_argument("--model", required=True, help="Hugging Face checkpoint folder (safetensors)")
    p.add_argument("--work", required=True, help="folder for the quantized blocks")
    p.add_argument("--method", default="duquant++", choices=sorted(METHODS))
    p.add_argument("--format", default="mxfp4", choices=["mxfp4", "nvfp4"])
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows")
    p.add_argument("--calib-seqlen", type=int, default=512, help="calibration window length")
    p.add_argument("--seqlen", type=int, default=2048, help="evaluation window length")
    p.add_argument("--max-windows", type=int, default=4, help="evaluation windows (0: none)")
    p.add_argument("--max-activation-mb", type=float, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the result JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: quantize streamed, then evaluate streamed; one clear line and status 2 on bad input."""
    import math
    import sys

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from duquant.data import calibration_windows, eval_text
    from duquant.formats import QuantSpec, spec_for
    from duquant.jsonio import write_json
    from duquant.methods import get_method
    from duquant.pipeline import peak_rss_mb

    try:
        if not Path(args.model).is_dir():
            raise FileNotFoundError(f"--model {args.model} is not a checkpoint folder")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        method = get_method(args.method)
        spec: QuantSpec = spec_for(args.format)
        quant = QuantConfig(spec, spec)
        windows = None
        if method.needs_calibration:
            windows, _ = calibration_windows(tok, args.nsamples, args.calib_seqlen, args.seed)
        model, adapter, store, report = quantize_streaming(
            args.model,
            method,
            quant,
            windows,
            args.work,
            args.device,
            args.seed,
            args.max_activation_mb,
        )
        metrics = {"quantize_seconds": report.seconds, "quantize_peak_rss_mb": peak_rss_mb()}
        if args.max_windows:
            text, _ = eval_text("wikitext2")
            ids = tok(text, return_tensors="pt").input_ids[0]
            n = min(args.max_windows, ids.numel() // args.seqlen)
            evals = ids[: n * args.seqlen].reshape(n, args.seqlen).to(args.device)
            nll = streamed_nll(model, adapter, store, evals)
            metrics["wikitext2"] = {"ppl": math.exp(nll), "windows": n, "seqlen": args.seqlen}
            print(f"{args.method} wikitext2 ppl {math.exp(nll):.3f} over {n} windows (streamed)")
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"duquant.stream: error: {exc}", file=sys.stderr)
        return 2
    metrics["peak_rss_mb"] = peak_rss_mb()
    print(f"quantized in {report.seconds:.1f} s, peak RSS {metrics['peak_rss_mb']:.0f} MiB")
    if args.output:
        write_json({"config": vars(args), "metrics": metrics}, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
