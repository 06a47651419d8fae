"""NVFP4 codec against an independent reference: E4M3 values enumerated from their bit patterns,
nearest-even by search; E2M1 by exhaustive search; the codec's float32 scale arithmetic mirrored in NumPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from duquant.formats import QuantSpec, nvfp4

ROUNDINGS = ("even", "away")

# ---------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------


def e4m3_table() -> tuple[np.ndarray, np.ndarray]:
    """(value, byte) of every finite non-negative float8_e4m3fn, ascending: 1 sign, 4 exponent bits
    (bias 7), 3 mantissa bits; exponent 0 is subnormal; 0x7F (exponent 15, mantissa 7) is NaN."""
    vals, codes = [], []
    for byte in range(0x7F):
        exp, man = byte >> 3, byte & 7
        v = math.ldexp(man / 8, -6) if exp == 0 else math.ldexp(1 + man / 8, exp - 7)
        vals.append(v)
        codes.append(byte)
    vals, codes = np.array(vals), np.array(codes)
    assert (np.diff(vals) > 0).all() and vals[-1] == 448.0
    return vals, codes


E4M3_VALUES, E4M3_CODES = e4m3_table()


def ref_e4m3(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest E4M3 value (ties to the even code) of non-negative v <= 448: (values, bytes); NaN -> 0x7F."""
    v = np.asarray(v, dtype=np.float64)
    nan = np.isnan(v)
    vv = np.where(nan, 0.0, v)
    assert (vv >= 0).all() and (vv <= 448).all()
    dist = np.abs(vv[..., None] - E4M3_VALUES)
    best = dist.min(-1, keepdims=True)
    cand = dist == best
    score = np.where(cand, (E4M3_CODES % 2 == 0).astype(float), -1.0)
    idx = score.argmax(-1)
    return np.where(nan, np.nan, E4M3_VALUES[idx]), np.where(nan, 0x7F, E4M3_CODES[idx])


_GRID = np.array(sorted({s * v for v in (0, 0.5, 1, 1.5, 2, 3, 4, 6) for s in (1.0, -1.0)}))
_EVEN = np.isin(np.abs(_GRID), (0, 1, 2, 4))


def ref_round_e2m1(y: np.ndarray, rounding: str = "even") -> np.ndarray:
    """Nearest of the 15 signed E2M1 values (exhaustive search), ties per `rounding`, saturating at ±6."""
    y = np.asarray(y, dtype=np.float64)
    nan = np.isnan(y)
    yc = np.clip(np.where(nan, 0.0, y), -6, 6)
    dist = np.abs(yc[..., None] - _GRID)
    cand = dist == dist.min(-1, keepdims=True)
    pref = _EVEN.astype(float) if rounding == "even" else np.abs(_GRID)
    out = _GRID[np.where(cand, pref, -1.0).argmax(-1)]
    return np.where(nan, np.nan, out)


def ref_tensor_scale(x: np.ndarray) -> np.float32:
    amax = np.float32(np.abs(x).max())
    if amax == 0:
        return np.float32(1.0)
    return np.float32(amax / np.float32(6 * 448))


def ref_nvfp4(x, rounding: str = "even", ts=None) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """(dequantized float32, E4M3 scale bytes, per-tensor scale) of `x` along its last dim."""
    x = np.asarray(x, dtype=np.float32)
    ts = ref_tensor_scale(x) if ts is None else np.float32(ts)
    g = x.reshape(*x.shape[:-1], -1, 16)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        amax = np.abs(g).max(-1)  # float32
        raw = np.minimum((amax / np.float32(6.0)) / ts, np.float32(448.0))  # float32, as the codec
        s64, sbytes = ref_e4m3(raw)
        s = s64.astype(np.float32)[..., None]
        y = np.where(s > 0, g / (s * ts), np.float32(0.0)).astype(np.float32)
        q = ref_round_e2m1(y, rounding).astype(np.float32)
        out = ((q * s) * ts).astype(np.float32)
    return out.reshape(x.shape), sbytes.astype(np.uint8), ts


def qdq(x: np.ndarray, rounding: str = "even", **kw) -> np.ndarray:
    return nvfp4.quantize_dequantize(
        torch.from_numpy(np.ascontiguousarray(x)), "e4m3", rounding, **kw
    ).numpy()


def assert_same(actual, expected, msg=""):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    ok = (actual == expected) | (np.isnan(actual) & np.isnan(expected))
    if not ok.all():
        idx = np.argwhere(~ok)[:5]
        details = [(tuple(int(j) for j in i), actual[tuple(i)], expected[tuple(i)]) for i in idx]
        pytest.fail(
            f"{msg}: {int((~ok).sum())} mismatches, first (index, got, expected): {details}"
        )


# ---------------------------------------------------------------------------------------------
# E4M3 group scales
# ---------------------------------------------------------------------------------------------


def test_e4m3_table_literal():
    assert E4M3_VALUES.size == 127
    assert E4M3_VALUES[1] == 2.0**-9 and E4M3_VALUES[7] == 7 * 2.0**-9 and E4M3_VALUES[8] == 2.0**-6
    assert E4M3_VALUES[0x38] == 1.0 and E4M3_VALUES[0x7E] == 448.0
    assert ref_e4m3(np.array([1.0625, 1.1875, 2.0**-10, 3 * 2.0**-10, 440.0]))[0].tolist() == [
        1.0,  # tie between 1 (0x38) and 1.125 (0x39): even
        1.25,  # tie between 1.125 (0x39) and 1.25 (0x3A): even
        0.0,  # tie between 0 and the smallest subnormal: even
        2.0**-8,  # tie between 2^-9 (0x01) and 2^-8 (0x02): even
        448.0,  # tie between 416 (0x7D) and 448 (0x7E): even
    ]


def test_group_scale_rounding_every_e4m3_midpoint():
    """Groups whose amax/6 is each midpoint between neighbouring E4M3 values (and the float32 values
    beside it): the scale byte must be the nearest, ties to the even code (per-tensor scale 1)."""
    mids = (E4M3_VALUES[:-1] + E4M3_VALUES[1:]) / 2
    amax = []
    for m in mids.astype(np.float32):
        amax += [m, np.nextafter(m, np.float32(0)), np.nextafter(m, np.float32(np.inf))]
    amax = np.array(amax, dtype=np.float32) * np.float32(6)
    x = np.zeros((amax.size + 1, 16), dtype=np.float32)
    x[:-1, 0] = amax
    x[-1, 0] = 2688.0  # tensor amax 6 * 448: per-tensor scale exactly 1
    assert nvfp4.tensor_scale_of(torch.from_numpy(x)).item() == 1.0
    _, sbytes, _ = nvfp4.pack(torch.from_numpy(x.reshape(-1)))
    got = sbytes.numpy()[:-1]
    raw = amax / np.float32(6)  # the group scale before E4M3 rounding (float32, per-tensor scale 1)
    mid = np.repeat(mids, 3)
    lo, hi = np.repeat(E4M3_CODES[:-1], 3), np.repeat(E4M3_CODES[1:], 3)
    even = np.where(lo % 2 == 0, lo, hi)
    expected = np.where(raw < mid, lo, np.where(raw > mid, hi, even))
    assert (raw == mid).sum() == mids.size  # every exact midpoint is exercised
    assert (raw < mid).sum() > mids.size // 2 and (raw > mid).sum() > mids.size // 2
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, ref_e4m3(raw)[1])


# ---------------------------------------------------------------------------------------------
# elements and whole tensors against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_grid_and_ties_over_scales(rounding):
    """Per-tensor scale 1 and group scale 2^k (amax 6 * 2^k) for k = -6..8: grid values are kept, ties
    go to the even code (or away from zero)."""
    mags = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5])
    tie_out = (
        np.array([0, 1, 1, 2, 2, 4, 4])
        if rounding == "even"
        else np.array([0.5, 1, 1.5, 2, 3, 4, 6])
    )
    rows = []
    for k in range(-6, 9):
        s = 2.0**k
        rows.append(np.concatenate([[6 * s], mags[:7] * s, [0.0]]).tolist() + [0.0] * 7)
        rows.append(np.concatenate([[6 * s], ties * s, -ties * s, [0.0]]).tolist())
    rows.append([2688.0] + [0.0] * 15)
    x = np.array(rows, dtype=np.float32)
    out = qdq(x, rounding)
    for i, k in enumerate(range(-6, 9)):
        s = 2.0**k
        np.testing.assert_array_equal(out[2 * i, :8], np.concatenate([[6 * s], mags[:7] * s]))
        np.testing.assert_array_equal(out[2 * i + 1, 1:8], tie_out * s)
        np.testing.assert_array_equal(out[2 * i + 1, 8:15], -tie_out * s)
    assert_same(out, ref_nvfp4(x, rounding)[0], "ties")


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2024)
    outlier = rng.standard_normal((32, 128)).astype(np.float32)
    outlier[:, ::16] *= 300.0
    return {
        "normal": rng.standard_normal((64, 256)).astype(np.float32),
        "heavy": (rng.standard_t(1.5, (64, 256)) * 10).astype(np.float32),
        "wide": (rng.standard_normal((16, 512)) * np.exp2(rng.uniform(-20, 20, (16, 512)))).astype(
            np.float32
        ),
        "outlier": outlier,
        "tiny": (rng.standard_normal((8, 64)) * 1e-30).astype(np.float32),
        "denormal": (rng.standard_normal((4, 64)) * 1e-42).astype(np.float32),
        "huge": (rng.standard_normal((4, 64)) * 1e37).astype(np.float32),
    }


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("kind", ("normal", "heavy", "wide", "outlier", "tiny", "denormal", "huge"))
def test_tensors_match_reference(kind, rounding):
    x = _tensors()[kind]
    ref, ref_bytes, ref_ts = ref_nvfp4(x, rounding)
    assert_same(qdq(x, rounding), ref, f"{kind}/{rounding}")
    codes, sbytes, ts = nvfp4.pack(torch.from_numpy(x), rounding=rounding)
    assert ts.dtype == torch.float32 and ts.item() == ref_ts
    np.testing.assert_array_equal(sbytes.numpy(), ref_bytes)


def test_underflowing_group_scale_gives_zeros():
    x = np.zeros((1, 48), dtype=np.float32)
    x[0, 0] = 2688.0  # per-tensor scale 1
    x[0, 16:20] = [6e-4, -3e-4, 1e-4, 5e-4]  # amax/6 = 1e-4 < 2^-10: E4M3 scale 0
    x[0, 32] = 6 * 2.0**-10  # exactly half the smallest subnormal: ties to the even code 0
    out = qdq(x)
    assert (out[0, 16:] == 0).all()
    _, sbytes, _ = nvfp4.pack(torch.from_numpy(x))
    assert sbytes.tolist() == [[0x7E, 0, 0]]


def test_hand_computed_case():
    # per-tensor scale = 2688 / (6 * 448) = 1
    # group 0: amax 2688 -> s = 448: 2688/448 = 6 -> 2688; 1000/448 = 2.23 -> 2 -> 896;
    #          -300/448 = -0.67 -> -0.5 -> -224; 50/448 = 0.11 -> 0
    # group 1: amax 10 -> 10/6 = 1.667 -> E4M3 1.625 (1.75 is farther): 10/1.625 = 6.15 -> 6 -> 9.75;
    #          5/1.625 = 3.08 -> 3 -> 4.875; -2/1.625 = -1.23 -> -1 -> -1.625; 0.4/1.625 = 0.246 -> 0
    # group 2: amax 0.001 -> 1.67e-4, below half the smallest E4M3 subnormal 2^-9: scale 0, zeros
    x = torch.zeros(48)
    x[:4] = torch.tensor([2688.0, 1000.0, -300.0, 50.0])
    x[16:20] = torch.tensor([10.0, 5.0, -2.0, 0.4])
    x[32:34] = torch.tensor([0.001, -0.0005])
    out = nvfp4.quantize_dequantize(x)
    assert out[:4].tolist() == [2688.0, 896.0, -224.0, 0.0]
    assert out[16:20].tolist() == [9.75, 4.875, -1.625, 0.0]
    assert (out[32:] == 0).all() and (out[4:16] == 0).all() and (out[20:32] == 0).all()
    codes, sbytes, ts = nvfp4.pack(x)
    assert ts.item() == 1.0
    assert sbytes.tolist() == [0x7E, 0x3D, 0x00]  # 448 = 1.75 * 2^8; 1.625 = 1.625 * 2^0
    # codes: 6 -> 7, 2 -> 4 (bytes 0x47); -0.5 -> 9, 0 -> 0 (0x09)
    assert codes[:2].tolist() == [0x47, 0x09]


def test_static_tensor_scale_saturates():
    """With a given per-tensor scale, a group whose amax/6 exceeds 448 * ts clamps to E4M3 448 and its
    elements saturate at 6 * 448 * ts."""
    x = torch.zeros(32)
    x[0], x[1], x[16] = 10000.0, -5000.0, 3.0
    out = nvfp4.quantize_dequantize(x, tensor_scale=torch.tensor(1.0))
    assert out[0].item() == 2688.0 and out[1].item() == -2688.0  # -5000/448 = -11 -> -6
    ref = ref_nvfp4(x.numpy(), ts=1.0)[0]
    assert_same(out.numpy(), ref, "static")
    # a static scale equal to the dynamic one changes nothing
    ts = nvfp4.tensor_scale_of(x)
    assert torch.equal(nvfp4.quantize_dequantize(x, tensor_scale=ts), nvfp4.quantize_dequantize(x))


def test_tensor_scale_definition():
    x = torch.tensor([[0.5, -1344.0] + [0.0] * 14])
    assert nvfp4.tensor_scale_of(x).item() == 0.5  # 1344 / 2688
    assert nvfp4.tensor_scale_of(torch.zeros(16)).item() == 1.0
    assert torch.equal(nvfp4.quantize_dequantize(torch.zeros(2, 16)), torch.zeros(2, 16))


# ---------------------------------------------------------------------------------------------
# pack / unpack, errors, dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_pack_unpack_round_trip(rounding):
    rng = np.random.default_rng(8)
    x = torch.from_numpy((rng.standard_t(2, (3, 10, 64)) * 5).astype(np.float32))
    x[0, 0, :16] = 0.0
    codes, sbytes, ts = nvfp4.pack(x, rounding=rounding)
    assert codes.dtype == torch.uint8 and codes.shape == (3, 10, 32)
    assert sbytes.dtype == torch.uint8 and sbytes.shape == (3, 10, 4)
    back = nvfp4.unpack(codes, sbytes, ts)
    assert torch.equal(back, nvfp4.quantize_dequantize(x, rounding=rounding))
    assert_same(back.numpy(), ref_nvfp4(x.numpy(), rounding)[0], "unpack")
    assert nvfp4.unpack(codes, sbytes, ts, torch.bfloat16).dtype == torch.bfloat16
    # nibble order: even element in the low nibble
    lo, hi = codes & 0x0F, codes >> 4
    from duquant.formats.e2m1 import decode_e2m1

    q = torch.stack((decode_e2m1(lo), decode_e2m1(hi)), -1).flatten(-2)
    scale = sbytes.view(torch.float8_e4m3fn).float().repeat_interleave(16, -1)
    assert torch.equal((q * scale) * ts, back)


@pytest.mark.parametrize("shape", [(3, 17), (8,), (2, 40), ()])
def test_non_divisible_last_dim(shape):
    x = torch.zeros(shape)
    with pytest.raises(ValueError, match="group size 16") as info:
        nvfp4.quantize_dequantize(x, name="act")
    assert str(tuple(shape)) in str(info.value)
    with pytest.raises(ValueError, match="divisible"):
        nvfp4.pack(x)


def test_unknown_scale_rule():
    with pytest.raises(ValueError, match="e4m3"):
        nvfp4.quantize_dequantize(torch.zeros(16), "ocp")
    with pytest.raises(ValueError, match="e4m3"):
        QuantSpec("nvfp4", "ocp")
    assert QuantSpec("nvfp4", "e4m3").group_size == 16


@pytest.mark.parametrize("bad", (math.nan, math.inf, -math.inf))
def test_non_finite_input_gives_nan_everywhere(bad):
    """Documented: a non-finite tensor has no NVFP4 encoding, every output element is NaN."""
    x = torch.randn(4, 32)
    x[2, 5] = bad
    out = nvfp4.quantize_dequantize(x)
    assert torch.isnan(out).all()
    assert not torch.isfinite(nvfp4.tensor_scale_of(x))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_dtype_and_shape_preserved(dtype):
    torch.manual_seed(3)
    x = (torch.randn(2, 3, 4, 32) * 4).to(dtype)
    out = nvfp4.quantize_dequantize(x)
    assert out.dtype == dtype and out.shape == x.shape
    ref = torch.from_numpy(ref_nvfp4(x.float().numpy())[0]).to(dtype)
    assert torch.equal(out, ref)
    assert torch.equal(QuantSpec("nvfp4", "e4m3").fake_quant(x), out)


_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=150, deadline=None, database=None)
@given(
    x=st.integers(1, 4).flatmap(lambda n: hnp.arrays(np.float32, (2, 16 * n), elements=_f32)),
    rounding=st.sampled_from(ROUNDINGS),
)
def test_fuzz_against_reference(x, rounding):
    assert_same(qdq(x, rounding), ref_nvfp4(x, rounding)[0], rounding)
