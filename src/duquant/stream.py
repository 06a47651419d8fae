"""Quantize a safetensors checkpoint block by block (models larger than memory), and evaluate it so.

The command line reaches this through `duquant run --stream` (runner.run_streamed)."""

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
