"""Block-wise training of learnable input transforms on the quantized block-output error.

A `LearnedGroup` is the trainable transform of one input group (the linears reading one activation).
`train_block` swaps the group's linears for wrappers that run x -> Q_a(online(x)) · Q_w(weight(W))ᵀ,
with fake quantization through a straight-through estimator, and fits the learnable parameters to
the full-precision block's output on the same inputs (MSE, AdamW). The learned map is handed back
as frozen `Transform` steps, so folding, GPTQ, evaluation and export treat it like any other plan.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from duquant import distributed as dist
from duquant.calibrate import BlockInputs, block_output
from duquant.formats import QuantSpec
from duquant.models.adapters import InputGroup
from duquant.plan import HeadShape, producer_rows
from duquant.qlinear import ste_fake_quant
from duquant.transforms.base import Transform
from duquant.utils import replace_submodule

log = logging.getLogger(__name__)


class LearnedGroup(nn.Module):
    """Trainable transform of one input group: an online activation map and its weight map.

    A group whose leading step folds into its producer's rows at inference (FlatQuant's channel
    scale into up_proj, its per-head factor into v_proj) sets `trains_producer`: the trainer then
    applies `producer` to the producer's output rows and `online` leaves that step out, so what is
    trained is what the folded, quantized model computes.
    """

    trains_producer: bool = False

    def online(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Differentiable x -> x·A."""
        raise NotImplementedError

    def weight(self, w: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Differentiable W -> W·A^-T (rows of W are outputs)."""
        raise NotImplementedError

    def quant_act(self, x: Tensor, spec: QuantSpec | None) -> Tensor:
        """The activation quantizer seen in training."""
        return ste_fake_quant(x, spec)

    def quant_weight(self, w: Tensor, spec: QuantSpec | None, linear: str) -> Tensor:
        """The weight quantizer seen in training (per linear: clipping may differ)."""
        return ste_fake_quant(w, spec)

    def steps(self) -> list[Transform]:  # pragma: no cover - abstract
        """The learned map as frozen duquant Transforms."""
        raise NotImplementedError

    def producer(self, y: Tensor) -> Tensor:
        """Differentiable map of the producer's output (columns) that folds there (identity)."""
        return y

    def param_groups(self, lr: float) -> list[dict]:
        """The optimizer's parameter groups (one learning rate unless a learner says otherwise)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def clips(self) -> tuple[float | None, dict[str, Tensor]]:
        """Learned clip ratios for the plan: (activation, per-linear weight rows); none here."""
        return None, {}


class _TrainLinear(nn.Module):
    """A linear of a group during training: Q_a(online(x)) · Q_w(weight(W))ᵀ + b."""

    def __init__(
        self,
        linear: nn.Linear,
        learned: LearnedGroup,
        name: str,
        act: QuantSpec | None,
        weight: QuantSpec | None,
        cache: dict,
    ):
        super().__init__()
        self.linear, self.learned, self.name = linear, learned, name
        self.act, self.wspec, self.cache = act, weight, cache
        self.register_buffer("w", linear.weight.detach().float(), persistent=False)
        self.folds: list[tuple[LearnedGroup, slice]] = []  # consumers folding into our rows

    def _folded(self) -> tuple[Tensor, Tensor | None]:
        """(weight, bias) after the consumers' producer-side steps, as the pipeline folds them:
        W[rows] <- producer(W[rows]ᵀ)ᵀ and b[rows] <- producer(b[rows])."""
        w = self.w
        b = None if self.linear.bias is None else self.linear.bias.float()
        for lg, rows in self.folds:
            w = torch.cat([w[: rows.start], lg.producer(w[rows].T).T, w[rows.stop :]])
            if b is not None:
                b = torch.cat([b[: rows.start], lg.producer(b[rows]), b[rows.stop :]])
        return w, b

    def forward(self, x: Tensor) -> Tensor:
        # the group's linears receive the same tensor: transform and quantize it once per forward
        ref = self.cache.get("input")
        if ref is not None and ref() is x:
            xa = self.cache["output"]
        else:
            xa = self.learned.quant_act(self.learned.online(x.float()), self.act)
            self.cache["input"], self.cache["output"] = weakref.ref(x), xa
        w, bias = self._folded()
        wq = self.learned.quant_weight(self.learned.weight(w), self.wspec, self.name)
        return F.linear(xa, wq, bias).to(x.dtype)


@contextmanager
def quantized_wrappers(
    block: nn.Module,
    groups: tuple[InputGroup, ...],
    learned: dict[str, LearnedGroup],
    quant,
    heads: HeadShape | None = None,
) -> Iterator[list[dict]]:
    """The block with its learned groups' linears swapped for training-time quantized wrappers
    (restored on exit, the block's own parameters frozen meanwhile); yields the input caches."""
    swapped: dict[str, nn.Module] = {}
    caches: list[dict] = []
    frozen = [p for p in block.parameters() if p.requires_grad]
    block.requires_grad_(False)  # before the swap: the wrappers hold the learned parameters
    try:
        for g in groups:
            if g.name not in learned:
                continue
            cache: dict = {}
            caches.append(cache)
            for name in g.linears:
                wrapper = _TrainLinear(
                    block.get_submodule(name), learned[g.name], name, quant.act, quant.weight, cache
                )
                swapped[name] = replace_submodule(block, name, wrapper)
        for g in groups:  # producer-side steps train in the producer's rows (`trains_producer`)
            lg = learned.get(g.name)
            if lg is not None and lg.trains_producer:
                prod = block.get_submodule(g.producer)
                if not isinstance(prod, _TrainLinear):
                    raise ValueError(f"{g.name}: its producer {g.producer} has no learned group")
                prod.folds.append((lg, producer_rows(g, prod.w.shape[0], heads)))
        yield caches
    finally:
        for name, original in swapped.items():
            replace_submodule(block, name, original)
        _clear(caches)
        for p in frozen:
            p.requires_grad_(True)


@torch.no_grad()
def quantized_outputs(
    block: nn.Module,
    groups: tuple[InputGroup, ...],
    inputs: BlockInputs,
    learned: dict[str, LearnedGroup],
    quant,
    heads: HeadShape | None = None,
) -> list[Tensor]:
    """The block's outputs under the training-time quantized forward, one per input window."""
    outs = []
    with quantized_wrappers(block, groups, learned, quant, heads) as caches:
        for h in inputs.hidden:
            outs.append(block_output(block, h, inputs.kwargs))
            _clear(caches)
    return outs


def train_block(
    block: nn.Module,
    groups: tuple[InputGroup, ...],
    inputs: BlockInputs,
    learned: dict[str, LearnedGroup],
    quant,
    *,
    epochs: int,
    lr: float,
    batch: int,
    seed: int,
    heads: HeadShape | None = None,
    normalize_loss: bool = False,
    targets: list[Tensor] | None = None,
) -> dict:
    """Fit `learned` (per group name) to the full-precision outputs of `block` on `inputs`, or to
    `targets` (e.g. the full-precision model's own outputs of this block, whose inputs did not pass
    through quantized blocks: then training also corrects the error accumulated before).

    `normalize_loss` steps on MSE / its detached value (FlatQuant): the gradient's direction,
    whatever the block's error size, where Adam's epsilon would damp a tiny loss's steps.

    The block's own weights stay as they are; on return its linears are back in place and the
    learned groups hold the trained parameters. Returns the loss before and after training (on the first `batch` windows).
    """
    hidden = [h.detach() for h in inputs.hidden]
    if targets is None:
        with torch.no_grad():
            targets = [block_output(block, h, inputs.kwargs).detach().float() for h in hidden]
    targets = [t.float() for t in targets]
    param_groups = [pg for g in learned.values() for pg in g.param_groups(lr)]
    params = [p for pg in param_groups for p in pg["params"]]
    # under torch.distributed `hidden` are this rank's windows, from global index `first` on
    n_total = dist.sum_int(len(hidden))
    first = dist.shard_start(n_total)
    mine = _Shard(first, len(hidden))
    with quantized_wrappers(block, groups, learned, quant, heads) as caches:
        # the reported losses: on the first windows only (a full pass costs an epoch's forwards)
        probe = range(min(batch, n_total))
        loss0 = _mean_loss(
            block, hidden, targets, mine.local(probe), len(probe), inputs.kwargs, caches
        )
        info = {"loss_before": loss0, "steps": 0}
        if not params or epochs <= 0:
            info["loss_after"] = loss0
            return info
        opt = torch.optim.AdamW(param_groups, lr=lr, weight_decay=0.0)
        n_batches = math.ceil(n_total / batch)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * n_batches)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(n_total, generator=gen).tolist()
            for b in range(n_batches):
                idx = order[b * batch : (b + 1) * batch]
                opt.zero_grad(set_to_none=True)
                with torch.enable_grad():  # the pipeline runs under no_grad
                    local = mine.local(idx)
                    _backward(
                        block, hidden, targets, local, len(idx), inputs.kwargs, normalize_loss
                    )
                _sum_grads(params)
                opt.step()
                sched.step()
                _clear(caches)
                info["steps"] += 1
        info["loss_after"] = _mean_loss(
            block, hidden, targets, mine.local(probe), len(probe), inputs.kwargs, caches
        )
        return info


class _Shard:
    """Which global window indices this rank holds (`count` windows from `first` on)."""

    def __init__(self, first: int, count: int) -> None:
        self.first, self.count = first, count

    def local(self, idx) -> list[int]:
        """The local positions of the global indices `idx` this rank holds, in `idx`'s order."""
        return [i - self.first for i in idx if self.first <= i < self.first + self.count]


def _backward(block, hidden, targets, local: list[int], n_batch: int, kwargs, normalize: bool):
    """Backpropagate this rank's part of one batch's MSE (weighted by its share of the batch, so
    the gradients summed over ranks are those of the whole batch's mean)."""
    loss = None
    if local:
        h = torch.cat([hidden[i] for i in local])
        t = torch.cat([targets[i] for i in local])
        loss = F.mse_loss(block_output(block, h, kwargs).float(), t)
        if len(local) != n_batch:
            loss = loss * (len(local) / n_batch)
    if normalize:
        whole = dist.all_reduce_(loss.detach().clone() if loss is not None else torch.zeros(()))
        if whole.item() > 0:
            loss = loss / whole if loss is not None else None
    if loss is not None:
        loss.backward()


def _sum_grads(params: list[Tensor]) -> None:
    """Gradients summed over ranks (a rank with no window in the batch adds zeros)."""
    if not dist.active():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    dist.all_reduce_grads_([p.grad for p in params])


def _clear(caches: list[dict]) -> None:
    """Forget the cached transformed activations (they hold autograd graphs)."""
    for c in caches:
        c.clear()


@torch.no_grad()
def _mean_loss(
    block: nn.Module,
    hidden: list[Tensor],
    targets: list[Tensor],
    local: list[int],
    count: int,
    kwargs: dict,
    caches: list[dict],
) -> float:
    """Mean MSE of the (wrapped) block against the targets over `count` windows, of which this
    rank holds those at `local` (summed over ranks)."""
    total = 0.0
    for i in local:
        total += F.mse_loss(block_output(block, hidden[i], kwargs).float(), targets[i]).item()
        _clear(caches)
    if dist.active():
        total = sum(dist.gather_objects(total))
    return total / max(1, count)
