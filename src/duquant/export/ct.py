"""compressed-tensors export: packed FP4 weights, E8M0 / E4M3 scales, block rotations as transforms.

What is written (facts checked against compressed-tensors 0.20.1, see docs/export.md):

* `config.json` with a `quantization_config` (quant_method `compressed-tensors`, one group targeting
  every `Linear` but `lm_head`, weights static, activations dynamic, format from `LAYOUTS`) whose
  `transform_config` holds one scheme per online block rotation: per layer and input position
  (qkv, o, gate_up, down), applied at the `input` of the linears reading that position.
* `model.safetensors`: per quantized linear the codes and scales it computes with
  (`QuantizedWeight`, via `export_tensors`), its bias, every other tensor in full
  precision, and per transform scheme one matrix `<first target>.<scheme>_input.weight`.
* A rotation R is stored as sqrt(B)·R under type `random-hadamard` with `randomize: false`:
  compressed-tensors divides that type by sqrt(B), and so does vLLM for every dense type. The
  weights are stored already rotated; `BlockRotation.apply_online` computes x·R in the loader's
  float order, which makes the reload bit-identical.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from duquant._version import __version__
from duquant.export.atomic import ExportError
from duquant.formats import QuantizedWeight, QuantSpec, mxfp4, nvfp4
from duquant.jsonio import JSONFileError, read_json_object
from duquant.qlinear import InputQuantizer, QuantLinear
from duquant.transforms.base import BlockRotation, Sequence, Transform
from duquant.transforms.hadamard import KroneckerHadamard

log = logging.getLogger(__name__)

NAME = "compressed-tensors"
CT_VERSION = "0.20.1"  # the version this exporter is tested against (pyproject's `export` extra)
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # a sharded checkpoint (the streamed export)
SIDECAR = "duquant.json"
TRANSFORM_TYPE = "random-hadamard"  # a stored dense matrix divided by sqrt(B) on load


# ---- how compressed-tensors lays out each number format ------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How compressed-tensors stores one format's weights and computes its activations."""

    format: str  # the checkpoint's format name
    rules: tuple[str, ...]  # weight scale rules whose scales it stores exactly
    scale_dtype: str  # the dtype of the stored group scales
    strategy: str  # the quantization strategy of its QuantizationArgs
    # what compressed-tensors (and vLLM) compute for activations at run time: an export is
    # faithful only when duquant's in-process activations are the same
    act: dict


LAYOUTS = {
    # E8M0 scale bytes (compressed-tensors uses MX power-of-two scales only with uint8 scales);
    # activations dynamic, rule ct-round with ties to even
    "mxfp4": Layout(
        format="mxfp4-pack-quantized",
        rules=("ocp", "ceil", "ct-round", "mse"),
        scale_dtype="torch.uint8",
        strategy="group",
        act={"scale_rule": "ct-round", "rounding": "even", "dynamic": True},
    ),
    # activations: E4M3 group scales on the fly, a static (calibrated) global scale per layer
    # ("local"); duquant's in-process activations take the global scale per tensor
    "nvfp4": Layout(
        format="nvfp4-pack-quantized",
        rules=nvfp4.SCALE_RULES,
        scale_dtype="torch.float8_e4m3fn",
        strategy="tensor_group",
        act={"scale_rule": "e4m3", "rounding": "even", "dynamic": "local"},
    ),
}


def layout(spec: QuantSpec) -> Layout:
    """The compressed-tensors layout of a spec's format."""
    return LAYOUTS[spec.format]


def positive_zeros(packed: Tensor) -> Tensor:
    """Packed codes with every -0 (code 8) turned into +0 (code 0), nibble by nibble.

    Rounding keeps the sign of a value that rounds to zero; compressed-tensors' compressor (and
    so an export) writes every zero as +0. Either decodes to a zero weight.
    """
    low, high = packed & 0x0F, packed >> 4
    low = torch.where(low == 8, 0, low)
    high = torch.where(high == 8, 0, high)
    return (low | (high << 4)).to(torch.uint8)


def _mxfp4_tensors(qw: QuantizedWeight) -> dict[str, Tensor]:
    """MXFP4: `weight_packed` and `weight_scale` (E8M0 bytes, 127 + exponent)."""
    rules = LAYOUTS["mxfp4"].rules
    if qw.spec.scale_rule not in rules:
        raise ValueError(
            f"MXFP4 weight scale rule {qw.spec.scale_rule!r} is not a plain E8M0 power of two; "
            f"an export needs one of {rules}"
        )
    return {
        "weight_packed": positive_zeros(qw.packed),
        "weight_scale": mxfp4.e8m0_bytes(qw.scales),
    }


def _nvfp4_tensors(qw: QuantizedWeight) -> dict[str, Tensor]:
    """NVFP4: packed codes, E4M3 scales, and the global scale 1 / ts."""
    nvfp4.check_scale_rule(qw.spec.scale_rule)
    return {
        "weight_packed": positive_zeros(qw.packed),
        "weight_scale": qw.scales.to(torch.float8_e4m3fn),
        # compressed-tensors divides the group scale by a global scale: ours is its reciprocal
        "weight_global_scale": (1.0 / torch.as_tensor(qw.tensor_scale).float()).reshape(1),
    }


def export_tensors(qw: QuantizedWeight) -> dict[str, Tensor]:
    """compressed-tensors' tensors of one quantized linear: its codes and scales as stored."""
    writers = {"mxfp4": _mxfp4_tensors, "nvfp4": _nvfp4_tensors}
    return writers[qw.spec.format](qw)


def check_request(method, quant) -> None:
    """Refuse, before any model is loaded, a recipe or format this exporter cannot express (each
    stage says what of its result has no compressed-tensors form)."""
    if not method.quantize:
        raise ExportError(f"method {method.name} quantizes nothing; there is nothing to export")
    for stage in method.stages:
        why = stage.export_refusal(method.fold)
        if why:
            raise ExportError(f"method {method.name} {why}")
    if quant.weight is None or quant.act is None:
        raise ExportError("an export needs both weights and activations quantized (W4A4)")
    _check_spec(quant.weight, "weight", weights=True)
    _check_spec(quant.act, "activation", weights=False)


def _check_spec(spec: QuantSpec, what: str, weights: bool) -> None:
    """The spec is one compressed-tensors stores (weights) or computes at run time (activations)."""
    lay = layout(spec)
    if weights and spec.scale_rule not in lay.rules:
        raise ExportError(
            f"{what} scale rule {spec.scale_rule!r} is not exportable to {lay.format} "
            f"(stored scales must be plain E8M0 powers of two: {lay.rules})"
        )
    if not weights:
        want = lay.act
        if (spec.scale_rule, spec.rounding) != (want["scale_rule"], want["rounding"]):
            raise ExportError(
                f"activation scale rule {spec.scale_rule!r} / rounding {spec.rounding!r} differs "
                f"from what compressed-tensors computes at run time ({want['scale_rule']!r}, "
                f"{want['rounding']!r}); the export would not compute what duquant measured. "
                f"Use --a-scale-rule {want['scale_rule']} --rounding {want['rounding']}"
            )


def online_rotation(online: Transform | None, where: str) -> BlockRotation | None:
    """The single shared block rotation an online transform consists of, None, or ExportError."""
    matrix = online_matrix(online, where)
    return None if matrix is None else _single_step(online)


def _single_step(online: Transform) -> Transform:
    """The one step of a transform (itself, or a one-step Sequence's step)."""
    return online.steps[0] if isinstance(online, Sequence) else online


def online_matrix(online: Transform | None, where: str) -> tuple[Tensor, int] | None:
    """(stored matrix sqrt(B)·R, block size B) of an online transform, None if there is none.

    Expressible: one block rotation shared by every block (B = its block), or a global
    (Kronecker) Hadamard (B = the width, QuaRot's down_proj input: stored densely, its entries
    exactly ±1). Anything else is an ExportError naming the steps.
    """
    if online is None:
        return None
    steps = list(online.steps) if isinstance(online, Sequence) else [online]
    if not steps:
        return None
    if len(steps) == 1 and isinstance(steps[0], BlockRotation) and steps[0].rotation.shape[0] == 1:
        return steps[0].stored_matrix(), steps[0].block_size
    if len(steps) == 1 and isinstance(steps[0], KroneckerHadamard):
        n = steps[0].k * steps[0].p
        # the dense ±1 matrix, exact: rounding removes the float error of the normalised factors
        return torch.round(steps[0].matrix().double() * math.sqrt(n)).float(), n
    names = " then ".join(type(s).__name__ for s in steps)
    raise ExportError(
        f"the online transform of {where} ({names}) is not expressible as one compressed-tensors "
        "transform (a single block rotation shared by all blocks, or a global Hadamard, is)"
    )


def _quant_args(spec: QuantSpec, dynamic) -> dict:
    """One `QuantizationArgs` of compressed-tensors as JSON."""
    lay = layout(spec)
    return {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "group_size": spec.group_size,
        "strategy": lay.strategy,
        "dynamic": dynamic,
        "scale_dtype": lay.scale_dtype,
    }


def quantization_config(
    w_spec: QuantSpec, a_spec: QuantSpec, ignore: list[str], transforms: dict
) -> dict:
    """The `quantization_config` of config.json."""
    fmt = layout(w_spec).format
    cfg = {
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": _quant_args(w_spec, False),
                "input_activations": _quant_args(a_spec, layout(a_spec).act["dynamic"]),
                "output_activations": None,
                "format": fmt,
            }
        },
        "quant_method": "compressed-tensors",
        "kv_cache_scheme": None,
        "format": fmt,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": ignore,
        "version": CT_VERSION,
    }
    if transforms:
        cfg["transform_config"] = {"config_groups": transforms}
    return cfg


def _transform_scheme(targets: list[str], block: int) -> dict:
    """A transform scheme applying one stored B x B matrix at the input of `targets`."""
    return {
        "type": TRANSFORM_TYPE,
        "apply": [{"targets": targets, "location": "input", "inverse": False, "ignore": []}],
        "randomize": False,
        "requires_grad": False,
        "head_dim": block,
        "precision": "torch.float32",
    }


def needs_activation_calibration(spec: QuantSpec) -> bool:
    """Whether the format's export takes a static activation scale per layer (NVFP4's global one)."""
    return layout(spec).act["dynamic"] == "local"


@torch.no_grad()
def activation_amax(model: nn.Module, windows: Tensor) -> dict[int, Tensor]:
    """max |T(x)| over calibration windows at every input quantizer (keyed by id), T its online
    transform: the static per-layer activation maximum NVFP4's global scale is calibrated from."""
    amax: dict[int, Tensor] = {}

    def hook(iq: InputQuantizer, args) -> None:
        x = args[0]
        y = iq.online.apply_online(x) if iq.online is not None else x
        m = y.detach().abs().amax().float()
        amax[id(iq)] = torch.maximum(amax.get(id(iq), m), m)

    iqs = {id(m): m for m in model.modules() if isinstance(m, InputQuantizer)}.values()
    handles = [iq.register_forward_pre_hook(hook) for iq in iqs]
    try:
        for i in range(windows.shape[0]):
            model(windows[i : i + 1].to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return amax


@dataclass
class Collection:
    """What an export gathers over the parts of a model: transform schemes, specs, ignored linears."""

    schemes: dict = field(default_factory=dict)
    ignore: list[str] = field(default_factory=list)
    w_spec: QuantSpec | None = None
    a_spec: QuantSpec | None = None
    n_quantized: int = 0


def _join(prefix: str, name: str) -> str:
    """A submodule's full name from its parent's (`prefix`, "" for the model) and its own."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


def collect_part(
    module: nn.Module,
    prefix: str,
    acc: Collection,
    act_amax: dict[int, Tensor] | None = None,
    skip: frozenset[str] = frozenset(),
) -> dict[str, Tensor]:
    """The tensors to write of `module` (the model, or one block named `prefix`), on the CPU, less
    the names in `skip`; its transform schemes, specs and unquantized linears go into `acc`."""
    qlins = {_join(prefix, n): m for n, m in module.named_modules() if isinstance(m, QuantLinear)}
    drop = tuple(f"{n}." for n in qlins)
    state = module.state_dict(prefix=f"{prefix}." if prefix else "")
    tensors = {k: v for k, v in state.items() if not k.startswith(drop) and k not in skip}
    acc.ignore += [
        _join(prefix, n)
        for n, m in module.named_modules()
        if isinstance(m, nn.Linear) and not _join(prefix, n).startswith(drop)
    ]
    acc.n_quantized += len(qlins)
    # one scheme per distinct online transform object of this part (ids are only unique while the
    # part is in memory, so a streamed block never shares a scheme with an earlier, freed one)
    seen: dict[int, str] = {}
    for name, q in qlins.items():
        if q.qweight is None:
            raise ExportError(
                f"{name} has no quantized weight codes (weights left in full precision)"
            )
        if acc.w_spec is None:
            acc.w_spec, acc.a_spec = q.qweight.spec, q.input_quantizer.spec
        if (q.qweight.spec, q.input_quantizer.spec) != (acc.w_spec, acc.a_spec):
            raise ExportError(f"{name} is quantized differently from the other linears")
        for k, v in export_tensors(q.qweight).items():
            tensors[f"{name}.{k}"] = v
        if q.bias is not None:
            tensors[f"{name}.bias"] = q.bias.data
        iq = q.input_quantizer
        if needs_activation_calibration(iq.spec):
            if act_amax is None or id(iq) not in act_amax:
                raise ExportError(f"{name}: {iq.spec.format} export needs calibrated activations")
            # compressed-tensors divides by its global scale: the reciprocal of ours, amax / (6 * 448)
            ts = iq.spec.codec.tensor_scale_of(act_amax[id(iq)])
            tensors[f"{name}.input_global_scale"] = (1.0 / ts).reshape(1)
        stored = online_matrix(iq.online, iq.name)
        if stored is None:
            continue
        # q/k/v (gate/up) share an input quantizer, and QuaRot's down_proj Hadamard is one object
        # for every layer: one matrix, several targets
        if id(iq.online) in seen:
            acc.schemes[seen[id(iq.online)]]["apply"][0]["targets"].append(name)
            continue
        scheme = _scheme_name(iq.name, len(acc.schemes))
        seen[id(iq.online)] = scheme
        acc.schemes[scheme] = _transform_scheme([name], stored[1])
        tensors[f"{name}.{scheme}_input.weight"] = stored[0]
    meta = [k for k, v in tensors.items() if v.device.type == "meta"]
    if meta:
        raise ExportError(f"tensors {meta[:4]} were never loaded (meta device); cannot export them")
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def tied_head_key(model: nn.Module, shared: bool = True) -> str | None:
    """The head's weight name when the config ties it to the embedding (and, with `shared`, the two
    are one tensor): written once, transformers ties the head again on load."""
    head = model.get_output_embeddings()
    if not getattr(model.config, "tie_word_embeddings", False) or head is None:
        return None
    if shared and head.weight is not model.get_input_embeddings().weight:
        return None
    return next(f"{n}.weight" for n, m in model.named_modules() if m is head)


def collect(
    model: nn.Module, act_amax: dict[int, Tensor] | None = None
) -> tuple[dict[str, Tensor], dict, QuantSpec, QuantSpec, list[str]]:
    """(tensors, transform schemes, weight spec, activation spec, ignored linears) of a quantized
    model; `act_amax` (from `activation_amax`) gives formats with a static activation scale theirs."""
    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ExportError("the model has no quantized linears; nothing to export")
    acc = Collection()
    tied = tied_head_key(model)
    tensors = collect_part(model, "", acc, act_amax, frozenset({tied} if tied else ()))
    _check_act_spec(acc.a_spec)
    return tensors, acc.schemes, acc.w_spec, acc.a_spec, acc.ignore


def _check_act_spec(spec: QuantSpec | None) -> None:
    """Activations must be quantized the way compressed-tensors does it at run time."""
    if spec is None:
        raise ExportError("activations are not quantized; an export is W4A4")
    _check_spec(spec, "activation", weights=False)


def _scheme_name(input_name: str, index: int) -> str:
    """A transform scheme name from an input quantizer's name ("layers.3.qkv input" -> l3_qkv).

    compressed-tensors registers `<scheme>_input` as a submodule, so no dots."""
    parts = input_name.replace(" input", "").split(".")
    if len(parts) == 3 and parts[0] == "layers":
        return f"l{parts[1]}_{parts[2]}"
    return f"t{index}"


def model_card(info: dict, dest_name: str) -> str:
    """A short README: what the checkpoint is, how to load and serve it."""
    run = info.get("run", {})
    ppl = info.get("perplexity", {})
    lines = [
        f"# {dest_name}: {run.get('method', '?')} {run.get('format', 'mxfp4').upper()} W4A4",
        "",
        f"Quantized with duquant {__version__} from `{info.get('model_source', '?')}`: "
        f"method `{run.get('method')}`, weights `{run.get('weights')}`, format `{run.get('format')}`.",
        f"Weights are packed FP4 ({info.get('format_name', 'compressed-tensors')}); activations are "
        "quantized at run time; online block rotations are compressed-tensors transforms (type "
        "`random-hadamard`, the stored matrix is sqrt(B)·R). `lm_head` stays in full precision.",
        "",
    ]
    for name, m in ppl.items():
        lines.append(
            f"- perplexity {name}: {m['ppl']:.4f} over {m['windows']} windows of {m['seqlen']}"
        )
    lines += [
        "",
        "## Load",
        "",
        "```bash",
        f"duquant run --model {dest_name} --method fp --eval wikitext2   # through compressed-tensors",
        f"vllm serve {dest_name}   # see duquant's docs/export.md for versions and hardware",
        "```",
        "",
        "Do not load it with plain `transformers.from_pretrained`: transformers 5.24 drops the "
        "transforms (the logits are wrong). `duquant.json` holds the full run configuration.",
        "",
    ]
    return "\n".join(lines)


def write(model: nn.Module, tokenizer, dest: Path, info: dict, calib: Tensor | None = None) -> dict:
    """Write the checkpoint into the (empty, temporary) directory `dest`; return size figures.

    `calib` (calibration windows) is needed by formats with a static activation scale (NVFP4)."""
    from safetensors.torch import save_file

    act_amax = None
    first = next((m for m in model.modules() if isinstance(m, InputQuantizer)), None)
    if first is not None and first.spec is not None and needs_activation_calibration(first.spec):
        if calib is None:
            raise ExportError(f"a {first.spec.format} export needs calibration windows")
        act_amax = activation_amax(model, calib)
    tensors, schemes, w_spec, a_spec, ignore = collect(model, act_amax)
    save_file(tensors, str(dest / WEIGHTS_FILE), metadata={"format": "pt"})
    acc = Collection(schemes, ignore, w_spec, a_spec)
    sizes = size_figures(size_counts(tensors, model))
    generation = getattr(model, "generation_config", None)
    _write_metadata(dest, model, tokenizer, info, acc, sizes, generation)
    return sizes


def write_streamed(model: nn.Module, adapter, store, tokenizer, dest: Path, info: dict) -> dict:
    """`write` for a model quantized block by block (`stream.quantize_streaming`): one shard per
    decoder block, loaded from the block store and dropped again, then one shard of the tensors
    outside the blocks (embedding, final norm, untied head) read from the source checkpoint, and
    the index `model.safetensors.index.json`. At most one block's tensors are in memory at once."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    acc, counts, weight_map = Collection(), Counter(), {}
    n = len(adapter.blocks(model))
    files = [f"model-{i + 1:05d}-of-{n + 1:05d}.safetensors" for i in range(n + 1)]

    def put(tensors: dict[str, Tensor], part: nn.Module, file: str) -> None:
        save_file(tensors, str(dest / file), metadata={"format": "pt"})
        counts.update(size_counts(tensors, part))
        weight_map.update(dict.fromkeys(tensors, file))

    for i in tqdm(range(n), desc="export blocks"):
        block = store.load(i)
        try:  # NVFP4's static activation scales are not calibrated: collect_part refuses them
            put(collect_part(block, f"{adapter.layers}.{i}", acc), block, files[i])
        finally:
            store.release(i)
    if not acc.n_quantized:
        raise ExportError("the model has no quantized linears; nothing to export")
    _check_act_spec(acc.a_spec)
    tied = tied_head_key(model, shared=False)
    outer = [adapter.embed, adapter.final_norm] + ([] if tied else [adapter.lm_head])
    with store.outer(outer):  # the blocks are released: the model's state is what lies outside
        put(collect_part(model, "", acc, skip=frozenset({tied} if tied else ())), model, files[n])
    index = {
        "metadata": {"total_size": counts["tensor_bytes"]},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (dest / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    sizes = size_figures(counts)
    _write_metadata(dest, model, tokenizer, info, acc, sizes, store.generation_config())
    return sizes


def _write_metadata(
    dest: Path, model: nn.Module, tokenizer, info: dict, acc: Collection, sizes: dict, generation
) -> None:
    """config.json (with the quantization and transform config), tokenizer, generation config,
    the sidecar and the model card: everything of an export but its tensors."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    config["quantization_config"] = quantization_config(
        acc.w_spec, acc.a_spec, acc.ignore, acc.schemes
    )
    (dest / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(dest))
    if generation is not None:
        generation.save_pretrained(str(dest))
    info = {**info, "exporter": NAME, "compressed_tensors": CT_VERSION, "sizes": sizes}
    info["format_name"] = layout(acc.w_spec).format
    info["transforms"] = {k: v["apply"][0]["targets"] for k, v in acc.schemes.items()}
    (dest / SIDECAR).write_text(json.dumps(info, indent=2, default=str) + "\n")
    (dest / "README.md").write_text(model_card(info, dest.name.split(".partial-")[0].lstrip(".")))


def size_counts(tensors: dict[str, Tensor], module: nn.Module) -> Counter:
    """Byte and weight counts of the tensors written for `module` (summed over shards)."""
    q_bytes = sum(
        v.numel() * v.element_size()
        for k, v in tensors.items()
        if k.endswith(
            ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")
        )
    )
    return Counter(
        quantized_weights=sum(
            m.weight.numel() for m in module.modules() if isinstance(m, QuantLinear)
        ),
        quantized_bytes=q_bytes,
        tensor_bytes=sum(v.numel() * v.element_size() for v in tensors.values()),
    )


def size_figures(counts: Counter) -> dict:
    """Bytes of the quantized linears' codes and scales, the rest, and bits per quantized weight."""
    return {
        "quantized_weights": counts["quantized_weights"],
        "quantized_bytes": counts["quantized_bytes"],
        "bits_per_quantized_weight": 8.0 * counts["quantized_bytes"] / counts["quantized_weights"],
        "tensor_bytes": counts["tensor_bytes"],
        "other_bytes": counts["tensor_bytes"] - counts["quantized_bytes"],
    }


# ---- loading ---------------------------------------------------------------------------------
#
# Nothing read from an export is trusted. config.json and the shard index are bounded in size,
# parsed as JSON (never pickle) and checked for the keys loading relies on; every safetensors
# header is bounded by its file's size before it is read, and its entries (dtype, shape, offsets
# covering the data exactly) are checked before any tensor is; every tensor the model built from
# the config expects must be present with its shape and dtype (a transform matrix may be absent
# only as a tied copy: a later target of the scheme whose first target's matrix is stored, as the
# config says); floats, scales and transforms must be finite. Any violation is one ExportError
# line naming the file and the key or tensor.

JSON_MAX_BYTES = 64 * 2**20  # config.json, the index: far above any real one
HEADER_MAX_BYTES = 100_000_000  # safetensors' own limit on a header
QUANT_SUFFIXES = (
    "weight_packed",
    "weight_scale",
    "weight_global_scale",
    "input_global_scale",
    "weight_zero_point",
)
_ST_DTYPES = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors header: its file, dtype and shape (validated)."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def read_json(path: Path) -> dict:
    """A JSON object from `path`, its size bounded before it is read; ExportError otherwise."""
    try:
        return read_json_object(path, JSON_MAX_BYTES)
    except JSONFileError as exc:
        raise ExportError(f"{path}: {exc}") from None


def is_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a directory holding a compressed-tensors checkpoint (a config.json that
    is not a JSON object is an ExportError: nothing could load it)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    qc = read_json(cfg).get("quantization_config")
    if qc is None:
        return False
    if not isinstance(qc, dict):
        raise ExportError(f"{cfg}: quantization_config is a {type(qc).__name__}, not an object")
    # a compressed-tensors config that lost its quant_method is still one (refused on load)
    method = qc.get("quant_method")
    return method == "compressed-tensors" or (method is None and "config_groups" in qc)


def _bad(cfg: Path, key: str, why: str) -> ExportError:
    return ExportError(f"{cfg}: quantization_config.{key} {why}")


def _str_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def check_quantization_config(qc, cfg: Path) -> None:
    """The keys and shapes of `quantization_config` that loading relies on (compressed-tensors'
    own validation follows); ExportError naming the key otherwise."""
    if not isinstance(qc, dict):
        raise ExportError(f"{cfg}: no quantization_config object")
    need = {
        "quant_method": str,
        "config_groups": dict,
        "format": str,
        "quantization_status": str,
        "ignore": list,
    }
    for key, typ in need.items():
        if key not in qc:
            raise _bad(cfg, key, "is missing")
        if not isinstance(qc[key], typ):
            raise _bad(cfg, key, f"is a {type(qc[key]).__name__}, not a {typ.__name__}")
    if qc["quant_method"] != "compressed-tensors":
        raise _bad(cfg, "quant_method", f"is {qc['quant_method']!r}, not 'compressed-tensors'")
    if qc["quantization_status"] != "compressed":
        raise _bad(cfg, "quantization_status", "is not 'compressed' (an export stores codes)")
    if not _str_list(qc["ignore"]):
        raise _bad(cfg, "ignore", "is not a list of module names")
    if not qc["config_groups"]:
        raise _bad(cfg, "config_groups", "is empty")
    for name, group in qc["config_groups"].items():
        key = f"config_groups.{name}"
        if not isinstance(group, dict):
            raise _bad(cfg, key, "is not an object")
        for part in ("targets", "weights", "input_activations"):
            if part not in group:
                raise _bad(cfg, f"{key}.{part}", "is missing")
        if not _str_list(group["targets"]) or not group["targets"]:
            raise _bad(cfg, f"{key}.targets", "is not a non-empty list of names")
        if not isinstance(group["weights"], dict):
            raise _bad(cfg, f"{key}.weights", "is not an object")
    if "transform_config" in qc:
        _check_transform_config(qc["transform_config"], cfg)


def _check_transform_config(tc, cfg: Path) -> None:
    """transform_config: schemes with apply entries naming targets and a location."""
    if not isinstance(tc, dict) or not isinstance(tc.get("config_groups"), dict):
        raise _bad(cfg, "transform_config.config_groups", "is missing or not an object")
    for name, scheme in tc["config_groups"].items():
        key = f"transform_config.config_groups.{name}"
        if not isinstance(scheme, dict):
            raise _bad(cfg, key, "is not an object")
        apply = scheme.get("apply")
        if not isinstance(apply, list) or not apply:
            raise _bad(cfg, f"{key}.apply", "is missing or empty")
        for entry in apply:
            if not isinstance(entry, dict) or not isinstance(entry.get("location"), str):
                raise _bad(cfg, f"{key}.apply", "has an entry without a location")
            if not _str_list(entry.get("targets")) or not entry["targets"]:
                raise _bad(cfg, f"{key}.apply.targets", "is not a non-empty list of names")
        dim = scheme.get("head_dim")
        if dim is not None and (type(dim) is not int or not 0 < dim <= 2**16):
            raise _bad(cfg, f"{key}.head_dim", f"is {dim!r}, not a block size")


def read_header(file: Path) -> dict[str, Entry]:
    """The tensors a safetensors file holds, from its header, checked against the file: the
    header length is bounded by the file size before it is read, every entry has a known dtype,
    a shape and offsets whose size matches, and the offsets cover the data exactly."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ExportError(f"{file}: truncated ({size} bytes; no safetensors header)")
            n = int.from_bytes(head, "little")
            if n > min(HEADER_MAX_BYTES, size - 8):
                raise ExportError(
                    f"{file}: header length {n} exceeds the file ({size} bytes): truncated or "
                    "not a safetensors file"
                )
            raw = f.read(n)
    except OSError as exc:
        raise ExportError(f"{file}: cannot be read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except (ValueError, RecursionError):
        raise ExportError(f"{file}: the safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ExportError(f"{file}: the safetensors header is not a JSON object")
    out, spans = {}, []
    for name, e in header.items():
        if name == "__metadata__":
            if not isinstance(e, dict) or not all(isinstance(v, str) for v in e.values()):
                raise ExportError(f"{file}: the header's __metadata__ is not a string map")
            continue
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise ExportError(f"{file}: tensor {name!r}: malformed header entry")
        dtype = _ST_DTYPES.get(e["dtype"]) if isinstance(e["dtype"], str) else None
        shape, offs = e["shape"], e["data_offsets"]
        ints = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
        ok_offs = (
            isinstance(offs, list)
            and len(offs) == 2
            and all(type(o) is int for o in offs)
            and 0 <= offs[0] <= offs[1]
        )
        if dtype is None or not ints or len(shape) > 8 or not ok_offs:
            raise ExportError(f"{file}: tensor {name!r}: bad dtype, shape or offsets in header")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes != offs[1] - offs[0]:
            raise ExportError(
                f"{file}: tensor {name!r}: shape {shape} {e['dtype']} needs {nbytes} bytes, its "
                f"offsets give {offs[1] - offs[0]}"
            )
        spans.append((offs[0], offs[1], name))
        out[name] = Entry(file, dtype, tuple(shape))
    pos, data = 0, size - 8 - n
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise ExportError(f"{file}: tensor {name!r}: data offsets overlap or leave a gap")
        pos = end
    if pos != data:
        raise ExportError(
            f"{file}: its tensors need {pos} bytes of data, the file has {data}: "
            f"{'truncated' if pos > data else 'trailing bytes'}"
        )
    return out


def _shard_name(value, index: Path, key: str) -> str:
    """A shard named by the index: a plain safetensors file name inside the export."""
    if (
        not isinstance(value, str)
        or value != Path(value).name
        or "\\" in value
        or not value.endswith(".safetensors")
    ):
        raise ExportError(f"{index}: weight_map[{key!r}] = {value!r} is not a shard file name")
    return value


def read_headers(path: Path) -> dict[str, Entry]:
    """Every tensor of the export (its single file, or the shards its index names), from the
    headers only, each shard checked to hold exactly the tensors the index gives it."""
    index = path / INDEX_FILE
    if not index.is_file():
        file = path / WEIGHTS_FILE
        if not file.is_file():
            raise ExportError(f"{path}: no {WEIGHTS_FILE} (nor {INDEX_FILE})")
        return read_header(file)
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ExportError(f"{index}: weight_map is missing or not a non-empty object")
    shards: dict[str, set[str]] = {}
    for key, value in weight_map.items():
        shards.setdefault(_shard_name(value, index, key), set()).add(key)
    entries: dict[str, Entry] = {}
    for shard, want in sorted(shards.items()):
        file = path / shard
        if not file.is_file():
            raise ExportError(f"{index}: names {shard}, which is missing")
        part = read_header(file)
        if set(part) != want:
            odd = sorted(set(part) ^ want)[:3]
            raise ExportError(f"{file}: does not hold the tensors {INDEX_FILE} names ({odd})")
        entries.update(part)
    return entries


def _read_tensors(entries: dict[str, Entry]) -> dict[str, Tensor]:
    """The tensors themselves (headers already checked), file by file."""
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for file in sorted({e.file for e in entries.values()}):
        try:
            state.update(load_file(str(file)))
        except Exception as exc:  # noqa: BLE001 - the reader's own error, whatever its type
            raise ExportError(f"{file}: cannot be read ({' '.join(str(exc).split())})") from None
    return state


def _check_size(config, entries: dict[str, Entry], cfg: Path) -> None:
    """Before the model is built: its config must not describe far more weights than the export's
    tensors hold (a corrupt size would allocate without bound)."""
    dims = {}
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
        value = getattr(config, key, None)
        if type(value) is not int:  # absent, or a family's own layout: no bound from it
            value = 0
        elif not 0 < value < 2**31:
            raise ExportError(f"{cfg}: {key} is {value!r}, not a positive size")
        dims[key] = value
    h, layers = dims["hidden_size"], dims["num_hidden_layers"]
    weights = 2 * dims["vocab_size"] * h + layers * (4 * h * h + 3 * h * dims["intermediate_size"])
    stored = sum(math.prod(e.shape) * e.dtype.itemsize for e in entries.values())
    if weights > 8 * stored + 2**24:
        raise ExportError(
            f"{cfg}: describes a model of about {weights} weights, far more than the "
            f"{stored} bytes of tensors the export holds"
        )


def _tied_copies(expected: dict[str, Tensor], traw: dict | None) -> dict[str, str]:
    """Transform matrices the config ties: {copy's key: stored key}. A scheme's targets share one
    matrix; the one of its first target (in the config's order) is stored, the others are tied
    copies (the built model shares their storage). Any other matrix must be stored."""
    out: dict[str, str] = {}
    for name, scheme in _online_only(traw or {})["config_groups"].items():
        for entry in scheme["apply"]:
            suffix = f".{name}_{entry['location']}.weight"
            order = {t: i for i, t in enumerate(entry["targets"])}
            keys = sorted(
                (k for k in expected if k.endswith(suffix)),
                key=lambda k: order.get(k[: -len(suffix)], len(order)),
            )
            first: dict[int, str] = {}
            for k in keys:
                ptr = expected[k].untyped_storage().data_ptr()
                if ptr in first:
                    out[k] = first[ptr]
                else:
                    first[ptr] = k
    return out


def check_tensors(
    entries: dict[str, Entry],
    expected: dict[str, Tensor],
    tied: dict[str, str],
    tied_weights: set[str],
    build_dtype: torch.dtype,
    where: Path,
    cfg: Path,
) -> None:
    """The export's tensors against the model built from its config: none it does not have, every
    one it needs (but tied copies), each with the shape and dtype the model holds."""
    unexpected = [k for k in entries if k not in expected]
    if unexpected:
        k = unexpected[0]
        raise ExportError(
            f"{entries[k].file}: tensors the model does not have: {unexpected[:3]} (the model "
            f"{cfg.name} describes, with its quantization_config and transform_config)"
        )
    missing = [k for k in expected if k not in entries and k not in tied and k not in tied_weights]
    if missing:
        raise ExportError(
            f"{where}: tensors missing from the checkpoint: {missing[:3]}"
            + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        )
    plain: dict[torch.dtype, list[str]] = {}
    for k, e in entries.items():
        want = expected[k]
        if e.shape != tuple(want.shape):
            raise ExportError(
                f"{e.file}: tensor {k!r} has shape {list(e.shape)}, the model {cfg.name} "
                f"describes has {list(want.shape)}"
            )
        exact = (
            k.endswith(QUANT_SUFFIXES)
            or k in tied
            or k in tied.values()
            or not want.dtype.is_floating_point
            or want.dtype != build_dtype
        )
        if exact and e.dtype != want.dtype:
            raise ExportError(
                f"{e.file}: tensor {k!r} is {e.dtype}, the model {cfg.name} describes has "
                f"{want.dtype}"
            )
        if not exact:
            if not e.dtype.is_floating_point:
                raise ExportError(f"{e.file}: tensor {k!r} is {e.dtype}, not a float")
            plain.setdefault(e.dtype, []).append(k)
    if len(plain) > 1:  # one dtype for every full-precision tensor: the run's
        k = min(plain.values(), key=len)[0]
        major = max(plain, key=lambda d: len(plain[d]))
        raise ExportError(
            f"{entries[k].file}: tensor {k!r} is {entries[k].dtype}, the export's other "
            f"tensors are {major}"
        )


def check_values(state: dict[str, Tensor], entries: dict[str, Entry], e8m0: bool) -> None:
    """Floats (weights, scales, transforms) finite; E8M0 scale bytes not 255 (NaN)."""
    for k, t in state.items():
        if t.dtype.is_floating_point:
            ok = bool(torch.isfinite(t.float() if t.element_size() == 1 else t).all())
        elif e8m0 and t.dtype == torch.uint8 and k.endswith("weight_scale"):
            ok = not bool((t == 255).any())
        else:
            continue
        if not ok:
            raise ExportError(f"{entries[k].file}: tensor {k!r} holds NaN or infinite values")


def check_sidecar(path: Path, traw: dict | None) -> None:
    """When the export has duquant's sidecar, the transforms it records (scheme -> targets) must
    be the config's: a target dropped from the config would leave a rotated weight unrotated."""
    side = path / SIDECAR
    if not side.is_file():
        return  # written by another tool: nothing to cross-check
    recorded = read_json(side).get("transforms")
    if recorded is None:
        return
    if not isinstance(recorded, dict) or not all(_str_list(v) for v in recorded.values()):
        raise ExportError(f"{side}: 'transforms' is not a map of scheme to target names")
    declared = {
        name: [t for a in scheme["apply"] for t in a["targets"]]
        for name, scheme in _online_only(traw or {})["config_groups"].items()
    }
    if declared != recorded:
        odd = sorted(set(declared) ^ set(recorded)) or [
            k for k in declared if declared[k] != recorded[k]
        ]
        raise ExportError(
            f"{path / 'config.json'}: quantization_config.transform_config differs from the "
            f"transforms {side.name} records (scheme {odd[0]!r})"
        )


@contextlib.contextmanager
def _building(cfg: Path):
    """Errors of building the model from a (validated) config: one ExportError naming it."""
    try:
        yield
    except ExportError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, AssertionError) as exc:
        why = " ".join(str(exc).split())[:300]
        raise ExportError(f"{cfg}: cannot build the model it describes ({why})") from None


def _online_only(tconfig: dict) -> dict:
    """The transform config with only the online `input` entries (weights are stored rotated)."""
    out = {}
    for name, scheme in tconfig.get("config_groups", {}).items():
        apply = [a for a in scheme.get("apply", []) if a.get("location") in ("input", "output")]
        if apply:
            out[name] = {**scheme, "apply": apply}
    return {"config_groups": out}


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load an export through compressed-tensors' own APIs, transforms applied: (model, tokenizer).

    Every file is validated before it is used (see above); a violation is one ExportError line."""
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
        from compressed_tensors.transform import TransformConfig, apply_transform_config
    except ImportError as exc:
        raise ExportError(
            f"{path} is a compressed-tensors checkpoint; loading it needs compressed-tensors "
            f'(pip install "duquant[export]"): {exc}'
        ) from exc
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    cfg = path / "config.json"
    raw = read_json(cfg)
    check_quantization_config(raw.get("quantization_config"), cfg)
    qraw = dict(raw["quantization_config"])
    traw = qraw.pop("transform_config", None)
    entries = read_headers(path)  # headers only: nothing large is read yet
    with _building(cfg):
        config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # transformers' own loader would drop the transforms
    _check_size(config, entries, cfg)
    with _building(cfg):
        # built directly in the target dtype: a cast afterwards would round RoPE's inv_freq
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if traw:
            apply_transform_config(model, TransformConfig.model_validate(_online_only(traw)))
        qconfig = QuantizationConfig.model_validate(qraw)
        apply_quantization_config(model, qconfig)
        ModelCompressor(quantization_config=qconfig).compress_model(model)
    expected = model.state_dict()
    tied = _tied_copies(expected, traw)
    tied_weights = set(getattr(model, "all_tied_weights_keys", None) or {})
    if not hasattr(model, "all_tied_weights_keys") and getattr(config, "tie_word_embeddings", 0):
        tied_weights.add("lm_head.weight")  # transformers before 5: the head tied to the embedding
    where = path / (INDEX_FILE if (path / INDEX_FILE).is_file() else WEIGHTS_FILE)
    check_tensors(entries, expected, tied, tied_weights, dtype, where, cfg)
    check_sidecar(path, traw)
    state = _read_tensors(entries)
    check_values(state, entries, e8m0=qraw["format"].startswith("mxfp4"))
    for copy, first in tied.items():
        if copy in state and first in state and not torch.equal(state[copy], state[first]):
            raise ExportError(
                f"{entries[copy].file}: tensor {copy!r} differs from {first!r}, which the "
                "config ties it to"
            )
    _, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ExportError(f"{where}: tensors the model does not have: {unexpected[:3]}")
    model.tie_weights()
    ModelCompressor(quantization_config=qconfig).decompress_model(model)
    _to_dtype(model, dtype)
    _check_transforms_present(model, traw)
    model.to(device).eval()
    return model, _load_tokenizer(path, AutoTokenizer)


def _load_tokenizer(path: Path, auto):
    """The export's tokenizer, or None when it has none; a corrupt one is one ExportError."""
    names = ("tokenizer.json", "tokenizer_config.json")
    if not any((path / f).is_file() for f in names):
        return None
    for name in names:
        if (path / name).is_file():
            read_json(path / name)  # bounded, valid JSON, an object
    try:
        return auto.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - the tokenizer library's own error, whatever its type
        why = " ".join(str(exc).split())[:300]
        raise ExportError(f"{path}: its tokenizer files cannot be loaded ({why})") from None


def _to_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Decompressed weights come back in bfloat16 (exact for E2M1 times E8M0): give them the
    model's dtype, as transformers' loader does, so that the linear's GEMM runs in it."""
    from compressed_tensors.offload import disable_onloading

    for module in model.modules():
        w = getattr(module, "weight", None)
        if getattr(module, "quantization_scheme", None) is None or w is None or w.dtype == dtype:
            continue
        new = nn.Parameter(w.data.to(dtype), requires_grad=False)
        with disable_onloading():  # the offload cache would copy into the bfloat16 tensor
            module._parameters["weight"] = new


def _check_transforms_present(model: nn.Module, traw: dict | None) -> None:
    """Every online transform scheme of the config is attached to the model: never drop one."""
    if not traw:
        return
    want = set(_online_only(traw)["config_groups"])
    have = {
        n.rsplit(".", 1)[-1].removesuffix("_input").removesuffix("_output")
        for n, _ in model.named_modules()
        if n.endswith(("_input", "_output"))
    }
    if want - have:
        raise ExportError(f"transforms {sorted(want - have)[:5]} were not applied on load")


def nbytes_on_disk(path: Path) -> int:
    """Total size of the files in a directory."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


__all__ = [
    "NAME",
    "check_request",
    "collect",
    "is_checkpoint",
    "load",
    "quantization_config",
    "write",
    "write_streamed",
]
