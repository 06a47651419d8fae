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

Training: the shared block trainer (`duquant.learn.trainer`) with FlatQuant's defaults where they
are settings: 15 epochs, lr 5e-3 for transforms and scales and 10x for the clip logits, batches of 4
windows, AdamW, cosine decay (`flatquant` method; the quick CPU setting is --learn-epochs 2), on
duquant's default calibration set, FlatQuant's too: 128 WikiText-2 windows of 2048 tokens. Where
the shared trainer differs from FlatQuant's code: weight decay 0 (torch's default 0.01 there), decay
to 0 (to lr·1e-3 there), float32 (fp16/bf16 autocast there), and each block trains on the previous
blocks' quantized outputs (the pipeline's chain; FlatQuant feeds the FP model's states). The loss is
FlatQuant's: MSE divided by its detached value (`learn_normalized_loss`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from duquant.formats import QuantSpec
from duquant.formats.e2m1 import E2M1_MAX
from duquant.formats.mxfp4 import AMAX_RULES, global_factor
from duquant.models.adapters import InputGroup
from duquant.plan import HeadShape, fed_by_heads, folds_into_producer
from duquant.transforms.base import ChannelScale, Transform
from duquant.transforms.kronecker import Kronecker, kron_rows

from .trainer import LearnedGroup

CLIP_INIT = 4.0  # FlatQuant's clip logit start: sigmoid(4) = 0.982
CLIP_LR_SCALE = 10.0  # FlatQuant trains the clip logits at 10x the transforms' learning rate


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


def _group_ratio(ratio: Tensor) -> Tensor:
    """A clip ratio (a number, or [rows, 1]) broadcast against grouped values [..., G, 32]."""
    return ratio if ratio.ndim == 0 else ratio.unsqueeze(-1)


def ste_clipped_quant(x: Tensor, ratio: Tensor, spec: QuantSpec) -> Tensor:
    """`spec.fake_quant_clipped(x, ratio)` with straight-through gradients to `x` and `ratio`
    (see the module docstring: elements STE, scale exponent STE in the log domain)."""
    q = spec.fake_quant_clipped(x.detach(), ratio.detach()).to(x.dtype)
    gs = spec.group_size
    g = x.float().unflatten(-1, (-1, gs))
    r = _group_ratio(ratio.float())
    ra = r * g.abs().amax(-1, keepdim=True)
    scale = spec.group_scales(x.detach().float() * ratio.detach()).unsqueeze(-1)
    scale = scale * global_factor(spec.scale_rule)
    live = ra.detach() > 0
    s = torch.where(live, scale * ra / torch.where(live, ra.detach(), 1.0), scale)
    yc = (g / s).clamp(-E2M1_MAX, E2M1_MAX)
    grid = q.detach().float().unflatten(-1, (-1, gs)) / scale
    sur = (yc * s + (grid - yc).detach() * s).flatten(-2)
    return q + (sur - sur.detach()).to(x.dtype)


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
        self.by_heads = fed_by_heads(group, heads)
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
        self.trains_producer = fold and folds_into_producer(group, lead, heads)

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
        return self._rest(x if self.trains_producer else self._lead(x))

    def producer(self, y: Tensor) -> Tensor:
        return self._lead(y) if self.trains_producer else y

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

    def param_groups(self, lr: float) -> list[dict]:
        """Transforms and scales at `lr`, clip logits at 10x (FlatQuant's learning rates)."""
        clips = [self.act_logit, *self.weight_logits.values()]
        ids = {id(p) for p in clips}
        rest = [p for p in self.parameters() if id(p) not in ids]
        return [{"params": rest, "lr": lr}, {"params": clips, "lr": lr * CLIP_LR_SCALE}]

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
