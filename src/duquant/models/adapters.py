"""Architecture adapters: model-specific knowledge as data (which linears share an input, where norms fold)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class InputGroup:
    """Linears of a decoder block that read the same activation, and what produces that activation.

    `norm` is the RMSNorm whose weight can absorb a per-channel scale of this input; `producer` is the
    linear whose output rows can absorb it instead (v_proj for the o_proj input, up_proj for down_proj).
    """

    name: str
    linears: tuple[str, ...]
    norm: str | None = None
    producer: str | None = None


@dataclass(frozen=True)
class Adapter:
    """Where the pieces of a decoder-only architecture live."""

    name: str
    layers: str
    groups: tuple[InputGroup, ...]
    embed: str
    final_norm: str
    lm_head: str

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks of `model`."""
        return model.get_submodule(self.layers)

    def linear_names(self) -> tuple[str, ...]:
        """Every quantized linear of a block, in execution order."""
        return tuple(n for g in self.groups for n in g.linears)

    def group_of(self, linear: str) -> InputGroup:
        """The input group a block-relative linear name belongs to."""
        for g in self.groups:
            if linear in g.linears:
                return g
        raise KeyError(linear)


LLAMA = Adapter(
    name="llama",
    layers="model.layers",
    groups=(
        InputGroup(
            "qkv",
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            norm="input_layernorm",
        ),
        InputGroup("o", ("self_attn.o_proj",), producer="self_attn.v_proj"),
        InputGroup("gate_up", ("mlp.gate_proj", "mlp.up_proj"), norm="post_attention_layernorm"),
        InputGroup("down", ("mlp.down_proj",), producer="mlp.up_proj"),
    ),
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
)

# keyed by the architecture class in config.json; Qwen2 and Mistral share the Llama layout
ADAPTERS: dict[str, Adapter] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": LLAMA,
}


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no adapter."""


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of `model`'s architecture, or a clear error listing the supported ones."""
    arch = type(model).__name__
    archs = getattr(getattr(model, "config", None), "architectures", None) or []
    for name in (arch, *archs):
        if name in ADAPTERS:
            return ADAPTERS[name]
    raise UnsupportedArchitectureError(
        f"architecture {arch} is not supported; duquant supports {sorted(ADAPTERS)}. "
        "Adding one means adding an Adapter entry in duquant/models/adapters.py."
    )
