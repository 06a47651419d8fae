"""Norm tweaking after quantization: the pre-norm weights refined on the model's KL from full precision.

The weights of the norms that feed quantized linears (each block's attention and MLP input norms,
which already hold DuQuant++'s folded smoothing) and of the final norm stay in full precision in every
engine's checkpoint, so they are free parameters of the quantized model: no online cost, nothing to
re-quantize, exported as they are. After GPTQ they are trained through the whole quantized model
(straight-through MX quantization of the activations, weights fixed on their grid) on the KL
divergence from the full-precision model's next-token distribution over the calibration windows
(the idea of Norm Tweaking, Li et al. 2024, with a distillation loss). Each weight is parametrised
as (offset + w0)·exp(t) − offset, t = 0 at the start, so a step is relative to the weight's size.

Training goes block by block through the pipeline's block store, so it needs neither the whole model
in memory nor a teacher copy (the teacher's distributions are computed once beforehand,
duquant.learn.teacher): a step runs the forward pass one block at a time keeping each block's input,
the head and the loss, then the backward pass in reverse block order, each block's forward recomputed
from its saved input with the gradient on. The trained tensors live outside the blocks (a streamed
store reloads them from disk) and are written into the blocks, and the final norm, at the end. One
step is a global batch of windows; under torch.distributed each rank runs its share and the gradients
are summed over ranks, so any number of ranks follows the single-process trajectory. The default step
of one window is cut into token shares instead (duquant.learn.sequence: each a contiguous part of the
window, attention over its own and the earlier shares' keys and values), one a rank, or two one after
the other in one process, so that two ranks compute what one process computes bit for bit; a window
whose length the share count does not divide, or another batch smaller than the world, leaves ranks
idle in that step (the same result as one process, no faster).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from duquant import distributed as dist
from duquant.calibrate import BlockInputs, capture_block_inputs
from duquant.models.adapters import Adapter

from . import sequence
from .teacher import HEAD_CHUNK, TopK, head_logits, top_k_kl

log = logging.getLogger(__name__)


class RelativeScale(nn.Module):
    """w = (offset + w0)·exp(t) − offset, the trained tensor being t (zero at the start)."""

    def __init__(self, w0: Tensor, offset: float):
        super().__init__()
        self.offset = offset
        self.register_buffer("base", w0.detach().float() + offset)

    def forward(self, t: Tensor) -> Tensor:
        return (self.base * torch.exp(t) - self.offset).to(t.dtype)

    def right_inverse(self, w: Tensor) -> Tensor:
        return torch.zeros_like(w)


@dataclass
class NormSlot:
    """One trained norm weight, kept outside the model: its block (None: the final norm), its name
    there, its parametrisation and the trained tensor t."""

    block: int | None
    name: str
    scale: RelativeScale
    t: Tensor

    def weight(self) -> Tensor:
        """The norm weight now (in the autograd graph of t when gradients are on)."""
        return self.scale(self.t)


def block_norm_names(block: nn.Module, adapter: Adapter) -> list[str]:
    """The names of a block's pre-norms of quantized inputs (q/k/v and a router may share one)."""
    return list(dict.fromkeys(g.norm for g in adapter.block_groups(block) if g.norm is not None))


def tuned_norms(model: nn.Module, adapter: Adapter) -> list[nn.Module]:
    """The norms whose weights are tuned: every block's pre-norms of quantized inputs, the final norm."""
    norms = [
        block.get_submodule(name)
        for block in adapter.blocks(model)
        for name in block_norm_names(block, adapter)
    ]
    norms.append(model.get_submodule(adapter.final_norm))
    return list({id(m): m for m in norms}.values())


def _slot(block: int | None, name: str, weight: Tensor, offset: float) -> NormSlot:
    """A slot starting at `weight` (t = 0, trained)."""
    scale = RelativeScale(weight, offset)
    return NormSlot(block, name, scale, scale.right_inverse(weight).requires_grad_(True))


def collect_slots(model: nn.Module, adapter: Adapter, store) -> list[NormSlot]:
    """A slot per tuned norm, the blocks' in block order, then the final norm's."""
    slots = []
    for i in range(len(adapter.blocks(model))):
        block = store.load(i)
        for name in block_norm_names(block, adapter):
            w = block.get_submodule(name).weight
            slots.append(_slot(i, name, w, adapter.norm_offset))
        store.release(i)
    with store.head():
        w = model.get_submodule(adapter.final_norm).weight
        slots.append(_slot(None, adapter.final_norm, w, adapter.norm_offset))
    return slots


class _Slots:
    """The slots by block, as the block-by-block passes call them (`call`, `final_weight` and
    `params`, what `train_blockwise` asks of what it trains)."""

    def __init__(self, slots: list[NormSlot]):
        self.slots = slots
        self.final = next(s for s in slots if s.block is None)
        self.by_block: dict[int, list[NormSlot]] = {}
        for s in slots:
            if s.block is not None:
                self.by_block.setdefault(s.block, []).append(s)

    def weights(self, i: int) -> dict[str, Tensor]:
        """Block `i`'s norm weights as the functional call's parameters."""
        return {f"{s.name}.weight": s.weight() for s in self.by_block.get(i, [])}

    def params(self) -> list[Tensor]:
        """The trained tensors, in slot order."""
        return [s.t for s in self.slots]

    def call(self, i: int, block: nn.Module, hidden: Tensor, kwargs: dict) -> Tensor:
        """Block `i`'s hidden-state output with its trained norm weights."""
        return _block_call(block, self.weights(i), hidden, kwargs)

    def final_weight(self) -> Tensor:
        """The final norm's trained weight."""
        return self.final.weight()


def _block_call(block: nn.Module, weights: dict[str, Tensor], hidden: Tensor, kwargs: dict):
    """The block's hidden-state output with its norm weights replaced by `weights`."""
    out = functional_call(block, weights, (hidden,), kwargs)
    return out[0] if isinstance(out, tuple) else out


def _forward(
    model,
    adapter: Adapter,
    store,
    windows: Tensor,
    slots,
    shares: list[sequence.Share] | None = None,
    graphs: _Graphs | None = None,
) -> list[list[BlockInputs]]:
    """Each block's inputs for `windows`, then the last block's output: one `BlockInputs` of
    every window, or, with token `shares`, one of each share's tokens. Blocks run without
    gradient, or, while `graphs` has room, with it, their graphs kept for the backward."""
    with store.embedding(model):
        inputs = capture_block_inputs(model, adapter, windows)
    units = [inputs] if shares is None else [sequence.token_slice(inputs, t) for t in shares]
    saved = []
    for i in range(len(adapter.blocks(model))):
        block = store.load(i)
        keep = graphs is not None and graphs.room()
        outs = []
        for k, u in enumerate(units):
            with _share(shares, k):
                if keep:
                    outs.append(graphs.run(i, k, block, u, slots))
                else:
                    with torch.no_grad():
                        outs.append([slots.call(i, block, h, u.kwargs) for h in u.hidden])
        _block_done(shares)
        store.release(i)
        saved.append(units)
        units = [u.next(o, i + 1) for u, o in zip(units, outs, strict=True)]
    saved.append(units)
    return saved


# a step keeps its blocks' forward graphs for the backward (no recompute) while the tensors they save
# stay under this many bytes (counted as saved: weights too); a streamed store never keeps them
KEEP_GRAPHS_BYTES = 4 << 30


class _Graphs:
    """The forward's autograd graphs of a step's blocks, kept for its backward (no recompute)
    while the tensors they save stay within `budget` bytes in all; later blocks are recomputed.
    Only for a store whose blocks stay in memory."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.kept: dict[tuple[int, int], tuple[list[Tensor], list[Tensor]]] = {}

    def room(self) -> bool:
        """Whether the next block's graphs may be kept."""
        return self.used < self.budget

    def _pack(self, t: Tensor) -> Tensor:
        self.used += t.numel() * t.element_size()  # an overcount: weights are saved as well
        return t

    def run(self, i: int, k: int, block, u: BlockInputs, slots) -> list[Tensor]:
        """Block i's outputs of unit k's windows with their graphs kept (detached)."""
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(self._pack, _same):
            xs, outs = _with_graph(i, block, u.hidden, u.kwargs, slots)
        self.kept[i, k] = (xs, outs)
        return [o.detach() for o in outs]

    def take(self, i: int, k: int) -> tuple[list[Tensor], list[Tensor]] | None:
        """Block i's kept inputs and outputs of unit k, given up (None if recomputed)."""
        return self.kept.pop((i, k), None)


def _same(t: Tensor) -> Tensor:
    return t


def _with_graph(
    i: int, block, hidden: list[Tensor], kwargs: dict, slots
) -> tuple[list[Tensor], list[Tensor]]:
    """Block i run on windows `hidden` with the gradient on: (inputs, outputs); the inputs want
    a gradient past block 0 (the embedding is frozen)."""
    xs = [h.detach().requires_grad_(i > 0) for h in hidden]
    return xs, [slots.call(i, block, x, kwargs) for x in xs]


def _share(shares: list[sequence.Share] | None, k: int):
    """The context of share k's block calls (nothing without shares)."""
    return nullcontext() if shares is None else sequence.running(shares[k])


def _block_done(shares: list[sequence.Share] | None) -> None:
    """A block's shares have run: their published keys and values go."""
    if shares is not None:
        sequence.block_done()


class _ShareGrads:
    """Each token share's own gradient of the trained tensors over a step, added in share order at
    its end: what the ranks' all-reduce adds when each holds one share (a missing gradient counts
    as zeros, as `_sync_step` fills it)."""

    def __init__(self, params: list[Tensor], shares: list[sequence.Share]):
        self.params, self.shares = params, shares
        self.acc: list[list[Tensor | None]] = [[None] * len(params) for _ in shares]

    @contextmanager
    def of(self, k: int) -> Iterator[None]:
        """Within: gradients accumulate into share k's."""
        for p, g in zip(self.params, self.acc[k], strict=True):
            p.grad = g
        try:
            yield
        finally:
            self.acc[k] = [p.grad for p in self.params]

    def merge(self) -> None:
        """The trained tensors' gradients: the shares' summed (one share: its own, as it is)."""
        for j, p in enumerate(self.params):
            gs = [a[j] for a in self.acc]
            if len(gs) == 1:
                p.grad = gs[0]
            elif any(g is not None for g in gs):
                total = torch.zeros_like(p) if gs[0] is None else gs[0]
                for g in gs[1:]:
                    total = total + (torch.zeros_like(p) if g is None else g)
                p.grad = total


def _head_grads(model, adapter: Adapter, store, last: list[Tensor], targets, slots, n: int):
    """The loss summed over windows (each the mean over its `n` tokens, of which `last` may hold a
    share starting at the targets' first row) and its gradient with respect to each window's last
    hidden state; the final norm's gradient accumulates. The head and loss run HEAD_CHUNK tokens
    at a time (their logits and gradients are [tokens, vocab] float32)."""
    total, grads = 0.0, []
    with store.head(), torch.enable_grad():
        for h, target in zip(last, targets, strict=True):
            x = h.detach().requires_grad_(True)
            m = x.shape[1]
            for a in range(0, m, HEAD_CHUNK):
                b = min(m, a + HEAD_CHUNK)
                logits = head_logits(model, adapter, x[:, a:b], slots.final_weight())
                # the window's loss is the mean over its n tokens: each chunk's mean times its share
                loss = top_k_kl(logits[0], target.rows(a, b)) * ((b - a) / n)
                loss.backward()
                total += loss.item()
                del logits, loss
            grads.append(x.grad)
    return total, grads


def _backward(
    store, saved: list[list[BlockInputs]], grads: list[list[Tensor]], slots, acc, graphs
) -> None:
    """Back through the blocks in reverse order, each from the graph its forward kept or that
    forward recomputed from its saved input; the norm weights' gradients accumulate (the
    embedding is frozen: block 0's input needs none). Token shares run backwards in reverse
    order, each into its own gradients (`acc`)."""
    for i in reversed(range(len(saved) - 1)):
        block = store.load(i)
        units = saved[i]
        with torch.enable_grad():
            if acc is None:  # whole windows: each (recomputed and) run back on its own
                u, kept = units[0], _taken(graphs, i, 0)
                new = [[_back_one(i, block, u, j, g, slots, kept) for j, g in enumerate(grads[0])]]
            else:
                new = _back_shares(i, block, units, grads, slots, acc, graphs)
        store.release(i)
        saved[i], grads = None, new  # this block's inputs are done with


def _taken(graphs: _Graphs | None, i: int, k: int):
    """Block i's kept graph of unit k, given up (None: recompute it)."""
    return None if graphs is None else graphs.take(i, k)


def _back_one(i: int, block, u: BlockInputs, j: int, g: Tensor, slots, kept) -> Tensor | None:
    """Window j of block i (from its kept graph, else recomputed from its input), its output's
    gradient `g` run back: the input's gradient."""
    if kept is not None:
        x, out = kept[0][j], kept[1][j]
    else:
        (x,), (out,) = _with_graph(i, block, u.hidden[j : j + 1], u.kwargs, slots)
    if out.requires_grad:  # a first block without tuned norms needs nothing
        out.backward(g)
    return x.grad


def _back_shares(i: int, block, units, grads, slots, acc, graphs) -> list[list[Tensor | None]]:
    """Block i over token shares (one window each): kept, or recomputed in order (a later share
    reads the earlier ones' keys and values), then run back in reverse."""
    xs, outs = [], []
    for k, u in enumerate(units):
        kept = _taken(graphs, i, k)
        if kept is None:
            with sequence.running(acc.shares[k]):
                kept = _with_graph(i, block, u.hidden, u.kwargs, slots)
        xs.append(kept[0][0])
        outs.append(kept[1][0])
    for k in reversed(range(len(units))):
        if outs[k].requires_grad:
            with acc.of(k):
                outs[k].backward(grads[k][0])
    sequence.block_done()
    return [[x.grad] for x in xs]


def step_grads(
    model,
    adapter: Adapter,
    store,
    windows,
    targets,
    slots,
    shares: list[sequence.Share] | None = None,
) -> float:
    """Gradients of the loss summed over `windows` into the trained tensors of `slots` (a
    `_Slots`, or anything with its `call`, `final_weight` and `params`); the summed loss. With
    token `shares` of the one window (inside `sequence.parallel`), this process's shares' part
    of both, each share's gradient summed on its own and the shares' added at the end."""
    graphs = _Graphs(KEEP_GRAPHS_BYTES) if getattr(store, "whole_model", False) else None
    saved = _forward(model, adapter, store, windows, slots, shares, graphs)
    if graphs is not None:
        log.debug(
            "step: %d block graphs kept, %.0f MiB saved", len(graphs.kept), graphs.used / 2**20
        )
    n = windows.shape[1]
    if shares is None:
        total, grads = _head_grads(model, adapter, store, saved[-1][0].hidden, targets, slots, n)
        _backward(store, saved, [grads], slots, None, graphs)
        return total
    acc = _ShareGrads(slots.params(), shares)
    total, grads = 0.0, []
    for k, (u, t) in enumerate(zip(saved[-1], shares, strict=True)):
        with acc.of(k):
            rows = [tg.rows(t.start, t.stop) for tg in targets]
            loss, g = _head_grads(model, adapter, store, u.hidden, rows, slots, n)
        total, grads = total + loss, [*grads, g]
    _backward(store, saved, grads, slots, acc, graphs)
    acc.merge()
    return total


def write_back(model: nn.Module, adapter: Adapter, store, by: _Slots) -> None:
    """The trained weights into the blocks (written again by a streamed store) and the final norm."""
    for i in range(len(adapter.blocks(model))):
        block = store.load(i)
        with torch.no_grad():
            for s in by.by_block.get(i, []):
                block.get_submodule(s.name).weight.copy_(s.weight())
        store.update(i)
        store.release(i)
    with store.head(), torch.no_grad():
        w = by.final.weight()
        model.get_submodule(adapter.final_norm).weight.copy_(w)
    store.set_outer(adapter.final_norm, {"weight": w})


def check_batch(batch: int, windows: int) -> None:
    """Refuse a global batch larger than the calibration."""
    if batch > windows:
        raise ValueError(
            f"norm tweaking's batch of {batch} windows is larger than the {windows} calibration "
            "windows: use a smaller --norm-batch or more windows"
        )


def _sync_step(ts: list[Tensor], loss: float, batch: int) -> float:
    """Sum the gradients (and the loss) over ranks and average them over the global batch."""
    for t in ts:
        if t.grad is None:
            t.grad = torch.zeros_like(t)
    loss_t = torch.tensor([loss], dtype=torch.float64)
    dist.all_reduce_grads_([t.grad for t in ts] + [loss_t])
    for t in ts:
        t.grad.div_(batch)
    return float(loss_t.item()) / batch


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Inside, nothing of the model itself trains: no weight gradients (the trained tensors live
    outside it); afterwards its parameters train as they did."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def tune_norms(
    model: nn.Module,
    adapter: Adapter,
    store,
    windows: Tensor,
    targets: list[TopK],
    *,
    epochs: int,
    lr: float,
    batch: int = 1,
    seed: int = 0,
    split_tokens: bool = True,
) -> dict:
    """Train the quantized model's norm weights towards the teacher's `targets` (one per window),
    block by block through `store`; the weights end up in the model. The mean KL per epoch.
    `split_tokens`: whether a one-window step may be cut into token shares (False when the
    activation format scales each tensor as a whole, NVFP4: a share's scale would differ)."""
    check_batch(batch, len(windows))
    slots = collect_slots(model, adapter, store)
    by = _Slots(slots)
    info = train_blockwise(
        model,
        adapter,
        store,
        windows,
        targets,
        by,
        epochs=epochs,
        lr=lr,
        batch=batch,
        seed=seed,
        split_tokens=split_tokens,
        info={"kl_per_epoch": [], "norms": len(slots)},
        desc="tune norms",
    )
    write_back(model, adapter, store, by)
    return info


def train_blockwise(
    model,
    adapter: Adapter,
    store,
    windows: Tensor,
    targets: Sequence[TopK],
    trained,
    *,
    epochs: int,
    lr: float,
    batch: int,
    seed: int,
    split_tokens: bool,
    info: dict,
    desc: str,
) -> dict:
    """AdamW on `trained.params()` (a `_Slots`, or anything with its `call`, `final_weight` and
    `params`) towards the teacher's `targets`, `batch` windows a step in a seeded order, cosine
    schedule, block by block through `store`, nothing of the model itself training; `info`
    gains the mean KL per epoch, the step count, the token shares of a step (1: not cut) and whether
    they ran on several ranks. `desc` names the training in the progress bar and the log."""
    params = trained.params()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = len(windows) // batch  # a last partial batch is left out (another one each epoch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps))
    gen = torch.Generator().manual_seed(seed)
    shares = _token_shares(model, adapter, store, windows, batch) if split_tokens else None
    # one window a step cut into token shares (one a rank), else the batch's windows shared by ranks
    share = range(batch) if shares is not None else dist.shard(batch)
    info = {**info, "kl_per_epoch": [], "steps": 0}
    info["token_shares"] = sequence.share_count(dist.world()) if shares is not None else 1
    info["sequence_parallel"] = shares is not None and dist.world() > 1
    split = sequence.parallel(model) if shares is not None else nullcontext()
    with _frozen(model), split:
        for _ in tqdm(range(epochs), desc=desc, leave=False, disable=not dist.is_main()):
            order, total = torch.randperm(len(windows), generator=gen).tolist(), 0.0
            for s in range(steps):
                mine = order[s * batch : (s + 1) * batch][share.start : share.stop]
                opt.zero_grad(set_to_none=True)
                loss = 0.0  # a rank with no window this step (batch < ranks) adds zero gradients
                if mine:
                    loss = step_grads(
                        model,
                        adapter,
                        store,
                        windows[mine],
                        [targets[j] for j in mine],
                        trained,
                        shares,
                    )
                total += _sync_step(params, loss, batch)
                opt.step()
                sched.step()
                info["steps"] += 1
            info["kl_per_epoch"].append(total / max(1, steps))
    kls = info["kl_per_epoch"]
    if kls:
        log.info("%s: mean KL %.4g (first epoch) -> %.4g (last)", desc, kls[0], kls[-1])
    return info


def _token_shares(
    model, adapter: Adapter, store, windows: Tensor, batch: int
) -> list[sequence.Share] | None:
    """The token shares this process runs of each step's window when steps are cut by tokens (one
    window a step, a causal family whose block calls split by token), else None."""
    if not sequence.applies(batch, windows.shape[1]) or not sequence.causal(model.config):
        return None
    with store.embedding(model):
        probe = capture_block_inputs(model, adapter, windows[:1])
    if not all(sequence.splittable(k) for k in [probe.kwargs, *probe.layer_kwargs]):
        log.info("this family's blocks do not split by tokens: one rank a training step")
        return None
    return sequence.shares(windows.shape[1], model.config)


__all__ = [
    "NormSlot",
    "RelativeScale",
    "collect_slots",
    "step_grads",
    "train_blockwise",
    "tune_norms",
    "tuned_norms",
]
