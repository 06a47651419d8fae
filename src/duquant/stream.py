"""Quantize a safetensors checkpoint block by block (models larger than memory), and evaluate it so.

The command line reaches this through `duquant run --stream` (duquant.api.run_streamed)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from duquant import distributed as dist
from duquant.calibrate import capture_block_inputs, run_block
from duquant.methods import Recipe
from duquant.models.adapters import Adapter
from duquant.models.streaming import activation_bytes, open_streamed
from duquant.pipeline import QuantConfig, QuantizeReport, quantize_model
from duquant.utils import return_freed_memory

log = logging.getLogger(__name__)


def open_for_quantization(
    path: str | Path,
    calib_windows: Tensor | None,
    work_dir: str | Path,
    device: str = "cpu",
    max_activation_mb: float | None = None,
    fingerprint: dict | None = None,
):
    """Open checkpoint folder `path` block by block (quantized blocks go to `work_dir`, which
    `fingerprint` ties to the run: models.streaming.work_fingerprint), refusing calibration
    activations over `max_activation_mb`: (model skeleton, adapter, block store)."""
    model, adapter, store = open_streamed(path, work_dir, device, fingerprint=fingerprint)
    # streaming exists to bound memory: freed block buffers go back to the system at once
    if return_freed_memory():
        log.info("large allocations are mmap-served: freed block buffers return to the system")
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
    return model, adapter, store


def quantize_streaming(
    path: str | Path,
    method: Recipe,
    quant: QuantConfig,
    calib_windows: Tensor | None,
    work_dir: str | Path,
    device: str = "cpu",
    seed: int = 0,
    max_activation_mb: float | None = None,
):
    """Quantize checkpoint folder `path` with one block in memory at a time; the quantized blocks go
    to `work_dir`. Returns (model skeleton, adapter, block store, report)."""
    model, adapter, store = open_for_quantization(
        path, calib_windows, work_dir, device, max_activation_mb
    )
    report: QuantizeReport = quantize_model(
        model, adapter, method, quant, calib_windows, seed=seed, store=store
    )
    return model, adapter, store, report


@torch.no_grad()
def streamed_logits(model: nn.Module, adapter: Adapter, store, windows: Tensor, fn=None) -> list:
    """Logits of each window (1 x seqlen each), one block in memory at a time.

    With `fn`, `fn(logits)` is returned per window instead of the logits, which are then dropped
    one by one (a 262k vocabulary makes 1 GiB of logits per 1024-token window).
    """
    with store.embedding(model):
        inputs = capture_block_inputs(model, adapter, windows)
    n = len(adapter.blocks(model))
    for i in range(n):
        block = store.load(i)
        hidden = run_block(block, inputs)
        store.release(i)
        inputs = inputs.next(hidden, i + 1)
    out = []
    with store.head():
        norm = model.get_submodule(adapter.final_norm)
        head = model.get_submodule(adapter.lm_head)
        # the final soft cap some families apply to the logits (Gemma 3's final_logit_softcapping)
        cap = getattr(model.config, "final_logit_softcapping", None)
        for h in inputs.hidden:
            logits = head(norm(h))
            if cap:
                logits = torch.tanh(logits / cap) * cap
            out.append(logits if fn is None else fn(logits))
            del logits
    return out


@torch.no_grad()
def streamed_nll(model, adapter, store, windows: Tensor) -> float:
    """Mean next-token NLL of `windows` (n x seqlen), the model streamed block by block (under
    torch.distributed each rank its share of the windows, the per-window sums gathered in order)."""
    mine = dist.shard(windows.shape[0])
    own = windows[mine.start : mine.stop]
    it = iter(own)  # streamed_logits hands the windows' logits over in order

    def window_sum(logits: Tensor) -> float:
        w = next(it)
        return F.cross_entropy(logits[0, :-1].float(), w[1:], reduction="sum").item()

    sums = streamed_logits(model, adapter, store, own, fn=window_sum) if len(own) else []
    total = sum(dist.gather_list(sums))
    return total / (windows.shape[0] * (windows.shape[1] - 1))
