"""QuaRot: a global randomized Hadamard on the residual stream, fused into the weights where exact.

1. RMSNorm weights are multiplied into the linears that read them (q/k/v, gate/up, lm_head) and set
   to one, so each norm commutes with an orthogonal map of the residual stream.
2. The residual stream is rotated by Q = diag(±1)·H/√d: embeddings W_E·Q, every reader W·Q, every
   writer (o_proj, down_proj) Qᵀ·W. Tied embeddings are untied first (embedding and head then differ).
3. v_proj's output rows get a head-wise Hadamard and o_proj's input the same (exact per head). QuaRot
   also mixes across heads online when the head count has a Hadamard matrix; 9 heads (SmolLM2) has none.
4. down_proj's input gets an online Hadamard of the intermediate width (returned for the pipeline).
"""

from __future__ import annotations

import torch
from torch import nn

from duquant.models.adapters import Adapter
from duquant.transforms.base import BlockRotation
from duquant.transforms.hadamard import KroneckerHadamard, hadamard, random_signs


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


@torch.no_grad()
def apply_quarot(model: nn.Module, adapter: Adapter, seed: int = 0) -> dict[str, KroneckerHadamard]:
    """Rotate `model` in place; return the online transforms the pipeline must add per input group."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    hidden = cfg.hidden_size
    q = KroneckerHadamard(hidden, random_signs(hidden, gen)).forward(
        torch.eye(hidden, dtype=torch.float64)
    )
    head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    h_head = hadamard(head_dim)

    embed = model.get_submodule(adapter.embed)
    head = model.get_submodule(adapter.lm_head)
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
        if hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    final_norm = model.get_submodule(adapter.final_norm)
    _scale_columns(head, final_norm.weight.data)
    final_norm.weight.data.fill_(1.0)
    embed.weight.data = (embed.weight.data.double() @ q).to(embed.weight.dtype)
    _rotate_input(head, q)

    for block in adapter.blocks(model):
        for group in adapter.groups:
            linears = [block.get_submodule(n) for n in group.linears]
            if group.norm is not None:  # residual readers
                norm = block.get_submodule(group.norm)
                for lin in linears:
                    _scale_columns(lin, norm.weight.data)
                    _rotate_input(lin, q)
                norm.weight.data.fill_(1.0)
            else:  # o_proj / down_proj write the residual stream
                for lin in linears:
                    _rotate_output(lin, q)
        v = block.get_submodule("self_attn.v_proj")
        o = block.get_submodule("self_attn.o_proj")
        head_rot = BlockRotation(h_head)
        v.weight.data = head_rot(v.weight.data.double().T).T.to(v.weight.dtype).contiguous()
        if v.bias is not None:
            v.bias.data = head_rot(v.bias.data.double()).to(v.bias.dtype)
        o.weight.data = head_rot.weight(o.weight.data.double()).to(o.weight.dtype)
    return {"down": KroneckerHadamard(cfg.intermediate_size)}
