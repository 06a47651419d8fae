"""Calibration: capture decoder-block inputs and collect per-input-position statistics block by block."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from duquant.gptq import HessianAccumulator
from duquant.models.adapters import Adapter, InputGroup

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a hook once what it needs is recorded: the rest of the forward is skipped."""


@dataclass
class BlockInputs:
    """Hidden states entering a decoder block for every calibration sample, plus the shared kwargs."""

    hidden: list[Tensor]
    kwargs: dict


@torch.no_grad()
def capture_block_inputs(model: nn.Module, adapter: Adapter, windows: Tensor) -> BlockInputs:
    """Run the embedding part of `model` on each window and record what block 0 receives."""
    block0 = adapter.blocks(model)[0]
    hidden: list[Tensor] = []
    kwargs: dict = {}

    def hook(_module, args, kw):
        hidden.append(args[0] if args else kw["hidden_states"])
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _StopForward

    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for w in windows:
            try:
                model(w.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    kwargs["use_cache"] = False
    return BlockInputs(hidden, kwargs)


def run_block(block: nn.Module, inputs: BlockInputs) -> list[Tensor]:
    """Outputs of `block` for every captured input."""
    outs = []
    with torch.no_grad():
        for h in inputs.hidden:
            out = block(h, **inputs.kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


def feed_block_until(block: nn.Module, inputs: BlockInputs, module: nn.Module, fn) -> None:
    """Call `fn(output of module)` for every captured input, skipping the rest of the block.

    GPTQ needs only the input of the group it quantizes next; stopping there saves the
    attention and MLP that follow (most of the block for q/k/v).
    """

    def hook(_m, _args, out):
        fn(out)
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for h in inputs.hidden:
                try:
                    block(h, **inputs.kwargs)
                except _StopForward:
                    pass
    finally:
        handle.remove()


@dataclass
class InputStats:
    """Statistics of one input position of one block over the calibration set."""

    absmax: Tensor  # per-channel max |x|
    sample: Tensor  # a fixed subset of activation rows for searches
    rows: int = 0
    moments: HessianAccumulator | None = None  # raw Σ x xᵀ, when asked for


@torch.no_grad()
def collect_input_stats(
    block: nn.Module,
    groups: tuple[InputGroup, ...],
    inputs: BlockInputs,
    sample_rows: int = 2048,
    seed: int = 0,
    moments: bool = False,
) -> dict[str, InputStats]:
    """Per input group: per-channel absmax and a seeded row sample (and with `moments` the raw
    second moments Σ x xᵀ, for GPTQ's `fp` Hessians), in one pass."""
    stats: dict[str, InputStats] = {}
    per_sample = max(1, sample_rows // max(1, len(inputs.hidden)))
    gen = torch.Generator().manual_seed(seed)

    def make_hook(gname: str):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            idx = torch.randperm(x.shape[0], generator=gen)[:per_sample].to(x.device)
            cur = stats.get(gname)
            amax = x.abs().amax(dim=0)
            if cur is None:
                acc = HessianAccumulator(product_dtype=torch.float32) if moments else None
                cur = stats[gname] = InputStats(amax, x[idx].cpu(), x.shape[0], acc)
            else:
                cur.absmax = torch.maximum(cur.absmax, amax)
                cur.sample = torch.cat([cur.sample, x[idx].cpu()])
                cur.rows += x.shape[0]
            if cur.moments is not None:
                cur.moments.add(x)

        return hook

    handles = [
        block.get_submodule(g.linears[0]).register_forward_pre_hook(make_hook(g.name))
        for g in groups
    ]
    try:
        run_block(block, inputs)
    finally:
        for h in handles:
            h.remove()
    return stats
