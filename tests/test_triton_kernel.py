"""The fused Triton rotation + MXFP4 kernel against the torch codec, bit for bit.

On a CUDA machine the kernel is compiled and run on the GPU; elsewhere conftest switches Triton's
CPU interpreter on, which executes the same kernel source on CPU tensors.
"""

from __future__ import annotations

import pytest
import torch

from duquant.formats import mxfp4
from duquant.formats.e2m1 import same_bits
from duquant.transforms.base import BlockRotation
from duquant.transforms.hadamard import block_hadamard

pytest.importorskip("triton")
from duquant.kernels import rotate_quantize_mxfp4  # noqa: E402
from duquant.kernels.triton_mx import interpreter_on  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreter_on():
    pytest.skip("triton was imported before TRITON_INTERPRET was set", allow_module_level=True)

RULES = ("ocp", "ceil", "ct-round")


def _hard_tensor(rows: int = 70, k: int = 96, seed: int = 0) -> torch.Tensor:
    """Values over 12 decades with the special cases: NaN, Inf, zero and negative-zero groups,
    ties of the E2M1 grid and a group whose maximum sits at the ct-round threshold."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * torch.logspace(-6, 6, k)
    x[3, 5] = float("nan")
    x[7, 40] = float("-inf")
    x[9, 64:96] = 0.0
    x[10, :32] = -0.0
    # scaled by 2^-2 (ocp's e for amax in [4, 8)): exact ties 0.25, 0.75, ..., 5 of the grid
    x[11, :8] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0])
    x[12, :2] = torch.tensor([7.0, -0.75])  # mantissa 1.75: ct-round's step up
    x[13, 32:34] = torch.tensor([6.0, 5.0])  # ceil keeps e, the 5 is a tie
    return x


@pytest.mark.parametrize("rounding", ["even", "away"])
@pytest.mark.parametrize("rule", RULES)
def test_quantize_only_matches_torch_codec_bit_for_bit(rule: str, rounding: str) -> None:
    x = _hard_tensor()
    ref = mxfp4.quantize_dequantize(x, rule, rounding)
    out = rotate_quantize_mxfp4(x.to(DEVICE), None, rule, rounding).cpu()
    assert same_bits(out, ref)


@pytest.mark.parametrize("rule", RULES)
def test_pack_matches_torch_pack(rule: str) -> None:
    x = _hard_tensor(seed=1)
    codes, scales = rotate_quantize_mxfp4(x.to(DEVICE), None, rule, "even", pack=True)
    ref_codes, ref_scales = mxfp4.pack(x, rule, "even")
    assert torch.equal(codes.cpu(), ref_codes)
    assert torch.equal(scales.cpu(), ref_scales)


@pytest.mark.parametrize("shared", [True, False])
def test_rotation_matches_block_rotation_then_codec_exactly(shared: bool) -> None:
    # integers times a signed Hadamard (entries +-1/8): every product and partial sum is exact, so
    # any summation order gives the same rotated floats and the fused result must match bit for bit
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-4000, 4000, (50, 128), generator=g).float()
    x *= 2.0 ** torch.randint(-20, 20, (1, 128), generator=g).float()
    signs = torch.randint(0, 2, (4, 32), generator=g).float() * 2 - 1
    h = torch.sign(block_hadamard(32)) / 8  # +-1/8
    r = h if shared else torch.stack([h * s[:, None] for s in signs])
    ref = mxfp4.quantize_dequantize(BlockRotation(r)(x), "ct-round")
    out = rotate_quantize_mxfp4(x.to(DEVICE), r.to(DEVICE), "ct-round").cpu()
    assert same_bits(out, ref)


def test_random_rotation_agrees_up_to_summation_order() -> None:
    # a dense orthogonal R rounds partial sums; only values at a grid midpoint after rounding may
    # land on the other neighbour, so nearly every element is identical
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 192, generator=g) * 3
    r, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    ref = mxfp4.quantize_dequantize(BlockRotation(r.float())(x), "ct-round")
    out = rotate_quantize_mxfp4(x.to(DEVICE), r.float().to(DEVICE), "ct-round").cpu()
    assert (out != ref).float().mean() < 1e-3
    assert torch.allclose(out, ref, rtol=0.5, atol=0.0)  # never more than one grid step apart


def test_leading_dims_and_rows_not_a_multiple_of_the_tile() -> None:
    x = torch.randn(3, 37, 64)
    ref = mxfp4.quantize_dequantize(x, "ocp")
    out = rotate_quantize_mxfp4(x.to(DEVICE), None, "ocp", block_m=16).cpu()
    assert out.shape == x.shape and same_bits(out, ref)


def test_bad_arguments_say_what_to_do() -> None:
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="rules"):
        rotate_quantize_mxfp4(x, None, "fpquant")
    with pytest.raises(ValueError, match="divisible"):
        rotate_quantize_mxfp4(torch.randn(4, 40), None, "ocp")
    with pytest.raises(ValueError, match="rotation of shape"):
        rotate_quantize_mxfp4(x, torch.eye(16), "ocp")


def test_input_quantizer_uses_the_kernel_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from duquant.formats import spec_for
    from duquant.qlinear import InputQuantizer
    from duquant.transforms.base import Sequence

    g = torch.Generator().manual_seed(4)
    x = torch.randint(-500, 500, (2, 9, 64), generator=g).float().to(DEVICE)
    h = torch.sign(block_hadamard(32)) / 8
    iq = InputQuantizer(Sequence([BlockRotation(h)]), spec_for("mxfp4")).to(DEVICE)
    monkeypatch.delenv("DUQUANT_TRITON", raising=False)
    ref = iq(x)
    iq.reset()
    calls = []
    import duquant.kernels.triton_mx as tm

    real = tm.rotate_quantize_mxfp4
    monkeypatch.setattr(
        tm, "rotate_quantize_mxfp4", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    monkeypatch.setenv("DUQUANT_TRITON", "1")
    out = iq(x)
    assert calls and same_bits(out.cpu(), ref.cpu())
    # a rule the kernel does not implement falls back to the torch codec
    iq2 = InputQuantizer(None, spec_for("mxfp4", scale_rule="mse")).to(DEVICE)
    calls.clear()
    iq2(x)
    assert not calls
