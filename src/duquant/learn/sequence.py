"""Sequence parallelism for norm tweaking's one-window steps under torch.distributed.

Norm tweaking's default step is one window: the steps are sequential, so data parallelism over
windows leaves every rank but one idle. Instead each rank runs a contiguous share of the window's
tokens through the blocks, the head and the loss (norms, linears, MX activation quantization, the
MLP and the loss are per token). Attention is the one place tokens meet: each rank's keys and values
are all-gathered, its queries attend to every earlier token (causal, and within the sliding window
where a layer has one) and, backwards, the gradients of the gathered keys and values are summed over
ranks and each rank keeps its own. The norm weights' gradients are then summed over ranks as for data
parallelism: the same gradient as one process up to float summation order.

It uses transformers' attention registry: while a step runs, the model's attention implementation is
this module's, which wraps the model's own (`sdpa`, or the family's eager function) with the gathered
keys and values and the matching mask.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch import distributed as tdist

from duquant import distributed as dist
from duquant.calibrate import BlockInputs

NAME = "duquant_sequence"

# keyword arguments a block call carries per token (sliced along these dims), or that this
# module replaces (the mask); any other tensor argument makes a family unsplittable
_PER_TOKEN = {"position_embeddings": 1, "position_ids": 1, "cache_position": 0}
_REPLACED = ("attention_mask",)


@dataclass
class _Share:
    """The running share: global positions start..stop of a window of `length` tokens, and the
    attention the model had (name)."""

    start: int
    stop: int
    inner: str | None


_ACTIVE: list[_Share] = []


def applies(batch: int, seqlen: int) -> bool:
    """Whether one step's window is split over the ranks: one window a step, several ranks,
    equal token shares."""
    w = dist.world() if dist.active() else 1
    return w > 1 and batch == 1 and seqlen % w == 0


def causal(config) -> bool:
    """Whether the model's attention is causal (a text model run bidirectionally, e.g. Gemma 3's
    `use_bidirectional_attention`, would need another mask)."""
    text = getattr(config, "get_text_config", lambda **_: config)()
    return not any(
        getattr(c, "use_bidirectional_attention", False) or getattr(c, "is_causal", True) is False
        for c in (config, text)
    )


def splittable(kwargs: dict) -> bool:
    """Whether a block's call can be split by tokens (no tensor argument of unknown layout)."""
    for k, v in kwargs.items():
        if k in _PER_TOKEN or k in _REPLACED:
            continue
        if isinstance(v, Tensor) or (isinstance(v, (tuple, list, dict)) and v):
            return False
    return True


def token_slice(inputs: BlockInputs, share: range) -> BlockInputs:
    """`inputs` restricted to tokens `share` (hidden states and per-token arguments of every
    block); the attention mask left to this module."""

    def cut(kwargs: dict) -> dict:
        out = {}
        for k, v in kwargs.items():
            if k in _REPLACED:
                out[k] = None
            elif k in _PER_TOKEN and v is not None:
                d = _PER_TOKEN[k]
                if isinstance(v, (tuple, list)):
                    out[k] = type(v)(t.narrow(d, share.start, len(share)) for t in v)
                else:
                    out[k] = v.narrow(d, share.start, len(share))
            else:
                out[k] = v
        return out

    hidden = [h[:, share.start : share.stop] for h in inputs.hidden]
    return BlockInputs(hidden, cut(inputs.kwargs), [cut(k) for k in inputs.layer_kwargs])


class _GatherTokens(torch.autograd.Function):
    """All ranks' [batch, heads, tokens, dim] shares concatenated along tokens; backwards the
    gradient summed over ranks (every rank's queries read every key) and this rank's share kept."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.world())]
        tdist.all_gather(parts, x)
        ctx.n = x.shape[2]
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        tdist.all_reduce(grad)
        return grad.narrow(2, dist.rank() * ctx.n, ctx.n)


def share_mask(start: int, stop: int, window: int | None, dtype, device) -> Tensor:
    """Additive mask [1, 1, stop - start, stop]: query position p sees key j when j <= p (and
    p - j < window for a sliding-window layer)."""
    q = torch.arange(start, stop, device=device)[:, None]
    k = torch.arange(0, stop, device=device)[None, :]
    seen = k <= q
    if window is not None:
        seen &= (q - k) < window
    mask = torch.zeros(seen.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~seen, torch.finfo(dtype).min)[None, None]


def _inner(module: nn.Module, name: str | None):
    """The attention function the model used: the registry's (sdpa for any fused kernel, which
    needs no mask of ours), else the family's eager function."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name not in (None, "eager"):
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    return sys.modules[type(module).__module__].eager_attention_forward


def _attention(module, query, key, value, attention_mask, **kwargs):
    """Attention of this rank's queries over every rank's keys and values up to its last token."""
    share = _ACTIVE[-1]
    keys = _GatherTokens.apply(key)[:, :, : share.stop]
    values = _GatherTokens.apply(value)[:, :, : share.stop]
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    mask = share_mask(share.start, share.stop, window, query.dtype, query.device)
    kwargs.pop("is_causal", None)
    return _inner(module, share.inner)(module, query, keys, values, mask, **kwargs)


@contextmanager
def parallel(model: nn.Module, share: range):
    """Within: the model's attention is split over the ranks, this rank holding tokens `share`."""
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, _attention)
    configs = _configs(model.config)
    before = [c._attn_implementation for c in configs]
    _ACTIVE.append(_Share(share.start, share.stop, before[0]))
    for c in configs:
        c._attn_implementation_internal = NAME
    try:
        yield
    finally:
        for c, name in zip(configs, before, strict=True):
            c._attn_implementation_internal = name
        _ACTIVE.pop()


@contextmanager
def paused(model: nn.Module):
    """Within `parallel`: the model's own attention again, for a pass over whole windows (a
    teacher's); outside it, nothing changes."""
    if not _ACTIVE:
        yield
        return
    configs = _configs(model.config)
    for c in configs:
        c._attn_implementation_internal = _ACTIVE[-1].inner
    try:
        yield
    finally:
        for c in configs:
            c._attn_implementation_internal = NAME


def _configs(config) -> list:
    """`config` and its sub-configs (a multimodal model's text config), each once."""
    out, todo = [], [config]
    while todo:
        c = todo.pop()
        if c is None or any(c is o for o in out):
            continue
        out.append(c)
        todo += [getattr(c, k, None) for k in getattr(c, "sub_configs", {})]
    return out


__all__ = ["applies", "causal", "parallel", "paused", "share_mask", "splittable", "token_slice"]
