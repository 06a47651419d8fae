"""Token shares for norm tweaking's one-window steps: one summation order for 1 and 2 processes.

Norm tweaking's default step is one window: the steps are sequential, so data parallelism over
windows leaves every rank but one idle. Instead the window's tokens are cut into contiguous shares
(norms, linears, MX activation quantization, the MLP and the loss are per token), each run through
the blocks, the head and the loss on its own. Attention is the one place tokens meet: a share's
queries attend to its own and every earlier share's keys and values (causal, and within the sliding
window where a layer has one) and, backwards, the gradients of an earlier share's keys and values
from the later shares are added to that share's own; each share's gradient of the trained tensors is
summed over the step and the shares' sums are added at its end. The shares are cut where they cost
alike: a later token attends over more keys, so an even cut would leave the earlier shares waiting
(`cuts`, from the model's shapes).

Under torch.distributed every rank runs one share (keys and values all-gathered, their gradients
all-reduced, the trained tensors' gradients all-reduced). One process runs `LOCAL_SHARES` shares one
after the other in the same way (the earlier shares' keys and values kept per attention module, their
gradients collected on detached copies), so that two ranks compute what one process computes, bit for
bit: every cross-share sum has two terms, and a + b = b + a. Other rank counts agree with it to float
summation order.

It uses transformers' attention registry: while a step runs, the model's attention implementation is
this module's, which wraps the model's own (`sdpa`, or the family's eager function) with the earlier
shares' keys and values and the matching mask.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class Share:
    """Tokens start..stop of a window cut at `bounds` (every share's first token, then the
    window's length): what each share holds, for the gather of keys and values."""

    start: int
    stop: int
    bounds: tuple[int, ...]

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def index(self) -> int:
        """Which share of the window this is."""
        return self.bounds.index(self.start)


@dataclass
class _Split:
    """A split step: the attention the model had (name), the share running now, and in one
    process each attention module's published keys and values of the shares run so far
    (detached leaves that collect the later shares' gradients)."""

    inner: str | None
    share: Share | None = None
    published: dict = field(default_factory=dict)


_ACTIVE: list[_Split] = []

# shares of a one-window step in one process: what two ranks (one share each) compute, bit for bit
LOCAL_SHARES = 2


def share_count(world: int) -> int:
    """Token shares of a one-window step: one a rank, or `LOCAL_SHARES` in one process."""
    return world if world > 1 else LOCAL_SHARES


def _world() -> int:
    """Ranks of the running job (1 without torch.distributed)."""
    return dist.world() if dist.active() else 1


def applies(batch: int, seqlen: int) -> bool:
    """Whether one step's window is cut into token shares: one window a step, at least one token
    a share."""
    return batch == 1 and seqlen >= share_count(_world())


def token_costs(config, seqlen: int) -> Tensor:
    """Multiply-adds of each of a window's `seqlen` tokens through the blocks and the head
    (float64): the linears' and the head's per token, attention's per key the token reads (all
    earlier tokens, or a layer's sliding window)."""
    text = getattr(config, "get_text_config", lambda **_: config)()
    h, layers = text.hidden_size, text.num_hidden_layers
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    d = getattr(text, "head_dim", None) or h // heads
    inter = text.intermediate_size
    if getattr(text, "num_experts_per_tok", None) and getattr(text, "moe_intermediate_size", None):
        inter = text.num_experts_per_tok * text.moe_intermediate_size  # routed: active experts only
    per_block = h * heads * d * 2 + 2 * h * kv * d + 3 * h * inter
    fixed = float(layers * per_block + text.vocab_size * h)
    keys = torch.arange(1, seqlen + 1, dtype=torch.float64)
    window = getattr(text, "sliding_window", None)
    kinds = getattr(text, "layer_types", None) or ["full_attention"] * layers
    read = torch.zeros(seqlen, dtype=torch.float64)
    for kind in kinds:
        read += keys.clamp(max=window) if window and kind == "sliding_attention" else keys
    return fixed + 2.0 * heads * d * read  # q·k and p·v per key read


def cuts(costs: Tensor, count: int) -> tuple[int, ...]:
    """Share bounds (each share's first token, then the window's length) cutting tokens of
    `costs` into `count` contiguous shares of about equal summed cost, each at least one token."""
    n = len(costs)
    total = torch.cumsum(costs, 0)
    bounds = [0]
    for k in range(1, count):
        # the first token whose cumulative cost passes k / count of the whole
        at = int(torch.searchsorted(total, total[-1] * k / count).item()) + 1
        bounds.append(min(max(at, bounds[-1] + 1), n - (count - k)))
    return (*bounds, n)


def shares(seqlen: int, config) -> list[Share]:
    """The token shares this process runs, in order: its rank's one, or all of them in one process;
    cut by `config`'s token costs."""
    w = _world()
    count = share_count(w)
    bounds = cuts(token_costs(config, seqlen), count)
    first = dist.rank() if w > 1 else 0
    last = first + 1 if w > 1 else count
    return [Share(bounds[k], bounds[k + 1], bounds) for k in range(first, last)]


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


def token_slice(inputs: BlockInputs, share: Share) -> BlockInputs:
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
    """This rank's [batch, heads, tokens, dim] share after every earlier rank's (shares of unequal
    length padded to the longest for the gather); backwards the gradient summed over ranks (every
    later rank's queries read this rank's keys) and this rank's share kept."""

    @staticmethod
    def forward(ctx, x: Tensor, share: Share) -> Tensor:
        b = share.bounds
        sizes = [b[k + 1] - b[k] for k in range(len(b) - 1)]
        pad = x.new_zeros(*x.shape[:2], max(sizes), *x.shape[3:])
        pad.narrow(2, 0, x.shape[2]).copy_(x)
        parts = [torch.empty_like(pad) for _ in range(dist.world())]
        tdist.all_gather(parts, pad)
        ctx.share = share
        mine = zip(parts[: share.index + 1], sizes, strict=False)  # this rank's and the earlier
        return torch.cat([p.narrow(2, 0, n) for p, n in mine], dim=2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        share = ctx.share
        full = grad.new_zeros(*grad.shape[:2], share.bounds[-1], *grad.shape[3:])
        full.narrow(2, 0, grad.shape[2]).copy_(grad)
        tdist.all_reduce(full)
        return full.narrow(2, share.start, len(share)), None


class _Leaf:
    """A share's published keys (values): a detached leaf whose gradient the later shares fill."""

    def __init__(self, x: Tensor):
        self.x = x.detach().requires_grad_(True)


class _LocalGather(torch.autograd.Function):
    """One process: this share's [batch, heads, tokens, dim] keys (values) after the earlier
    shares' published ones; backwards the later shares' gradient of this share's (on its published
    leaf, filled by their earlier backward) is added to its own, as the ranks' all-reduce adds it,
    and the earlier shares' parts go to their leaves."""

    @staticmethod
    def forward(ctx, x: Tensor, mine: _Leaf, *earlier: Tensor) -> Tensor:
        ctx.mine = mine
        ctx.sizes = [e.shape[2] for e in earlier] + [x.shape[2]]
        return torch.cat([*earlier, x], dim=2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        parts = grad.split(ctx.sizes, dim=2)
        later = ctx.mine.x.grad
        # + 0.0 where no later share read it: the ranks' all-reduce adds a zero there too (-0 -> +0)
        own = parts[-1] + (later if later is not None else 0.0)
        return (own, None, *parts[:-1])


def _with_earlier(split: _Split, module: nn.Module, x: Tensor, which: int) -> Tensor:
    """`x` (keys 0 or values 1 of the running share) after every earlier share's."""
    if _world() > 1:
        return _GatherTokens.apply(x, split.share)
    published = split.published.setdefault((module, which), [])
    if sum(t.shape[2] for t in published) != split.share.start:
        raise RuntimeError("token shares must run in order within a block")
    mine = _Leaf(x)
    out = _LocalGather.apply(x, mine, *published)
    published.append(mine.x)
    return out


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
    """Attention of the running share's queries over its own and every earlier share's keys and values."""
    split = _ACTIVE[-1]
    keys = _with_earlier(split, module, key, 0)
    values = _with_earlier(split, module, value, 1)
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    share = split.share
    mask = share_mask(share.start, share.stop, window, query.dtype, query.device)
    kwargs.pop("is_causal", None)
    return _inner(module, split.inner)(module, query, keys, values, mask, **kwargs)


@contextmanager
def parallel(model: nn.Module):
    """Within: the model's attention runs token shares (`running` says which)."""
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(NAME, _attention)
    configs = _configs(model.config)
    before = [c._attn_implementation for c in configs]
    _ACTIVE.append(_Split(before[0]))
    for c in configs:
        c._attn_implementation_internal = NAME
    try:
        yield
    finally:
        for c, name in zip(configs, before, strict=True):
            c._attn_implementation_internal = name
        _ACTIVE.pop()


@contextmanager
def running(share: Share):
    """Within `parallel`: the block calls are share `share` (global token positions)."""
    _ACTIVE[-1].share = share
    yield


def block_done() -> None:
    """Within `parallel`: the shares of one block have run (forward, or forward and backward):
    drop their published keys and values."""
    _ACTIVE[-1].published.clear()


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


__all__ = [
    "LOCAL_SHARES",
    "Share",
    "applies",
    "block_done",
    "causal",
    "cuts",
    "parallel",
    "paused",
    "running",
    "share_count",
    "share_mask",
    "shares",
    "splittable",
    "token_costs",
    "token_slice",
]
