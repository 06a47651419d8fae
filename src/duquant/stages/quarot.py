"""QuaRot: a global randomized Hadamard on the residual stream, fused into the weights where exact.

1. RMSNorm weights are multiplied into the linears that read them (q/k/v, gate/up, lm_head) and set
   to one, so each norm commutes with an orthogonal map of the residual stream.
2. The residual stream is rotated by Q = diag(±1)·H/√d: embeddings W_E·Q, every reader W·Q, every
   writer (o_proj, down_proj) Qᵀ·W. Tied embeddings are untied first (embedding and head then differ).
   Norms that scale by (1 + w) (Gemma) are absorbed as such; post-norms (Gemma 3) cannot be
   passed by the rotation, and the adapter refuses the method for them.
3. v_proj's output rows get a head-wise Hadamard and o_proj's input the same (exact per head). QuaRot
   also mixes across heads online when the head count has a Hadamard matrix; 9 heads (SmolLM2) has none.
4. down_proj's input (each expert's, in a MoE) gets an online Hadamard of its width (returned
   for the pipeline). A MoE router reads the residual stream like q/k/v and is rotated likewise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from duquant.models.adapters import Adapter
from duquant.models.moe import unfuse_experts
from duquant.plan import GroupPlan, HeadShape, producer_rows
from duquant.stages.base import Stage
from duquant.transforms.base import BlockRotation, transform_output_rows
from duquant.transforms.hadamard import KroneckerHadamard, hadamard, random_signs


@dataclass(frozen=True)
class QuaRot(Stage):
    """QuaRot's global randomized Hadamard on the residual stream (see the module docstring)."""

    KIND: ClassVar[str] = "quarot"

    @property
    def whole_model(self) -> str | None:
        return "rotates the whole model at once (embeddings, every block, the head)"

    def transform_model(self, ctx) -> None:
        """Rotate the model in place; keep the online transforms each block's inputs get."""
        unfuse_experts(ctx.model, ctx.adapter)
        ctx.global_online = apply_quarot(ctx.model, ctx.adapter, ctx.seed)

    def refine_block(self, ctx, block, groups, plans: dict, stats, index: int) -> dict:
        """The inputs QuaRot rotates online (down_proj) take its transform as their plan."""
        out = dict(plans)
        for name, online in ctx.global_online.items():
            if name in out:
                out[name] = GroupPlan(weight_transform=online, online=online)
        return out


def _scale_columns(linear: nn.Linear, scale: torch.Tensor) -> None:
    """W <- W · diag(scale) (absorb a norm weight into a reader)."""
    linear.weight.data = (linear.weight.data.float() * scale.float()).to(linear.weight.dtype)


def _rotate_input(linear: nn.Module, q: torch.Tensor) -> None:
    """W <- W · Q."""
    linear.weight.data = (linear.weight.data.double() @ q).to(linear.weight.dtype)


def _rotate_output(linear: nn.Linear, q: torch.Tensor) -> None:
    """W <- Qᵀ · W (and b <- b · Q): the output is rotated by Q."""
    linear.weight.data = (q.T @ linear.weight.data.double()).to(linear.weight.dtype)
    if linear.bias is not None:
        linear.bias.data = (linear.bias.data.double() @ q).to(linear.bias.dtype)


def _absorb_norm(norm: nn.Module, readers: list[nn.Module], offset: float) -> None:
    """Multiply the norm's scale (offset + w) into its readers' columns and make it the identity."""
    scale = norm.weight.data.float() + offset
    for lin in readers:
        _scale_columns(lin, scale)
    norm.weight.data.fill_(1.0 - offset)


@torch.no_grad()
def apply_quarot(model: nn.Module, adapter: Adapter, seed: int = 0) -> dict[str, KroneckerHadamard]:
    """Rotate `model` in place; return the online transforms the pipeline must add per input group
    (the adapter's refusal of a global rotation is checked before: duquant.pipeline)."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    hidden = cfg.hidden_size
    q = KroneckerHadamard(hidden, random_signs(hidden, gen)).forward(
        torch.eye(hidden, dtype=torch.float64)
    )
    heads = HeadShape.of(cfg)
    head_rot = BlockRotation(hadamard(heads.head_dim))

    embed = model.get_submodule(adapter.embed)
    head = model.get_submodule(adapter.lm_head)
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
        if hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    _absorb_norm(model.get_submodule(adapter.final_norm), [head], adapter.norm_offset)
    embed.weight.data = (embed.weight.data.double() @ q).to(embed.weight.dtype)
    _rotate_input(head, q)

    online: dict[str, KroneckerHadamard] = {}
    for block in adapter.blocks(model):
        for group in adapter.block_groups(block):
            linears = [block.get_submodule(n) for n in group.linears]
            if group.reads_residual:  # residual readers, full-precision ones (a router) included
                readers = linears + [block.get_submodule(n) for n in group.fp_readers]
                _absorb_norm(block.get_submodule(group.norm), readers, adapter.norm_offset)
                for lin in readers:
                    _rotate_input(lin, q)
                continue
            for lin in linears:  # o_proj / down_proj write the residual stream
                _rotate_output(lin, q)
            if group.heads:  # head-wise Hadamard: v's output rows and o's input, exact per head
                producer = block.get_submodule(group.producer)
                rows = producer_rows(group, producer.weight.shape[0], heads)
                transform_output_rows(producer, head_rot, rows, compute=torch.float64)
                for lin in linears:
                    lin.weight.data = head_rot.weight(lin.weight.data.double()).to(lin.weight.dtype)
            else:  # the MLP's inner activation: an online Hadamard of its width
                online.setdefault(group.name, KroneckerHadamard(linears[0].in_features))
    return online
