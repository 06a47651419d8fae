"""Calibration: capture decoder-block inputs and collect per-input-position statistics block by block."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from duquant import distributed as dist
from duquant.gptq import HessianAccumulator
from duquant.models.adapters import Adapter, InputGroup

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a hook once what it needs is recorded: the rest of the forward is skipped."""


@dataclass
class BlockInputs:
    """Hidden states entering a decoder block for every calibration sample, plus that block's kwargs.

    `layer_kwargs[i]` are the keyword arguments the model passes block i (masks, rotary embeddings):
    they differ between blocks in some families (Gemma 3 alternates sliding-window and global
    attention with different RoPE), so each block is replayed with its own.
    """

    hidden: list[Tensor]
    kwargs: dict
    layer_kwargs: list[dict] = field(default_factory=list)

    def next(self, hidden: list[Tensor], layer: int) -> BlockInputs:
        """The inputs of block `layer`, whose hidden states are `hidden`."""
        kwargs = self.layer_kwargs[layer] if layer < len(self.layer_kwargs) else self.kwargs
        return BlockInputs(hidden, kwargs, self.layer_kwargs)


class _Recorder(nn.Module):
    """Stands in for a decoder block while inputs are captured: records its call, passes x through."""

    def __init__(self, index: int, sink: dict):
        super().__init__()
        self.index, self.sink = index, sink

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        if self.index == 0:
            self.sink["hidden"].append(hidden_states)
        if self.index not in self.sink["kwargs"]:
            self.sink["kwargs"][self.index] = kwargs
        return hidden_states


def _block_kwargs(kwargs: dict) -> dict:
    """What a block needs of its call's keyword arguments when replayed alone (no KV cache)."""
    out = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
    out["use_cache"] = False
    return out


_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "use_cache")


@torch.no_grad()
def capture_block_inputs(model: nn.Module, adapter: Adapter, windows: Tensor) -> BlockInputs:
    """Record what block 0 receives for each window, and what keyword arguments every block gets.

    Every block is swapped for a pass-through recorder for the duration, so no block weight is
    touched (a streamed model has none loaded); the final norm stops the forward.
    """
    blocks = adapter.blocks(model)
    originals = list(blocks)
    sink: dict = {"hidden": [], "kwargs": {}}
    for i in range(len(blocks)):
        blocks[i] = _Recorder(i, sink)

    def stop(_module, _args):
        raise _StopForward

    handle = model.get_submodule(adapter.final_norm).register_forward_pre_hook(stop)
    device = _input_device(model, adapter)
    try:
        for w in windows:
            try:
                model(w.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        for i, block in enumerate(originals):
            blocks[i] = block
    per_layer = [_block_kwargs(sink["kwargs"][i]) for i in range(len(blocks))]
    return BlockInputs(sink["hidden"], per_layer[0], per_layer)


def _input_device(model: nn.Module, adapter: Adapter) -> torch.device:
    """Where the token ids must go: the embedding's device."""
    return model.get_submodule(adapter.embed).weight.device


def block_output(block: nn.Module, hidden: Tensor, kwargs: dict) -> Tensor:
    """The hidden-state output of one call of `block` (families return a tuple or a tensor)."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def run_block(block: nn.Module, inputs: BlockInputs) -> list[Tensor]:
    """Outputs of `block` for every captured input."""
    with torch.no_grad():
        return [block_output(block, h, inputs.kwargs) for h in inputs.hidden]


def feed_block_until(
    block: nn.Module, inputs: BlockInputs, module: nn.Module, fn, with_input: bool = False
) -> None:
    """Call `fn(output of module)` (`fn(input, output)` `with_input`) for every captured input,
    skipping the rest of the block.

    GPTQ needs only the input of the group it quantizes next; stopping there saves the
    attention and MLP that follow (most of the block for q/k/v).
    """

    def hook(_m, args, out):
        if with_input:
            fn(args[0], out)
        else:
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


@torch.no_grad()
def run_block_recording(
    block: nn.Module, groups: tuple[InputGroup, ...], inputs: BlockInputs
) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
    """Outputs of `block` for every captured input, and each group's observed input per window."""
    seen: dict[str, list[Tensor]] = {g.name: [] for g in groups}

    def make_hook(gname: str):
        def hook(_module, args):
            seen[gname].append(args[0].detach())

        return hook

    handles = [
        block.get_submodule(g.observed).register_forward_pre_hook(make_hook(g.name)) for g in groups
    ]
    try:
        outputs = run_block(block, inputs)
    finally:
        for h in handles:
            h.remove()
    return outputs, seen


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
    second moments Σ x xᵀ, for GPTQ's `fp` Hessians), in one pass.

    Under torch.distributed `inputs` are this rank's share of the windows (contiguous, in window
    order): the statistics are combined so that every rank holds the single-process ones (absmax
    by max, rows and moments by sum, samples gathered in window order).
    """
    stats: dict[str, InputStats] = {}
    total_windows = dist.sum_int(len(inputs.hidden))
    per_sample = max(1, sample_rows // max(1, total_windows))
    gen = torch.Generator().manual_seed(seed)
    _skip_earlier_windows(gen, block, groups, inputs, total_windows)

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
        block.get_submodule(g.observed).register_forward_pre_hook(make_hook(g.name)) for g in groups
    ]
    try:
        run_block(block, inputs)
    finally:
        for h in handles:
            h.remove()
    if dist.active():
        stats = _combine_stats(stats, block, groups, moments)
    return stats


def _skip_earlier_windows(
    gen: torch.Generator, block: nn.Module, groups, inputs: BlockInputs, total: int
) -> None:
    """Advance `gen` past the row draws of the windows that ranks before this one hold, so each
    window's sample is the one a single process draws (dense blocks: one draw of each window's
    rows per group; a routed group's row count depends on the router, so MoE blocks draw from a
    rank-seeded generator instead: the same distribution, not the same rows)."""
    if not dist.active():
        return
    if any(g.observe is not None for g in groups):
        gen.manual_seed(gen.initial_seed() + 7919 * dist.rank())
        return
    earlier = dist.shard_start(total)
    rows = inputs.hidden[0].reshape(-1, inputs.hidden[0].shape[-1]).shape[0] if inputs.hidden else 0
    for _ in range(earlier * len(groups)):
        torch.randperm(rows, generator=gen)


def _combine_stats(
    stats: dict[str, InputStats], block: nn.Module, groups, moments: bool
) -> dict[str, InputStats]:
    """Every rank's statistics combined in group order (a group no token of this rank reached
    takes part with empty ones); groups no rank saw are left out, as in one process."""
    out: dict[str, InputStats] = {}
    for g in groups:
        dim = block.get_submodule(g.linears[0]).weight.shape[1]
        cur = stats.get(g.name)
        if cur is None:
            acc = HessianAccumulator(product_dtype=torch.float32) if moments else None
            cur = InputStats(torch.zeros(dim), torch.zeros(0, dim), 0, acc)
        rows = dist.sum_int(cur.rows)
        absmax = dist.all_reduce_(cur.absmax.float().contiguous(), "max")
        sample = dist.gather_cat(cur.sample)
        if cur.moments is not None:
            cur.moments.all_reduce(dim)
        if rows > 0:
            out[g.name] = InputStats(absmax, sample, rows, cur.moments)
    return out
