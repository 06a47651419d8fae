"""Mixture-of-experts: experts stored as 3-D tensors become one nn.Linear per expert projection.

transformers keeps a block's experts as two stacked parameters (gate|up: E x 2I x H, down: E x H x I)
and a routed loop over them. Quantizing "every expert's linears" needs each expert's projection to
be a linear of its own (its own weight transform, its own folds); `ExpertLinears` holds them and
computes exactly what the stacked module computes. The router stays as it is, in full precision.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from duquant.models.adapters import Adapter
from duquant.utils import replace_submodule


class _Expert(nn.Module):
    """One expert: gate|up stacked in one linear (gate rows first), then down."""

    def __init__(self, gate_up: Tensor, down: Tensor):
        super().__init__()
        self.gate_up_proj = nn.Linear(gate_up.shape[1], gate_up.shape[0], bias=False)
        self.down_proj = nn.Linear(down.shape[1], down.shape[0], bias=False)
        self.gate_up_proj.weight = nn.Parameter(gate_up, requires_grad=False)
        self.down_proj.weight = nn.Parameter(down, requires_grad=False)


class ExpertLinears(nn.Module):
    """The experts of a block as linears; forward(hidden, top_k_index, top_k_weights) as transformers'."""

    def __init__(self, experts: list[_Expert], act_fn: nn.Module):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.act_fn = act_fn
        self.num_experts = len(experts)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self.experts):
            token_idx, top_k_pos = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue
            gate, up = expert.gate_up_proj(hidden_states[token_idx]).chunk(2, dim=-1)
            y = expert.down_proj(self.act_fn(gate) * up)
            y = y * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def is_fused(module: nn.Module) -> bool:
    """Whether `module` keeps its experts as stacked 3-D parameters."""
    gu = getattr(module, "gate_up_proj", None)
    return isinstance(gu, nn.Parameter) and gu.ndim == 3


@torch.no_grad()
def unfuse_block(block: nn.Module, adapter: Adapter) -> bool:
    """Replace `block`'s stacked experts by an ExpertLinears, in place; whether there were any."""
    if adapter.experts is None:
        return False
    try:
        fused = block.get_submodule(adapter.experts)
    except AttributeError:  # a dense block
        return False
    if not is_fused(fused):
        return False
    experts = [
        _Expert(fused.gate_up_proj.data[e].clone(), fused.down_proj.data[e].clone())
        for e in range(fused.gate_up_proj.shape[0])
    ]
    replace_submodule(block, adapter.experts, ExpertLinears(experts, fused.act_fn))
    return True


def stack_expert_tensors(tensors: dict[str, Tensor], experts: str) -> dict[str, Tensor]:
    """Checkpoint tensors of one block with per-expert keys (`{experts}.{e}.gate_proj.weight`, as
    saved on disk) turned into transformers' stacked in-memory layout (`{experts}.gate_up_proj`)."""
    per_expert = f"{experts}.0.gate_proj.weight"
    if per_expert not in tensors:
        return tensors
    out = {k: v for k, v in tensors.items() if not k.startswith(experts + ".")}
    n = sum(1 for k in tensors if k.startswith(experts + ".") and k.endswith(".gate_proj.weight"))

    def pop(e: int, proj: str) -> Tensor:
        return tensors[f"{experts}.{e}.{proj}.weight"]

    out[f"{experts}.gate_up_proj"] = torch.stack(
        [torch.cat([pop(e, "gate_proj"), pop(e, "up_proj")]) for e in range(n)]
    )
    out[f"{experts}.down_proj"] = torch.stack([pop(e, "down_proj") for e in range(n)])
    return out


def unfuse_experts(model: nn.Module, adapter: Adapter) -> int:
    """Unfuse the experts of every block of `model`, in place; how many blocks had stacked experts."""
    return sum(unfuse_block(block, adapter) for block in adapter.blocks(model))


__all__ = ["ExpertLinears", "is_fused", "stack_expert_tensors", "unfuse_block", "unfuse_experts"]
