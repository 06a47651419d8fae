"""FlatQuant (Sun et al., 2024, arXiv 2410.09426) on the MX grid: learned affine transforms per input.

Per input group (q/k/v, gate/up, down_proj, o_proj inputs) a learnable invertible map, trained
block by block on the MSE between the full-precision block output and the quantized one:

* an affine transform P = P1 ⊗ P2 (`Kronecker`), factor sizes n1 x n2 = n with n1, n2 the closest
  pair around sqrt(n) (`decompose_dim`); each factor in FlatQuant's SVD form U·diag(σ)·Vᵀ, U and V
  orthogonal (here Q0·cayley(B - Bᵀ), Q0 a seeded random orthogonal start, B from 0), σ from 1, so
  P starts random orthogonal and P⁻ᵀ = U·diag(1/σ)·Vᵀ is exact. The o_proj input gets the heads x
  heads factor online and the head_dim x head_dim one inside every head, which folds into v_proj's
  rows (FlatQuant's o_trans and its v-cache transform); FlatQuant's K/V-cache transforms themselves
  are not used: duquant quantizes linear inputs only;
* a per-channel scale (x -> x·d, W -> W / d; `d` = 1 / ChannelScale.scale) on the q/k/v, gate/up and
  down_proj inputs, started SmoothQuant-style with α = 0.3, folded into the RMSNorm or up_proj rows;
* learnable clipping: one ratio σ(θ) for the activations of each input, one per output row of each
  weight, θ started at 4 (σ = 0.982). On MXFP4 the ratio scales each 32-group's maximum before the
  E8M0 scale rule and values beyond 6·scale saturate. FlatQuant clips max and min separately (its
  INT grid may be asymmetric); E2M1 is symmetric, so one ratio a row / input here.

Gradients: elements by the straight-through estimator (E2M1 rounding is the identity backwards,
saturated elements pass none, and d q / d scale = round(x/s) - x/s in range, ±6 saturated, LSQ's
form); the E8M0 exponent rounding of the scale is straight-through in the log domain (d log s =
d log(ratio·amax)), so the clip ratio and the group maximum receive gradient although the power of
two they select is piecewise constant. The value computed is `QuantSpec.fake_quant_clipped` exactly,
which the online input quantizer and the weight quantizer compute at inference.

Training (FlatQuant's defaults): AdamW (torch defaults, weight decay 0.01), lr 5e-3 for the
transforms and scales and 10x for the clip logits, cosine decay to lr·1e-3 over all steps, 15 epochs,
batches of 4 windows, loss MSE / its own detached value; each block sees the full-precision model's
hidden states (the previous block's FP outputs), as FlatQuant does. Float32 throughout (FlatQuant
trains under fp16/bf16 autocast on GPU).
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from duquant.calibrate import BlockInputs
from duquant.formats import QuantSpec
from duquant.formats.e2m1 import E2M1_MAX
from duquant.formats.mxfp4 import AMAX_RULES, global_factor
from duquant.methods.build import (
    GroupPlan,
    HeadShape,
    folds_into_producer,
    plan_from_steps,
    producer_rows,
)
from duquant.models.adapters import InputGroup
from duquant.transforms.base import ChannelScale, Transform
from duquant.transforms.kronecker import Kronecker, kron_rows

log = logging.getLogger(__name__)

CLIP_INIT = 4.0  # FlatQuant's clip logit start: sigmoid(4) = 0.982


def check_quant(quant) -> None:
    """Refuse formats FlatQuant's clipping is not defined on here (MXFP4, a group-maximum rule)."""
    for what, spec in (("weight", quant.weight), ("activation", quant.act)):
        if spec is None:
            continue
        if spec.format != "mxfp4" or spec.scale_rule not in AMAX_RULES:
            raise ValueError(
                f"flatquant learns clipping on MXFP4 scales chosen from the group maximum; the "
                f"{what} spec {spec.format}/{spec.scale_rule} is not one: use --format mxfp4 with a "
                f"scale rule among {', '.join(AMAX_RULES)}"
            )


def decompose_dim(n: int) -> tuple[int, int]:
    """FlatQuant's Kronecker factor sizes of width n: (a - b, a + b) with a² - b² = n, a the
    smallest integer >= sqrt(n) for which a² - n is a square (the pair closest to sqrt(n))."""
    a = math.isqrt(n)
    if a * a < n:
        a += 1
    while True:
        b = math.isqrt(a * a - n)
        if b * b == a * a - n:
            return a - b, a + b
        a += 1


def random_orthogonal(n: int, gen: torch.Generator) -> Tensor:
    """A Haar-random orthogonal n x n matrix (QR of a Gaussian, signs fixed by R's diagonal)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


class _Orthogonal(nn.Module):
    """Q0·cayley(B - Bᵀ): orthogonal for every B, Q0 at B = 0."""

    def __init__(self, start: Tensor):
        super().__init__()
        self.register_buffer("start", start.float())
        self.skew = nn.Parameter(torch.zeros_like(self.start))

    def forward(self) -> Tensor:
        k = self.skew - self.skew.T
        eye = torch.eye(k.shape[0], dtype=k.dtype)
        return self.start @ torch.linalg.solve(eye + k, eye - k)


class _Invertible(nn.Module):
    """P = U·diag(σ)·Vᵀ with U, V orthogonal (FlatQuant's SVD form): invertible while σ != 0."""

    def __init__(self, n: int, gen: torch.Generator):
        super().__init__()
        self.u = _Orthogonal(random_orthogonal(n, gen))
        self.v = _Orthogonal(random_orthogonal(n, gen))
        self.sigma = nn.Parameter(torch.ones(n))

    def pair(self) -> tuple[Tensor, Tensor]:
        """(P, P⁻ᵀ = U·diag(1/σ)·Vᵀ)."""
        u, v = self.u(), self.v()
        return (u * self.sigma) @ v.T, (u / self.sigma) @ v.T


def _group_ratio(ratio: Tensor, g: Tensor) -> Tensor:
    """A clip ratio (a number, or [rows, 1]) broadcast against grouped values [..., G, 32]."""
    return ratio if ratio.ndim == 0 else ratio.unsqueeze(-1)


def ste_clipped_quant(x: Tensor, ratio: Tensor, spec: QuantSpec) -> Tensor:
    """`spec.fake_quant_clipped(x, ratio)` with straight-through gradients to `x` and `ratio`
    (see the module docstring: elements STE, scale exponent STE in the log domain)."""
    q = spec.fake_quant_clipped(x.detach(), ratio.detach()).to(x.dtype)
    gs = spec.group_size
    g = x.float().unflatten(-1, (-1, gs))
    r = _group_ratio(ratio.float(), g)
    ra = r * g.abs().amax(-1, keepdim=True)
    scale = spec.group_scales(x.detach().float() * ratio.detach()).unsqueeze(-1)
    scale = scale * global_factor(spec.scale_rule)
    live = ra.detach() > 0
    s = torch.where(live, scale * ra / torch.where(live, ra.detach(), 1.0), scale)
    yc = (g / s).clamp(-E2M1_MAX, E2M1_MAX)
    grid = q.detach().float().unflatten(-1, (-1, gs)) / scale
    sur = (yc * s + (grid - yc).detach() * s).flatten(-2)
    return q + (sur - sur.detach()).to(x.dtype)


class LearnedGroup(nn.Module):
    """A trainable transform of one input group (the lead's `learn.trainer` contract)."""

    def online(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Differentiable activation map x -> x·A (what stays online)."""
        raise NotImplementedError

    def weight(self, w: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Differentiable weight map W -> W·A⁻ᵀ (rows of W are outputs)."""
        raise NotImplementedError

    def producer(self, y: Tensor) -> Tensor:
        """Differentiable map of the producer's output (columns) that folds there; identity here."""
        return y

    def quant_act(self, x: Tensor, spec: QuantSpec | None) -> Tensor:
        """Fake-quantized activations, straight-through."""
        return x if spec is None else x + (spec.fake_quant(x.detach()).to(x.dtype) - x).detach()

    def quant_weight(self, w: Tensor, spec: QuantSpec | None, linear: str) -> Tensor:
        """Fake-quantized weight of `linear`, straight-through."""
        return w if spec is None else w + (spec.fake_quant(w.detach()).to(w.dtype) - w).detach()

    def steps(self) -> list[Transform]:  # pragma: no cover - abstract
        """Frozen duquant Transforms equal to the learned map (producer part first)."""
        raise NotImplementedError


def _key(linear: str) -> str:
    """A ParameterDict key for a linear's dotted name."""
    return linear.replace(".", "__")


class FlatQuantGroup(LearnedGroup):
    """FlatQuant's learned map of one input group: channel scale, Kronecker transform, clipping."""

    def __init__(
        self,
        group: InputGroup,
        weights: dict[str, Tensor],
        absmax: Tensor | None,
        heads: HeadShape | None,
        gen: torch.Generator,
        alpha: float = 0.3,
        clip_init: float = CLIP_INIT,
        fold: bool = True,
    ):
        super().__init__()
        n = next(iter(weights.values())).shape[1]
        self.by_heads = bool(group.heads and heads is not None)
        if self.by_heads:  # heads x heads online, head_dim x head_dim inside each head
            n1, n2 = heads.n_heads, heads.head_dim
        else:
            n1, n2 = decompose_dim(n)
        self.left, self.right = _Invertible(n1, gen), _Invertible(n2, gen)
        self.diag = None
        if not self.by_heads:
            # FlatQuant's SmoothQuant-style start: d = max|W|^(1-α) / max|x|^α, x·d, W / d
            w_max = torch.cat(list(weights.values())).abs().amax(dim=0).float()
            x_max = torch.ones(n) if absmax is None else absmax.float().clamp(min=1e-5)
            self.diag = nn.Parameter((w_max.pow(1 - alpha) / x_max.pow(alpha)).clamp(min=1e-5))
        self.act_logit = nn.Parameter(torch.tensor(float(clip_init)))
        self.weight_logits = nn.ParameterDict(
            {
                _key(k): nn.Parameter(torch.full((w.shape[0], 1), float(clip_init)))
                for k, w in weights.items()
            }
        )
        lead = self._frozen()[0]
        # the leading step moves into v_proj / up_proj rows at inference: train it there too
        self.split = fold and folds_into_producer(group, lead, heads)

    # -- the map ---------------------------------------------------------------------------
    def _scale(self) -> Tensor | None:
        """ChannelScale's scale s = 1 / d (x -> x / s)."""
        return None if self.diag is None else 1.0 / self.diag

    def _lead(self, x: Tensor, inv_t: bool = False) -> Tensor:
        """The leading step on activations (or weights with `inv_t`): scale, or per-head factor."""
        if self.by_heads:
            p, pit = self.right.pair()
            return kron_rows(x, None, pit if inv_t else p)
        s = self._scale()
        return x * s if inv_t else x / s

    def _rest(self, x: Tensor, inv_t: bool = False) -> Tensor:
        """The Kronecker step (the heads factor for the o_proj input)."""
        lp, lit = self.left.pair()
        if self.by_heads:
            return kron_rows(x, lit if inv_t else lp, None)
        rp, rit = self.right.pair()
        return kron_rows(x, lit, rit) if inv_t else kron_rows(x, lp, rp)

    def online(self, x: Tensor) -> Tensor:
        return self._rest(x if self.split else self._lead(x))

    def producer(self, y: Tensor) -> Tensor:
        return self._lead(y) if self.split else y

    def weight(self, w: Tensor) -> Tensor:
        return self._rest(self._lead(w, inv_t=True), inv_t=True)

    # -- clipping ---------------------------------------------------------------------------
    def act_clip(self) -> Tensor:
        """The activation clip ratio σ(θ_a)."""
        return torch.sigmoid(self.act_logit)

    def weight_clip(self, linear: str) -> Tensor:
        """The per-row weight clip ratios σ(θ_w) [out, 1] of `linear`."""
        return torch.sigmoid(self.weight_logits[_key(linear)])

    def quant_act(self, x: Tensor, spec: QuantSpec | None) -> Tensor:
        return x if spec is None else ste_clipped_quant(x, self.act_clip(), spec)

    def quant_weight(self, w: Tensor, spec: QuantSpec | None, linear: str) -> Tensor:
        return w if spec is None else ste_clipped_quant(w, self.weight_clip(linear), spec)

    def clip_parameters(self) -> list[nn.Parameter]:
        """The clip logits (FlatQuant trains them at 10x the transforms' learning rate)."""
        return [self.act_logit, *self.weight_logits.values()]

    # -- frozen ---------------------------------------------------------------------------
    @torch.no_grad()
    def _frozen(self) -> list[Transform]:
        lp, lit = self.left.pair()
        rp, rit = self.right.pair()
        if self.by_heads:
            return [Kronecker(None, rp, None, rit), Kronecker(lp, None, lit, None)]
        return [ChannelScale(self._scale()), Kronecker(lp, rp, lit, rit)]

    def steps(self) -> list[Transform]:
        return self._frozen()

    @torch.no_grad()
    def clips(self) -> tuple[float, dict[str, Tensor]]:
        """(activation clip ratio, per-linear weight clip ratios [out, 1]) for the GroupPlan."""
        weight = {
            k.replace("__", "."): torch.sigmoid(v).clone() for k, v in self.weight_logits.items()
        }
        return float(self.act_clip()), weight


# ------------------------------------------------------------------------------ training
class _SharedInput(nn.Module):
    """The online map and activation quantization of one group, computed once per input tensor."""

    def __init__(self, lg: LearnedGroup, spec: QuantSpec | None):
        super().__init__()
        self.lg, self.spec = lg, spec
        self._last: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        y = self.lg.quant_act(self.lg.online(x), self.spec)
        self._last = (x, y)
        return y


class _TrainLinear(nn.Module):
    """A linear during training: W through producer folds and the group's weight map, quantized."""

    def __init__(self, linear: nn.Linear, name: str, lg, shared, spec, folds):
        super().__init__()
        self.linear, self.name, self.lg, self.shared, self.spec = linear, name, lg, shared, spec
        self.folds = folds  # [(consumer LearnedGroup, rows of this linear's output it produces)]

    def effective_weight(self) -> tuple[Tensor, Tensor | None]:
        """(quantized weight, bias) as the pipeline builds them: folds, then the weight map."""
        w = self.linear.weight.float()
        b = None if self.linear.bias is None else self.linear.bias.float()
        for lg, rows in self.folds:  # W[rows] <- producer(W[rows]ᵀ)ᵀ, b[rows] <- producer(b[rows])
            w = torch.cat([w[: rows.start], lg.producer(w[rows].T).T, w[rows.stop :]])
            if b is not None:
                b = torch.cat([b[: rows.start], lg.producer(b[rows]), b[rows.stop :]])
        return self.lg.quant_weight(self.lg.weight(w), self.spec, self.name), b

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.effective_weight()
        return F.linear(self.shared(x), w.to(x.dtype), None if b is None else b.to(x.dtype))


def _swap(block: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put `module` at `name` in `block`; return what was there."""
    parent, _, attr = name.rpartition(".")
    owner = block.get_submodule(parent) if parent else block
    old = getattr(owner, attr)
    setattr(owner, attr, module)
    return old


def _block_out(block: nn.Module, h: Tensor, kwargs: dict) -> Tensor:
    """The block's hidden-state output."""
    out = block(h, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def _quantized_linears(block, groups, learned, quant, heads):
    """The block with its groups' linears swapped for training-time quantized wrappers, restored
    on exit; yields the wrappers by linear name."""
    wrappers: dict[str, _TrainLinear] = {}
    for g in groups:
        shared = _SharedInput(learned[g.name], quant.act)
        for name in g.linears:
            wrappers[name] = _TrainLinear(
                block.get_submodule(name), name, learned[g.name], shared, quant.weight, []
            )
    for g in groups:  # a consumer's producer-side step goes into its producer's rows
        lg = learned[g.name]
        if getattr(lg, "split", False):
            prod = wrappers[g.producer]
            prod.folds.append((lg, producer_rows(g, prod.linear.weight.shape[0], heads)))
    originals = {name: _swap(block, name, w) for name, w in wrappers.items()}
    try:
        yield wrappers
    finally:
        for name, lin in originals.items():
            _swap(block, name, lin)


def _forget(wrappers: dict) -> None:
    """Drop the cached quantized inputs (and the graph they hold)."""
    for w in wrappers.values():
        w.shared._last = None


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
    clip_lr_scale: float = 10.0,
) -> dict:
    """Train `learned` so the quantized block matches its full-precision output on `inputs`.

    Returns the loss per epoch, the seconds taken and `fp_outputs` (the block's full-precision
    outputs, FlatQuant's inputs for the next block). The block's linears are restored afterwards.
    """
    start = time.perf_counter()
    with torch.no_grad():
        targets = [_block_out(block, h, inputs.kwargs) for h in inputs.hidden]
    main, clips = [], []
    for lg in learned.values():
        ids = {id(p) for p in getattr(lg, "clip_parameters", list)()}
        clips += [p for p in lg.parameters() if id(p) in ids]
        main += [p for p in lg.parameters() if id(p) not in ids]
    n = len(inputs.hidden)
    per_epoch = max(1, n // batch)
    opt = torch.optim.AdamW(
        [{"params": main, "lr": lr}, {"params": clips, "lr": lr * clip_lr_scale}]
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=epochs * per_epoch, eta_min=lr * 1e-3
    )
    losses: list[float] = []
    first = None
    gen = torch.Generator().manual_seed(seed)
    for p in main + clips:
        p.requires_grad_(True)
    try:
        with (
            _quantized_linears(block, groups, learned, quant, heads) as wrappers,
            torch.enable_grad(),
        ):
            for _ in tqdm(range(epochs), desc="flatquant epochs", leave=False):
                order = torch.randperm(n, generator=gen).tolist()
                total = 0.0
                for j in range(per_epoch):
                    idx = order[j * batch : (j + 1) * batch]
                    out = _block_out(
                        block, torch.cat([inputs.hidden[k] for k in idx]), inputs.kwargs
                    )
                    loss = F.mse_loss(out.float(), torch.cat([targets[k] for k in idx]).float())
                    first = loss.item() if first is None else first
                    opt.zero_grad(set_to_none=True)
                    if loss.item() > 0:  # nothing to learn from an exact match (0 / 0 below)
                        (loss / loss.detach()).backward()  # FlatQuant's normalised loss
                        opt.step()
                    sched.step()
                    _forget(wrappers)
                    total += loss.item()
                losses.append(total / per_epoch)
    finally:
        for p in main + clips:
            p.requires_grad_(False)
    return {
        "loss_first_step": first,
        "loss_per_epoch": losses,
        "seconds": time.perf_counter() - start,
        "fp_outputs": targets,
    }


@torch.no_grad()
def quantized_block_loss(
    block: nn.Module,
    groups: tuple[InputGroup, ...],
    inputs: BlockInputs,
    learned: dict[str, LearnedGroup],
    quant,
    heads: HeadShape | None = None,
) -> tuple[float, list[Tensor]]:
    """(MSE to the FP outputs, outputs) of the block under the training-time quantized forward."""
    targets = [_block_out(block, h, inputs.kwargs) for h in inputs.hidden]
    outs = []
    with _quantized_linears(block, groups, learned, quant, heads) as wrappers:
        for h in inputs.hidden:
            outs.append(_block_out(block, h, inputs.kwargs))
            _forget(wrappers)
    mse = sum(F.mse_loss(o, t).item() for o, t in zip(outs, targets, strict=True)) / len(outs)
    return mse, outs


def learned_plans(
    learned: dict[str, FlatQuantGroup],
    groups: tuple[InputGroup, ...],
    heads: HeadShape | None,
    fold: bool = True,
) -> dict[str, GroupPlan]:
    """The pipeline's plan of every group from its trained map: frozen steps and clip ratios."""
    plans = {}
    for g in groups:
        act_clip, weight_clip = learned[g.name].clips()
        plans[g.name] = plan_from_steps(
            learned[g.name].steps(), g, heads, fold, act_clip=act_clip, weight_clip=weight_clip
        )
    return plans
