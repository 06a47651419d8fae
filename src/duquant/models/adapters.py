"""Architecture adapters: model-specific knowledge as data (which linears share an input, where norms fold).

Nothing outside `duquant.models` tests module names: methods and transforms read the roles an
adapter gives (a group's norm, its producer and the rows of it that produce the input, whether the
input is attention-head output) and the norm kind (`norm_offset`, `post_norms`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

EXPERT = "{e}"  # placeholder in group and module names, expanded once per expert of a block


@dataclass(frozen=True)
class InputGroup:
    """Linears of a decoder block that read the same activation, and what produces that activation.

    `norm` is the RMSNorm whose weight can absorb a per-channel scale of this input; `producer` is the
    linear whose output rows can absorb it instead (v_proj for the o_proj input, up_proj for down_proj);
    `producer_rows` names the slice of a fused producer that makes this input ("v" of q|k|v, "up" of
    gate|up); `heads` marks attention-head output (the o_proj input: folds must respect heads and GQA).
    `observe` is the module whose first input is this activation, when the first linear sees only part
    of it (MoE experts see their routed tokens only); `fp_readers` are modules that read the same
    activation and stay in full precision (a MoE router): a fold into the norm is undone in their
    weights so they see what they saw before.
    """

    name: str
    linears: tuple[str, ...]
    norm: str | None = None
    producer: str | None = None
    producer_rows: str | None = None
    heads: bool = False
    observe: str | None = None
    fp_readers: tuple[str, ...] = ()

    @property
    def reads_residual(self) -> bool:
        """Whether the input is a normed residual stream (the group's linears are residual readers)."""
        return self.norm is not None

    @property
    def observed(self) -> str:
        """The module whose first positional input is this group's activation."""
        return self.observe or self.linears[0]

    def expand(self, e: int) -> InputGroup:
        """This group with the expert placeholder replaced by expert `e`."""

        def sub(s: str | None) -> str | None:
            return None if s is None else s.replace(EXPERT, str(e))

        return replace(
            self,
            name=sub(self.name),
            linears=tuple(sub(n) for n in self.linears),
            norm=sub(self.norm),
            producer=sub(self.producer),
            observe=sub(self.observe),
            fp_readers=tuple(sub(n) for n in self.fp_readers),
        )


@dataclass(frozen=True)
class Adapter:
    """Where the pieces of a decoder-only architecture live, and what kind of norms it has.

    `norm_offset`: the norm multiplies by (offset + weight) (Gemma: 1). `post_norms`: norms between a
    block's output projections and the residual stream (Gemma 3), which no global rotation of the
    residual stream can pass. `experts`: the module of a block that holds its experts (MoE); group
    names and linears with "{e}" are expanded once per expert. `fused_experts`: the experts are stored
    as 3-D tensors and are turned into one linear per expert projection before quantization.
    """

    name: str
    layers: str
    groups: tuple[InputGroup, ...]
    embed: str
    final_norm: str
    lm_head: str
    norm_offset: float = 0.0
    post_norms: tuple[str, ...] = ()
    experts: str | None = None
    fused_experts: bool = False
    architectures: tuple[str, ...] = field(default=())

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks of `model`."""
        return model.get_submodule(self.layers)

    def block_groups(self, block: nn.Module) -> tuple[InputGroup, ...]:
        """The input groups of one block, expert groups expanded (a dense block of a MoE model has none)."""
        out: list[InputGroup] = []
        n_experts = self.num_experts(block)
        for g in self.groups:
            if EXPERT in g.name:  # one group per expert
                out += [g.expand(e) for e in range(n_experts)]
            elif any(EXPERT in n for n in g.linears):  # one input shared by every expert
                if n_experts:
                    linears = tuple(g.expand(e).linears[0] for e in range(n_experts))
                    out.append(replace(g, linears=linears))
            elif all(_has(block, n) for n in g.linears):
                out.append(g)
        return tuple(out)

    def num_experts(self, block: nn.Module) -> int:
        """How many experts `block` has (0 for a dense block)."""
        if self.experts is None or not _has(block, self.experts):
            return 0
        return len(block.get_submodule(self.experts).experts)

    def linear_names(self) -> tuple[str, ...]:
        """Every quantized linear of a (dense) block, in execution order."""
        return tuple(n for g in self.groups for n in g.linears)

    def group_of(self, linear: str) -> InputGroup:
        """The input group a block-relative linear name belongs to."""
        for g in self.groups:
            if linear in g.linears:
                return g
        raise KeyError(linear)

    def refuse(self, method) -> str | None:
        """Why `method` cannot apply to this family exactly, or None when it can."""
        if method.global_rotation and self.post_norms:
            return (
                f"method {method.name} rotates the residual stream globally, which cannot pass "
                f"{self.name}'s post-norms ({', '.join(self.post_norms)}): their per-channel "
                "weights act between the output projections and the residual stream, so the "
                "rotation would not cancel and the model would change"
            )
        return None


def _has(module: nn.Module, name: str) -> bool:
    """Whether `module` has a submodule called `name`."""
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


_ATTN = (
    InputGroup(
        "qkv",
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        norm="input_layernorm",
    ),
    InputGroup("o", ("self_attn.o_proj",), producer="self_attn.v_proj", heads=True),
)
_MLP = (
    InputGroup("gate_up", ("mlp.gate_proj", "mlp.up_proj"), norm="post_attention_layernorm"),
    InputGroup("down", ("mlp.down_proj",), producer="mlp.up_proj"),
)
_OUTER = dict(embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head")

# Llama 3.x, Mistral, Qwen2/2.5 (q/k/v biases fold like weights) and Qwen3 (q/k norms act on q/k
# outputs, which no transform touches) share one layout
LLAMA = Adapter(
    name="llama",
    layers="model.layers",
    groups=_ATTN + _MLP,
    architectures=(
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
    ),
    **_OUTER,
)

# Gemma 3: RMSNorm scales by (1 + w), four norms a block (post-norms after o_proj and down_proj),
# embeddings scaled by sqrt(hidden) (a scalar: no transform cares), per-layer sliding/global attention
GEMMA3 = Adapter(
    name="gemma3",
    layers="model.layers",
    groups=(
        _ATTN[0],
        _ATTN[1],
        InputGroup("gate_up", ("mlp.gate_proj", "mlp.up_proj"), norm="pre_feedforward_layernorm"),
        _MLP[1],
    ),
    norm_offset=1.0,
    post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    architectures=("Gemma3ForCausalLM",),
    **_OUTER,
)

# Phi-3: fused q|k|v and gate|up projections; the o_proj input comes from qkv_proj's v rows and the
# down_proj input from gate_up_proj's up rows (the second half: down(up * act(gate)))
PHI3 = Adapter(
    name="phi3",
    layers="model.layers",
    groups=(
        InputGroup("qkv", ("self_attn.qkv_proj",), norm="input_layernorm"),
        InputGroup(
            "o", ("self_attn.o_proj",), producer="self_attn.qkv_proj", producer_rows="v", heads=True
        ),
        InputGroup("gate_up", ("mlp.gate_up_proj",), norm="post_attention_layernorm"),
        InputGroup("down", ("mlp.down_proj",), producer="mlp.gate_up_proj", producer_rows="up"),
    ),
    architectures=("Phi3ForCausalLM",),
    **_OUTER,
)

# Qwen3-MoE: every expert reads the normed residual (routed tokens only); the router (mlp.gate)
# reads it too and stays in full precision; each expert's down_proj input is its own
QWEN3_MOE = Adapter(
    name="qwen3_moe",
    layers="model.layers",
    groups=(
        *_ATTN,
        InputGroup(
            "experts.gate_up",
            ("mlp.experts.experts.{e}.gate_up_proj",),
            norm="post_attention_layernorm",
            observe="mlp",
            fp_readers=("mlp.gate",),
        ),
        InputGroup(
            "experts.{e}.down",
            ("mlp.experts.experts.{e}.down_proj",),
            producer="mlp.experts.experts.{e}.gate_up_proj",
            producer_rows="up",
        ),
        *_MLP,  # dense layers (mlp_only_layers, decoder_sparse_step)
    ),
    experts="mlp.experts",
    fused_experts=True,
    architectures=("Qwen3MoeForCausalLM",),
    **_OUTER,
)

# Mixtral and OLMoE keep their experts and router exactly where Qwen3-MoE does (OLMoE's q/k norms
# act on q_proj/k_proj outputs, like Qwen3's)
MIXTRAL = replace(QWEN3_MOE, name="mixtral", architectures=("MixtralForCausalLM",))
OLMOE = replace(QWEN3_MOE, name="olmoe", architectures=("OlmoeForCausalLM",))

# keyed by the architecture class in config.json
ADAPTERS: dict[str, Adapter] = {
    arch: a for a in (LLAMA, GEMMA3, PHI3, QWEN3_MOE, MIXTRAL, OLMOE) for arch in a.architectures
}


# GGUF `general.architecture` names, for checks made before a GGUF is loaded
GGUF_ARCHITECTURES: dict[str, Adapter] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gemma3": GEMMA3,
    "phi3": PHI3,
    "qwen3moe": QWEN3_MOE,
    "olmoe": OLMOE,
}


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no adapter."""


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of `model`'s architecture, or a clear error listing the supported ones."""
    arch = type(model).__name__
    archs = getattr(getattr(model, "config", None), "architectures", None) or []
    return adapter_for_names(arch, *archs)


def adapter_for_names(*archs: str) -> Adapter:
    """The adapter of the first known architecture name in `archs`, or a clear error."""
    for name in archs:
        if name in ADAPTERS:
            return ADAPTERS[name]
    raise UnsupportedArchitectureError(
        f"architecture {archs[0] if archs else '?'} is not supported; duquant supports "
        f"{sorted(ADAPTERS)}. Adding one means adding an Adapter entry in "
        "duquant/models/adapters.py."
    )
