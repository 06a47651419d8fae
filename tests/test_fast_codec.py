"""The fast MXFP4 / NVFP4 codec against the simple one kept in `duquant.formats.reference`, bit for bit.

Every comparison is of the raw bits (signed zeros and NaN patterns included) and of the dtype, on
large random tensors, on adversarial ones (ties and their float neighbours at many scales, zeros of
both signs, subnormals, NaN / ±Inf groups, values near the float32 maximum) and on hypothesis-drawn
ones, for every scale rule, both roundings and float32 / bfloat16 / float16 inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from duquant.formats import e2m1, mxfp4, nvfp4
from duquant.formats import reference as ref
from duquant.formats.e2m1 import round_to_e2m1, same_bits

ROUNDINGS = ("even", "away")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Single-threaded, like test_gptq: OpenMP barriers on a busy 2-core machine cost more than they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Same dtype, shape and bits; on failure, show the first differing values."""
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, want.dtype)
    if not same_bits(got, want):
        diff = got.float().view(torch.int32) != want.float().view(torch.int32)
        pytest.fail(
            f"{what}: {int(diff.sum())} elements differ, e.g. {got[diff][:4].tolist()} "
            f"instead of {want[diff][:4].tolist()}"
        )


def _tie_row(k: int) -> torch.Tensor:
    """32 values scaled by 2^k: 6 (the group max), the ties of both signs and their neighbours."""
    t = torch.tensor(TIES)
    up, down = torch.nextafter(t, torch.tensor(9.0)), torch.nextafter(t, torch.tensor(0.0))
    row = torch.cat([torch.tensor([6.0]), t, -t, up, -down, torch.tensor([0.0, -0.0, -0.1])])
    return row * 2.0**k


def adversarial(rows: int = 96, width: int = 256, seed: int = 0) -> torch.Tensor:
    """Random rows at scales 2^-140..2^120, then rows of corner cases (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp2(torch.randint(-140, 120, (rows, 1), generator=g).float())
    x = torch.randn(rows, width, generator=g) * scales
    x[0, :32], x[1, :32] = 0.0, -0.0
    x[2, 5], x[3, 7], x[4, 9], x[5, 3] = float("nan"), float("inf"), -float("inf"), -float("nan")
    x[6, :32] = 1e-45  # the smallest subnormal
    x[7, :32] = torch.randn(32, generator=g) * 1e-40  # subnormals
    x[8, :] = torch.rand(width, generator=g) * 3.4e38  # near the float32 maximum
    x[9, :32] = -1e-30  # a group of tiny negatives (rounds to -0)
    for i, k in enumerate(range(-40, 40, 2)):
        x[10 + i, :32] = _tie_row(k)
        x[10 + i, 32:64] = -_tie_row(k).flip(0)
    return x


def random_large(seed: int = 1) -> torch.Tensor:
    """An activation-like tensor: normal values with a few heavy channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 1536, generator=g)
    x[:, ::97] *= 40.0
    return x


INPUTS = {"random": random_large(), "adversarial": adversarial()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("rule", mxfp4.SCALE_RULES)
@pytest.mark.parametrize("kind", INPUTS)
def test_mxfp4_matches_reference(kind, rule, rounding, dtype):
    x = INPUTS[kind].to(dtype)
    want = ref.mx_quantize_dequantize(x, rule, rounding)
    assert_bits(mxfp4.quantize_dequantize(x, rule, rounding), want, f"{kind} {rule}/{rounding}")
    inplace = mxfp4.quantize_dequantize(x.clone(), rule, rounding, inplace=True)
    assert_bits(inplace, want, f"in place {kind} {rule}/{rounding}")


@pytest.mark.parametrize("rule", mxfp4.SCALE_RULES)
@pytest.mark.parametrize("kind", INPUTS)
def test_mxfp4_group_scales_and_round_with_scale_match_reference(kind, rule):
    x = INPUTS[kind]
    scales = mxfp4.group_scales(x, rule)
    assert_bits(scales, ref.mx_group_scales(x, rule), f"group_scales {rule}")
    if rule == "duquantpp-loggrid":
        return  # its grid spans the tensor: GPTQ's column-wise rounding does not apply
    wide = scales.repeat_interleave(mxfp4.GROUP_SIZE, dim=-1)
    for rounding in ROUNDINGS:
        got = mxfp4.round_with_scale(x, wide, rule, rounding)
        assert_bits(got, ref.mx_round_with_scale(x, wide, rule, rounding), f"round {rule}")


def test_inplace_overwrites_only_owned_float32():
    x = random_large()[:64]
    y = x.clone()
    out = mxfp4.quantize_dequantize(y, inplace=True)
    assert out.data_ptr() == y.data_ptr()  # the caller's buffer was reused
    half = x.to(torch.bfloat16)
    before = half.clone()
    mxfp4.quantize_dequantize(half, inplace=True)  # a bfloat16 input is never overwritten
    assert_bits(half, before, "bfloat16 input")
    strided = x.t()
    before = strided.clone()
    nvfp4.quantize_dequantize(strided.contiguous().t(), inplace=True)
    assert_bits(strided, before, "a non-contiguous input is never overwritten")


TENSOR_SCALES = (None, 1.0, 1e-42, 0.0, float("inf"), -1.0, float("nan"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("kind", INPUTS)
def test_nvfp4_matches_reference(kind, rounding, dtype):
    x = INPUTS[kind].to(dtype)
    for ts in TENSOR_SCALES:
        t = None if ts is None else torch.tensor(ts)
        want = ref.nv_quantize_dequantize(x, rounding, t)
        got = nvfp4.quantize_dequantize(x, rounding=rounding, tensor_scale=t)
        assert_bits(got, want, f"{kind} {rounding} ts={ts}")
        got = nvfp4.quantize_dequantize(x.clone(), rounding=rounding, tensor_scale=t, inplace=True)
        assert_bits(got, want, f"in place {kind} {rounding} ts={ts}")
    assert_bits(nvfp4.tensor_scale_of(x), ref.nv_tensor_scale(x), "tensor scale")


def test_nvfp4_tiny_tensor_scale_corner():
    """A subnormal tensor: ts underflows, s * ts is 0 in live groups and g / 0 gives ±Inf and NaN."""
    x = torch.zeros(4, 32)
    x[0, :5] = torch.tensor([1e-44, -1e-44, 0.0, -0.0, 3e-45])
    for rounding in ROUNDINGS:
        assert_bits(
            nvfp4.quantize_dequantize(x, rounding=rounding),
            ref.nv_quantize_dequantize(x, rounding),
            rounding,
        )


def _float_sweep() -> torch.Tensor:
    """float32 values: every binade from 2^-149 to 2^3 at 4096 mantissas, ties and their neighbours."""
    mant = torch.arange(0, 1 << 23, 1 << 11, dtype=torch.int32)
    exps = torch.arange(0, 131, dtype=torch.int32)  # biased exponents: subnormals up to [8, 16)
    bits = (exps[:, None] << 23 | mant[None, :]).reshape(-1)
    vals = bits.view(torch.float32)
    t = torch.tensor(TIES + (6.0, 7.0, 8.0))
    near = torch.cat(
        [t, torch.nextafter(t, torch.tensor(99.0)), torch.nextafter(t, torch.tensor(0.0))]
    )
    specials = torch.tensor([0.0, float("inf"), float("nan"), 3.4028235e38, 1e-45])
    out = torch.cat([vals, near, specials])
    return torch.cat([out, -out])


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize(
    "dtype", (torch.float32, torch.float64, torch.bfloat16, torch.float16), ids=str
)
def test_round_to_e2m1_matches_reference_on_a_float_sweep(dtype, rounding):
    y = _float_sweep().to(dtype)
    assert_bits(round_to_e2m1(y, rounding), ref.round_to_e2m1(y, rounding), f"{dtype} {rounding}")


@pytest.mark.parametrize("rule", mxfp4.AMAX_RULES)
def test_exponent_from_bits_matches_frexp(rule):
    a = _float_sweep().abs()
    a = a[torch.isfinite(a)]
    mant = torch.tensor([0, 1, 0x3FFFFF, 0x400000, 0x400001, 0x5FFFFF, 0x600000, 0x7FFFFF])
    edges = ((torch.arange(0, 255)[:, None] << 23) | mant).reshape(-1).to(torch.int32)
    a = torch.cat([a, edges.view(torch.float32)])
    e, bad = mxfp4._exponent_from_bits(a, rule)
    assert not bad.any()
    assert torch.equal(e, mxfp4.shared_exponent(a, rule))


def test_pow2_from_bits_is_ldexp():
    e = torch.arange(-127, 128, dtype=torch.int32)
    assert_bits(mxfp4._pow2(e), torch.ldexp(torch.ones(255), e), "2^e")


_finite = st.floats(width=32, allow_nan=False, allow_infinity=False)
_special = st.sampled_from([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-45, -1e-45])
_values = st.one_of(_finite, _finite.map(lambda v: v * 2.0**-100), _special)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 4), st.sampled_from([32, 64, 96])),
        elements=_values,
    ),
    st.sampled_from(mxfp4.SCALE_RULES),
    st.sampled_from(ROUNDINGS),
    st.sampled_from(DTYPES),
)
def test_hypothesis_mxfp4_and_nvfp4(arr, rule, rounding, dtype):
    x = torch.from_numpy(arr).to(dtype)
    want = ref.mx_quantize_dequantize(x, rule, rounding)
    assert_bits(mxfp4.quantize_dequantize(x, rule, rounding), want, f"mx {rule}/{rounding}")
    assert_bits(
        mxfp4.quantize_dequantize(x.clone(), rule, rounding, inplace=True), want, "mx in place"
    )
    nv_want = ref.nv_quantize_dequantize(x, rounding)
    assert_bits(nvfp4.quantize_dequantize(x, rounding=rounding), nv_want, f"nv {rounding}")


@pytest.mark.slow
def test_compiled_codec_matches_reference(monkeypatch):
    """With $DUQUANT_COMPILE_CODEC=1 the fused kernels give the reference bits (or stand down)."""
    monkeypatch.setenv(e2m1.COMPILE_ENV, "1")
    x = torch.cat([INPUTS["random"][:, :1024], adversarial(rows=128, width=1024, seed=3)])
    cases = [("mxfp4", "ocp", "even"), ("mxfp4", "fpquant", "away"), ("nvfp4", "e4m3", "even")]
    for fmt, rule, rounding in cases:
        if fmt == "mxfp4":
            got = mxfp4.quantize_dequantize(x, rule, rounding)
            want = ref.mx_quantize_dequantize(x, rule, rounding)
        else:
            got = nvfp4.quantize_dequantize(x, rounding=rounding)
            want = ref.nv_quantize_dequantize(x, rounding)
        assert_bits(got, want, f"compiled {fmt} {rule}/{rounding}")
        # the first call compared the kernel with the eager code: a key left off fell back
        key = (fmt, rule, rounding) if fmt == "mxfp4" else (fmt, rounding, False)
        if (*key, x.dtype, x.shape[-1]) in e2m1._compile_off:
            pytest.skip(f"torch.compile unavailable or different here for {key}")
