"""Export to compressed-tensors: round trips bit for bit, packing against the peer's compressor, bad input."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_tiny_llama

pytest.importorskip("compressed_tensors")

from duquant import export  # noqa: E402
from duquant.api import load_model  # noqa: E402
from duquant.config import RunConfig  # noqa: E402
from duquant.export import ExportError  # noqa: E402
from duquant.export import ct as ct_export  # noqa: E402
from duquant.formats import QuantSpec  # noqa: E402
from duquant.formats.e2m1 import same_bits  # noqa: E402
from duquant.methods import get_method  # noqa: E402
from duquant.models import adapter_for  # noqa: E402
from duquant.pipeline import QuantConfig, quantize_model  # noqa: E402
from duquant.qlinear import QuantLinear  # noqa: E402
from duquant.stages import Smooth  # noqa: E402

EXPORTABLE = (
    "rtn",
    "smoothquant",
    "hadamard",
    "random-hadamard",
    "smooth+hadamard",
    "duquant++",
    "duquant++mx",
    "duquant++learn",
    "duquant++e2e",
    "duquant++nt",
    "mr-gptq",
)


def _quantized_tiny(method: str, weights: str = "rtn", seed: int = 0):
    """A tiny Llama quantized in process by `method` (MXFP4 W4A4)."""
    model = make_tiny_llama(seed)
    calib = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(seed))
    quantize_model(
        model, adapter_for(model), get_method(method), QuantConfig(weights=weights), calib, seed
    )
    return model


@pytest.mark.parametrize("weights", ["rtn", "gptq"])
@pytest.mark.parametrize("method", EXPORTABLE)
def test_round_trip_is_bit_identical(tmp_path: Path, method: str, weights: str) -> None:
    model = _quantized_tiny(method, weights)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    export.save(model, None, tmp_path / "out", {})
    back = load_model(str(tmp_path / "out"))
    with torch.no_grad():
        out = back.model(ids).logits
    assert out.dtype == ref.dtype and same_bits(out, ref)
    # the transforms were attached, one per online input position
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    schemes = cfg.get("transform_config", {}).get("config_groups", {})
    attached = [n for n, _ in back.model.named_modules() if n.endswith("_input")]
    n_targets = sum(len(s["apply"][0]["targets"]) for s in schemes.values())
    assert len(attached) == n_targets
    if any(not isinstance(s, Smooth) for s in get_method(method).transforms):
        assert schemes  # rotation methods carry transforms; without them the logits would differ


@pytest.mark.parametrize("method", ["rtn", "duquant++"])
def test_round_trip_in_bfloat16(tmp_path: Path, method: str) -> None:
    from conftest import TINY_CONFIG
    from transformers import LlamaConfig, LlamaForCausalLM

    # built in bfloat16 (a cast afterwards would round RoPE's inv_freq differently from the loader)
    model = LlamaForCausalLM._from_config(
        LlamaConfig(**TINY_CONFIG, tie_word_embeddings=False), dtype=torch.bfloat16
    )
    model.load_state_dict(make_tiny_llama().state_dict())
    model.eval()
    calib = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    quantize_model(
        model, adapter_for(model), get_method(method), QuantConfig(weights="gptq"), calib
    )
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    export.save(model, None, tmp_path / "out", {})
    back = load_model(str(tmp_path / "out"), "bfloat16")
    with torch.no_grad():
        out = back.model(ids).logits
    assert out.dtype == ref.dtype == torch.bfloat16 and same_bits(out, ref)


@pytest.mark.parametrize("method", ["rtn", "duquant++"])
def test_nvfp4_export_reloads_with_calibrated_activation_scales(
    tmp_path: Path, method: str
) -> None:
    """NVFP4: the peer's format takes a static activation global scale, so the reload is not
    bit-identical to duquant's per-tensor dynamic one; weights and the activation codec are."""
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    from duquant.formats import nvfp4, spec_for

    model = make_tiny_llama()
    calib = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    quant = QuantConfig(spec_for("nvfp4"), spec_for("nvfp4"), weights="gptq")
    quantize_model(model, adapter_for(model), get_method(method), quant, calib)
    with pytest.raises(ExportError, match="calibration windows"):
        export.save(model, None, tmp_path / "no", {})
    export.save(model, None, tmp_path / "out", {}, calib=calib)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "nvfp4-pack-quantized"
    back = load_model(str(tmp_path / "out")).model
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(5))
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        other = back.get_submodule(name)
        # weights: the codes and E4M3 scales decode to ours up to compressed-tensors' bfloat16
        # dequantization of scale / global scale
        assert torch.allclose(other.weight, mod.weight, rtol=2**-8, atol=0)
        # activations: compressed-tensors' codec with the calibrated global scale is ours with a
        # fixed tensor scale, up to its s / (1 / ts) against our s * ts (one float32 rounding)
        ts = 1.0 / other.input_global_scale.float().reshape(())
        theirs = forward_quantize(other, x, "input", other.quantization_scheme.input_activations)
        ours = nvfp4.quantize_dequantize(x, tensor_scale=ts)
        assert torch.allclose(theirs, ours, rtol=1e-6, atol=0)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = model(ids).logits, back(ids).logits
    assert (
        torch.isfinite(out).all()
        and torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.95
    )


def test_quarot_exports_its_global_hadamard_once(tmp_path: Path) -> None:
    """QuaRot's online down_proj Hadamard (a Kronecker product in process) is one dense ±1 matrix
    shared by every layer; the reload computes it as one product, so it is close, not bit-exact."""
    from safetensors.torch import load_file

    model = _quantized_tiny("quarot", "gptq")
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    export.save(model, None, tmp_path / "out", {})
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    schemes = cfg["quantization_config"]["transform_config"]["config_groups"]
    assert len(schemes) == 1 and cfg["tie_word_embeddings"] is False
    (scheme,) = schemes.values()
    assert scheme["head_dim"] == 128 and len(scheme["apply"][0]["targets"]) == 2
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    (mat,) = [v for k, v in tensors.items() if k.endswith("_input.weight")]
    assert torch.equal(mat.abs(), torch.ones_like(mat)) and torch.equal(
        mat @ mat.T, 128 * torch.eye(128)
    )
    with torch.no_grad():
        out = load_model(str(tmp_path / "out")).model(ids).logits
    assert torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0) > 0.999


def test_transforms_are_never_dropped_silently(tmp_path: Path) -> None:
    # a config whose transforms went missing leaves rotation matrices nobody applies: refused
    model = _quantized_tiny("duquant++")
    export.save(model, None, tmp_path / "out", {})
    cfg_path = tmp_path / "out" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["quantization_config"]["transform_config"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="tensors the model does not have"):
        load_model(str(tmp_path / "out"))


def test_written_tensors_are_the_models_codes(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model = _quantized_tiny("duquant++", "gptq")
    export.save(model, None, tmp_path / "out", {})
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            packed, scale = tensors[f"{name}.weight_packed"], tensors[f"{name}.weight_scale"]
            assert packed.dtype == torch.uint8 and packed.shape == (
                mod.out_features,
                mod.in_features // 2,
            )
            assert scale.dtype == torch.uint8 and scale.shape == (
                mod.out_features,
                mod.in_features // 32,
            )
            # hand decode: low nibble = even column; sign bit 3; E2M1 magnitudes; 2^(s - 127)
            codes = torch.stack((packed & 15, packed >> 4), -1).flatten(-2).long()
            mag = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])[codes & 7]
            vals = torch.where(codes >= 8, -mag, mag)
            w = vals * torch.exp2(scale.double() - 127).float().repeat_interleave(32, 1)
            assert torch.equal(w, mod.weight.float())
            # GPTQ's own scales, as the layer keeps them (not re-derived from the weights)
            assert torch.equal(torch.exp2(scale.double() - 127).float(), mod.qweight.scales)


@pytest.mark.parametrize(
    ("fmt", "rule"),
    [("mxfp4", r) for r in ("ocp", "fpquant", "ceil", "ct-round", "mse", "duquantpp-loggrid")]
    + [("nvfp4", "e4m3")],
)
@pytest.mark.parametrize("rounding", ["even", "away"])
def test_kept_codes_decode_to_fake_quant(fmt: str, rule: str, rounding: str) -> None:
    # the layer's weight is decoded from its codes and scales: it must be what fake_quant gives
    spec = QuantSpec(fmt, rule, rounding)
    for scale in (1.0, 1e-3, 50.0):
        w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * scale
        w[3, :40] *= 100
        assert same_bits(spec.quantize_weight(w).dequantize(), spec.fake_quant(w))


def test_gptq_layers_keep_the_codes_they_compute_with() -> None:
    from duquant.gptq import gptq_quantize, hessian_from_inputs

    spec = QuantSpec("mxfp4", "ct-round")
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(48, 128, generator=g), torch.randn(512, 128, generator=g)
    res = gptq_quantize(w, hessian_from_inputs(x), spec)
    from duquant.gptq import as_quantized_weight

    assert same_bits(as_quantized_weight(res, spec).dequantize(), res.weight)
    model = _quantized_tiny("duquant++", "gptq")
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            assert same_bits(mod.qweight.dequantize(), mod.weight.float())


@pytest.mark.parametrize("rule", ["ocp", "ceil", "ct-round", "mse"])
def test_packing_matches_compressed_tensors_mxfp4_compressor(rule: str) -> None:
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    spec = QuantSpec("mxfp4", rule)
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(3))
    w[5, :32] *= 40
    w[7, 64:96] = 0.0  # an all-zero group: scale 2^-127
    qw = spec.quantize_weight(w)
    ours = ct_export.export_tensors(qw)
    scheme = preset_name_to_scheme("MXFP4", ["Linear"])
    theirs = MXFP4PackedCompressor.compress(
        {"weight": qw.dequantize(), "weight_scale": qw.scales}, scheme
    )
    assert torch.equal(ours["weight_packed"], theirs["weight_packed"])
    assert torch.equal(ours["weight_scale"], theirs["weight_scale"].to(torch.uint8))


def test_packing_matches_compressed_tensors_nvfp4_compressor() -> None:
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    spec = QuantSpec("nvfp4", "e4m3")
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(4)) * 0.02
    qw = spec.quantize_weight(w)
    ours = ct_export.export_tensors(qw)
    scheme = preset_name_to_scheme("NVFP4", ["Linear"])
    theirs = NVFP4PackedCompressor.compress(
        {
            "weight": qw.dequantize(),
            "weight_scale": qw.scales,
            "weight_global_scale": ours["weight_global_scale"],
        },
        scheme,
    )
    assert torch.equal(ours["weight_packed"], theirs["weight_packed"])
    assert torch.equal(
        ours["weight_scale"].view(torch.uint8), theirs["weight_scale"].view(torch.uint8)
    )


def test_config_validates_with_compressed_tensors(tmp_path: Path) -> None:
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    from compressed_tensors.transform import TransformConfig

    export.save(_quantized_tiny("duquant++mx"), None, tmp_path / "out", {})
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    tc = TransformConfig.model_validate(qc.pop("transform_config"))
    parsed = QuantizationConfig.model_validate(qc)
    group = parsed.config_groups["group_0"]
    preset = preset_name_to_scheme("MXFP4", ["Linear"])
    # as the peer serialises its own MXFP4 preset (zp_dtype and observer are not serialised)
    assert group.weights.model_dump() == preset.weights.model_dump()
    assert group.input_activations.model_dump() == preset.input_activations.model_dump()
    assert parsed.format == "mxfp4-pack-quantized" and parsed.ignore == ["lm_head"]
    # 2 layers x (qkv, o, gate_up, down): head_dim 16 < 32 keeps the o rotation online
    assert len(tc.config_groups) == 8
    assert all(s.type == "random-hadamard" and s.head_dim == 32 for s in tc.config_groups.values())


# ---- bad input -------------------------------------------------------------------------------


def _no_model_load(monkeypatch) -> None:
    """Make any model load fail the test: refusals must come before it."""
    from conftest import forbid_model_loading

    forbid_model_loading(monkeypatch, "the model was loaded before the request was refused")


def test_non_empty_directory_refused_before_loading(tmp_path: Path, monkeypatch, capsys) -> None:
    from duquant.cli import main

    (tmp_path / "keep.txt").write_text("mine")
    _no_model_load(monkeypatch)
    assert main(["run", "--method", "rtn", "--save", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err and "not empty" in err
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("method", "what"),
    [("duquant", "permutation"), ("fp", "nothing to export")],
)
def test_unexportable_method_refused_before_loading(
    tmp_path: Path, monkeypatch, capsys, method: str, what: str
) -> None:
    from duquant.cli import main

    _no_model_load(monkeypatch)
    assert main(["run", "--method", method, "--save", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and what in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("args", "what"),
    [
        (["--format", "nvfp4", "--a-scale-rule", "e4m3", "--rounding", "away"], "run time"),
        (["--w-scale-rule", "fpquant"], "not exportable"),
        (["--a-scale-rule", "ocp"], "compressed-tensors computes at run time"),
    ],
)
def test_unexpressible_formats_refused_before_loading(
    tmp_path: Path, monkeypatch, capsys, args: list[str], what: str
) -> None:
    from duquant.cli import main

    _no_model_load(monkeypatch)
    assert main(["run", "--method", "rtn", "--save", str(tmp_path / "x"), *args]) == 2
    assert what in capsys.readouterr().err


def test_online_transform_check_names_the_steps() -> None:
    from duquant.transforms.base import BlockRotation, Permutation, Sequence

    seq = Sequence([BlockRotation(torch.eye(32)), Permutation(torch.arange(64).flip(0))])
    with pytest.raises(ExportError, match="BlockRotation then Permutation"):
        ct_export.online_rotation(seq, "layers.0.qkv input")


def _partial_dirs(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_full_disk_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    import safetensors.torch

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 1000)  # a half-written file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(ExportError, match="disk is full"):
        export.save(_quantized_tiny("rtn"), None, tmp_path / "out", {})
    assert not (tmp_path / "out").exists() and not _partial_dirs(tmp_path)


def test_interrupt_leaves_nothing_and_keeps_the_old_export(tmp_path: Path, monkeypatch) -> None:
    import safetensors.torch

    model = _quantized_tiny("rtn")
    export.save(model, None, tmp_path / "out", {})
    before = (tmp_path / "out" / "model.safetensors").read_bytes()

    def interrupted(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.save(model, None, tmp_path / "out", {}, overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    assert not _partial_dirs(tmp_path)


def test_overwrite_replaces_and_non_empty_is_refused(tmp_path: Path) -> None:
    model = _quantized_tiny("rtn")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export.save(model, None, tmp_path / "out", {})
    export.save(model, None, tmp_path / "out", {}, overwrite=True)
    assert not (tmp_path / "out" / "old.txt").exists()
    assert (tmp_path / "out" / "model.safetensors").is_file() and not _partial_dirs(tmp_path)
    (tmp_path / "plain").mkdir()  # the export gets the modes of a plain directory
    assert (tmp_path / "out").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_quantizing_an_export_again_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    from duquant.cli import main

    export.save(_quantized_tiny("rtn"), None, tmp_path / "out", {})
    _no_model_load(monkeypatch)
    assert main(["run", "--model", str(tmp_path / "out"), "--method", "rtn"]) == 2
    assert "--method fp" in capsys.readouterr().err


def test_loading_without_compressed_tensors_says_how_to_fix(tmp_path: Path, monkeypatch) -> None:
    export.save(_quantized_tiny("rtn"), None, tmp_path / "out", {})
    monkeypatch.setitem(sys.modules, "compressed_tensors.compressors", None)  # import fails
    with pytest.raises(ExportError, match=r"duquant\[export\]"):
        load_model(str(tmp_path / "out"))


def test_sidecar_records_the_run(tmp_path: Path) -> None:
    result = {
        "config": {
            "run": RunConfig(method="rtn").to_dict(),
            "calibration": {"sha256": "ab" * 32},
        },
        "metrics": {"wikitext2": {"ppl": 12.5, "windows": 3, "seqlen": 512}},
    }
    export.save(_quantized_tiny("rtn"), None, tmp_path / "out", result)
    side = json.loads((tmp_path / "out" / "duquant.json").read_text())
    assert side["run"]["method"] == "rtn" and side["calibration_sha256"] == "ab" * 32
    assert side["perplexity"]["wikitext2"]["ppl"] == 12.5
    assert side["sizes"]["bits_per_quantized_weight"] == pytest.approx(4.25)
    assert "12.5000" in (tmp_path / "out" / "README.md").read_text()


# ---- the real model ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.model
def test_real_model_export_round_trip(tmp_path: Path, offline_data, smollm) -> None:
    """duquant++mx with GPTQ on SmolLM2: the reloaded export's logits and PPL equal in-process."""
    from duquant.models import default_model

    # the model this process found, whatever install the subprocess's PYTHONPATH resolves to
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    env["DUQUANT_MODEL"] = str(default_model())
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "export_roundtrip.py"),
        "--methods",
        "duquant++mx*",
        "--max-windows",
        "1",
        "--seqlen",
        "256",
        "--nsamples",
        "4",
        "--calib-seqlen",
        "128",
        "--out",
        str(tmp_path / "rt.json"),
        "--no-fp-size",
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO / "benchmarks", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    row = json.loads((tmp_path / "rt.json").read_text())["rows"][0]
    assert row["logits_bit_identical"] and row["logits_max_abs_diff"] == 0.0
    assert row["ppl_reloaded"] == row["ppl_in_process"]
    assert 4.2 < row["bits_per_quantized_weight"] < 4.3
