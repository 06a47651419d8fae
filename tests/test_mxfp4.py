"""MXFP4 codec against an independent brute-force reference written here in Python / NumPy.

The reference computes each group's scale from the rule's definition on Python floats (math.frexp,
math.log2, exact comparisons), then picks the nearest of the 15 signed E2M1 values by exhaustive search
(ties to the even code, or away from zero), saturating at ±6. Arithmetic is in float64, where every
step is exact for float32 inputs, and the result is rounded to float32 once.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from duquant.formats import QuantSpec, mxfp4

POW2_RULES = ("ocp", "fpquant", "ceil", "ct-round")
ROUNDINGS = ("even", "away")

# ---------------------------------------------------------------------------------------------
# independent reference
# ---------------------------------------------------------------------------------------------

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # index = 3-bit magnitude code
E2M1_TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # midpoints between neighbouring magnitudes
_GRID = np.array(sorted({s * v for v in E2M1_MAGNITUDES for s in (1.0, -1.0)}))  # 15 signed values
assert _GRID.size == 15
_GRID_CODE = np.array([E2M1_MAGNITUDES.index(abs(v)) for v in _GRID])
_GRID_EVEN = _GRID_CODE % 2 == 0  # magnitudes 0, 1, 2, 4 have an even mantissa bit


def ref_round_e2m1(y: np.ndarray, rounding: str = "even") -> np.ndarray:
    """Nearest E2M1 value by exhaustive search over the 15 signed grid values (float64 in, float64 out)."""
    y = np.asarray(y, dtype=np.float64)
    nan = np.isnan(y)
    yc = np.clip(np.where(nan, 0.0, y), -6.0, 6.0)  # saturate first, so distances stay exact
    dist = np.abs(yc[..., None] - _GRID)
    best = dist.min(axis=-1, keepdims=True)
    cand = dist == best
    if rounding == "even":
        pref = np.where(_GRID_EVEN, 1, 0)
    elif rounding == "away":
        pref = np.abs(_GRID)  # the larger magnitude of two tied neighbours is the one away from 0
    else:
        raise AssertionError(rounding)
    score = np.where(cand, pref, -1.0)
    assert ((cand.sum(-1) == 1) | (cand.sum(-1) == 2)).all()
    out = _GRID[score.argmax(axis=-1)]
    return np.where(nan, np.nan, out)


def ref_floor_log2(a: float) -> int:
    """floor(log2 a) for a finite a > 0, exactly (from the float's exponent)."""
    m, ex = math.frexp(a)  # a = m * 2^ex with m in [0.5, 1)
    return ex - 1


def ref_exponent(amax: float, rule: str) -> int:
    """The E8M0 exponent of a group with absolute maximum `amax`, from the rule's definition."""
    if amax == 0.0:
        return -127
    if rule == "ocp":  # 2^(floor(log2 amax) - 2)
        e = ref_floor_log2(amax) - 2
    elif rule == "fpquant":  # 2^floor(log2 amax), times a global 1/3
        e = ref_floor_log2(amax)
    elif rule == "ceil":  # 2^ceil(log2(amax / 6)): the smallest e with 6 * 2^e >= amax
        e = math.ceil(math.log2(amax / 6.0))
        while math.ldexp(6.0, e - 1) >= amax:
            e -= 1
        while math.ldexp(6.0, e) < amax:
            e += 1
    elif rule == "ct-round":  # amax rounded up to the next power of two when its mantissa >= 1.75
        mant = amax / math.ldexp(1.0, ref_floor_log2(amax))
        rounded = math.ldexp(1.0, ref_floor_log2(amax) + 1) if mant >= 1.75 else amax
        e = ref_floor_log2(rounded) - 2
    else:
        raise AssertionError(rule)
    return max(-127, min(127, e))


def ref_group_exponents(x: np.ndarray, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """(E8M0 exponents, non-finite mask) of every group of 32 along the last dim."""
    g = x.astype(np.float64).reshape(-1, 32)
    exps, bad = [], []
    for row in g:
        amax = max(abs(float(v)) for v in row) if not np.isnan(row).any() else math.nan
        if not math.isfinite(amax):
            exps.append(0)
            bad.append(True)
        else:
            exps.append(ref_exponent(amax, rule))
            bad.append(False)
    shape = x.shape[:-1] + (x.shape[-1] // 32,)
    return np.array(exps).reshape(shape), np.array(bad).reshape(shape)


def ref_qdq(x, rule: str = "ocp", rounding: str = "even") -> np.ndarray:
    """Reference MXFP4 quantize-dequantize of a float32 array along its last dim (float32 out)."""
    x = np.asarray(x, dtype=np.float32)
    assert x.shape[-1] % 32 == 0
    exps, bad = ref_group_exponents(x, rule)
    g = x.astype(np.float64).reshape(*x.shape[:-1], -1, 32)
    pow2 = np.ldexp(1.0, exps)[..., None]
    with np.errstate(over="ignore", invalid="ignore"):
        if rule == "fpquant":  # scale = 2^e / 3: x / scale = 3x / 2^e, exact in float64
            q = ref_round_e2m1(g * 3.0 / pow2, rounding)
            out = q * pow2 / 3.0
        else:
            q = ref_round_e2m1(g / pow2, rounding)
            out = q * pow2
        out = np.where(bad[..., None], np.nan, out)
        return out.astype(np.float32).reshape(x.shape)


def qdq(x: np.ndarray, rule: str = "ocp", rounding: str = "even") -> np.ndarray:
    """The code under test, NumPy in and out."""
    return mxfp4.quantize_dequantize(
        torch.from_numpy(np.ascontiguousarray(x)), rule, rounding
    ).numpy()


def assert_same(actual: np.ndarray, expected: np.ndarray, msg: str = "") -> None:
    """Bit-exact equality up to the sign of zero, NaN == NaN; reports the first mismatches."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    ok = (actual == expected) | (np.isnan(actual) & np.isnan(expected))
    if not ok.all():
        idx = np.argwhere(~ok)[:5]
        details = [(tuple(i), actual[tuple(i)], expected[tuple(i)]) for i in idx]
        pytest.fail(
            f"{msg}: {int((~ok).sum())} mismatches, first (index, got, expected): {details}"
        )


# ---------------------------------------------------------------------------------------------
# sanity of the reference itself, against literal numbers
# ---------------------------------------------------------------------------------------------


def test_reference_rounding_literal():
    ties = np.array(E2M1_TIES)
    np.testing.assert_array_equal(ref_round_e2m1(ties, "even"), [0, 1, 1, 2, 2, 4, 4])
    np.testing.assert_array_equal(ref_round_e2m1(ties, "away"), [0.5, 1, 1.5, 2, 3, 4, 6])
    np.testing.assert_array_equal(ref_round_e2m1(-ties, "even"), [0, -1, -1, -2, -2, -4, -4])
    np.testing.assert_array_equal(
        ref_round_e2m1(np.array([7.0, -100.0, 5.9, 0.26]), "even"), [6, -6, 6, 0.5]
    )


# ---------------------------------------------------------------------------------------------
# grid codes and tie points over a sweep of scales
# ---------------------------------------------------------------------------------------------


def _tie_sweep_tensor() -> tuple[np.ndarray, np.ndarray]:
    """Rows k = -20..20: groups anchored by 6 * 2^k (scale 2^k for ocp/ceil/ct-round) holding every
    signed grid value, every signed tie point and the float32 neighbours of each tie, all times 2^k."""
    rows, ks = [], []
    for k in range(-20, 21):
        s = 2.0**k
        vals = [v * s for v in E2M1_MAGNITUDES] + [-v * s for v in E2M1_MAGNITUDES[1:]]
        for t in E2M1_TIES:
            for sign in (1.0, -1.0):
                tie = np.float32(sign * t * s)
                vals += [
                    tie,
                    np.nextafter(tie, np.float32(np.inf)),
                    np.nextafter(tie, np.float32(-np.inf)),
                ]
        groups = [vals[i : i + 31] for i in range(0, len(vals), 31)]
        row = []
        for grp in groups:
            row += [6.0 * s] + grp + [0.0] * (31 - len(grp))
        rows.append(row)
        ks.append(k)
    return np.array(rows, dtype=np.float32), np.array(ks)


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("rule", POW2_RULES)
def test_grid_and_ties_sweep_matches_reference(rule, rounding):
    x, _ = _tie_sweep_tensor()
    assert_same(qdq(x, rule, rounding), ref_qdq(x, rule, rounding), f"{rule}/{rounding}")


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("rule", ("ocp", "ceil", "ct-round"))
def test_grid_values_and_ties_literal(rule, rounding):
    """With scale 2^k, each grid value maps to itself and each tie to the literal expected neighbour."""
    expected_ties = (0, 1, 1, 2, 2, 4, 4) if rounding == "even" else (0.5, 1, 1.5, 2, 3, 4, 6)
    for k in (-20, -7, 0, 3, 20):
        s = 2.0**k
        vals = [6.0 * s] + [v * s for v in E2M1_MAGNITUDES] + [t * s for t in E2M1_TIES]
        vals += [-t * s for t in E2M1_TIES] + [0.0] * (32 - 1 - 8 - 14)
        x = np.array([vals], dtype=np.float32)
        out = qdq(x, rule, rounding)[0]
        np.testing.assert_array_equal(out[1:9], np.array(E2M1_MAGNITUDES) * s)
        np.testing.assert_array_equal(out[9:16], np.array(expected_ties) * s)
        np.testing.assert_array_equal(out[16:23], -np.array(expected_ties) * s)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_fpquant_values_next_to_ties(rounding):
    """fpquant's ties t * 2^e / 3 are not floats: the float32 values around them must round to the side
    they lie on (3x / 2^e is exact in float64; x / (1/3) in float32 lands on the tie)."""
    rows = []
    for k in range(-20, 21, 4):
        s = 2.0 ** (k + 2)  # anchor 4 * 2^k: e = k + 2, scale 2^(k+2) / 3
        vals = []
        for t in E2M1_TIES:
            c = np.float32(t * s / 3)
            vals += [c, np.nextafter(c, np.float32(np.inf)), np.nextafter(c, np.float32(-np.inf))]
        vals = [v * sign for v in vals[:15] for sign in (1, -1)] + vals[15:]
        row = [4.0 * 2.0**k] + vals[:31] + [4.0 * 2.0**k] + vals[31:] + [0.0] * (62 - len(vals))
        rows.append(row)
    x = np.array(rows, dtype=np.float32)
    assert_same(qdq(x, "fpquant", rounding), ref_qdq(x, "fpquant", rounding), "fpquant near ties")


def test_away_rounding_just_below_a_tie_rounds_down():
    """The float32 value just below each tie point must round towards zero in `away` mode too."""
    ties = np.array(E2M1_TIES, dtype=np.float32)
    below = np.nextafter(ties, np.float32(0))
    above = np.nextafter(ties, np.float32(np.inf))
    lower = np.array([0, 0.5, 1, 1.5, 2, 3, 4])
    upper = np.array([0.5, 1, 1.5, 2, 3, 4, 6])
    for rounding in ROUNDINGS:
        for s in (1.0, 2.0**-5, 2.0**9):
            row = np.concatenate([[6 * s], below * s, above * s, np.zeros(32 - 15)]).astype(
                np.float32
            )
            out = qdq(row[None], "ocp", rounding)[0]
            np.testing.assert_array_equal(
                out[1:8], lower * s, err_msg=f"{rounding} below ties, scale {s}"
            )
            np.testing.assert_array_equal(
                out[8:15], upper * s, err_msg=f"{rounding} above ties, scale {s}"
            )


# ---------------------------------------------------------------------------------------------
# random and adversarial tensors
# ---------------------------------------------------------------------------------------------


def _random_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    normal = rng.standard_normal((48, 256)).astype(np.float32)
    heavy = (rng.standard_t(1.5, (48, 256)) * np.exp2(rng.integers(-30, 30, (48, 1)))).astype(
        np.float32
    )
    lognormal = (rng.choice([-1, 1], (16, 512)) * np.exp(rng.normal(0, 4, (16, 512)))).astype(
        np.float32
    )
    outlier = rng.standard_normal((32, 256)).astype(np.float32)
    outlier[:, ::32] *= 1e4  # one outlier per group
    outlier[:, 7::32] = rng.uniform(-1e-3, 1e-3, (32, 8))
    return {"normal": normal, "heavy": heavy, "lognormal": lognormal, "outlier": outlier}


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("rule", POW2_RULES)
@pytest.mark.parametrize("kind", ("normal", "heavy", "lognormal", "outlier"))
def test_random_tensors_match_reference(kind, rule, rounding):
    x = _random_tensors()[kind]
    assert_same(qdq(x, rule, rounding), ref_qdq(x, rule, rounding), f"{kind} {rule}/{rounding}")


def _adversarial() -> dict[str, np.ndarray]:
    tiny = np.finfo(np.float32).smallest_subnormal
    fmax = np.finfo(np.float32).max
    rng = np.random.default_rng(7)
    denorm = (rng.integers(-(2**22), 2**22, (4, 64)) * tiny).astype(np.float32)  # subnormal range
    near_min_normal = (rng.uniform(-1, 1, (4, 64)) * 2.0**-124).astype(
        np.float32
    )  # E8M0 floor clamps
    huge = np.array(
        [
            [fmax, -fmax, fmax / 2, 2.0**127, 1.5 * 2.0**127, 1.75 * 2.0**127, 1.25 * 2.0**127]
            + [1.0] * 25,
            [1.5 * 2.0**127] + [2.0**125 * v for v in np.linspace(-6, 6, 31)],
        ],
        dtype=np.float32,
    )
    mixed = np.zeros((2, 96), dtype=np.float32)
    mixed[0, 32:64] = rng.standard_normal(32)
    mixed[1, 64] = tiny
    return {
        "denormal": denorm,
        "near_min_normal": near_min_normal,
        "huge": huge,
        "mixed_zero": mixed,
    }


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("rule", POW2_RULES)
@pytest.mark.parametrize("kind", ("denormal", "near_min_normal", "huge", "mixed_zero"))
def test_adversarial_tensors_match_reference(kind, rule, rounding):
    x = _adversarial()[kind]
    with np.errstate(over="ignore"):
        assert_same(qdq(x, rule, rounding), ref_qdq(x, rule, rounding), f"{kind} {rule}/{rounding}")


@pytest.mark.parametrize("rule", POW2_RULES)
def test_huge_values_stay_finite_when_representable(rule):
    """1.5 * 2^127 is representable on every rule's grid within float32: never an overflow to inf."""
    x = np.zeros((1, 32), dtype=np.float32)
    x[0, 0] = 1.5 * 2.0**127
    x[0, 1] = 2.0**126
    out = qdq(x, rule)
    assert np.isfinite(out).all(), out[:, :2]


@pytest.mark.parametrize("rule", POW2_RULES)
def test_all_zero_tensor(rule):
    x = torch.zeros(3, 64)
    out = mxfp4.quantize_dequantize(x, rule)
    assert torch.equal(out, x)
    codes, scales = mxfp4.pack(x, rule)
    assert (scales == 0).all(), "an all-zero group has the E8M0 code 0 (2^-127)"
    assert (mxfp4.shared_exponent(torch.zeros(5), rule) == -127).all()
    assert torch.equal(mxfp4.unpack(codes, scales, scale_rule=rule), x)


def test_scale_is_clamped_to_e8m0_range():
    x = torch.zeros(2, 32)
    x[0, 0] = float(np.finfo(np.float32).smallest_subnormal)
    x[1, 0] = float(np.finfo(np.float32).max)
    e = mxfp4.shared_exponent(x.abs().amax(-1), "ocp")
    assert e.tolist() == [-127, 125]
    e = mxfp4.shared_exponent(x.abs().amax(-1), "fpquant")
    assert e.tolist() == [-127, 127]


# ---------------------------------------------------------------------------------------------
# scale rules: exponent and the documented amax / scale ranges
# ---------------------------------------------------------------------------------------------

RANGES = {  # amax / scale: (low, high, low inclusive, high inclusive)
    "ocp": (4.0, 8.0, True, False),
    "fpquant": (3.0, 6.0, True, False),
    "ceil": (3.0, 6.0, False, True),
    "ct-round": (3.5, 7.0, True, False),
}


def _amax_samples() -> np.ndarray:
    rng = np.random.default_rng(99)
    mant = np.array(
        [1.0, 1.25, 1.5, 1.75, 2.0 - 2.0**-23, 1.5 + 2.0**-23, 1.75 - 2.0**-23, 1.75 + 2.0**-23]
    )
    edges = np.concatenate([mant * 2.0**k for k in range(-120, 121, 7)])
    rand = np.exp2(rng.uniform(-120, 120, 4000))
    return np.concatenate([edges, rand]).astype(np.float32)


@pytest.mark.parametrize("rule", POW2_RULES)
def test_shared_exponent_matches_definition_and_range(rule):
    amax = _amax_samples()
    got = mxfp4.shared_exponent(torch.from_numpy(amax), rule)
    assert got.dtype == torch.int32
    low, high, low_in, high_in = RANGES[rule]
    factor = 1.0 / 3.0 if rule == "fpquant" else 1.0
    for a, e in zip(amax.tolist(), got.tolist(), strict=True):
        assert e == ref_exponent(a, rule), (rule, a, e)
        ratio = a / (
            math.ldexp(1.0, e) * factor
        )  # amax / scale, the scale including the 1/3 factor
        if rule == "fpquant":
            ratio = 3.0 * a / math.ldexp(1.0, e)  # exact
        assert low <= ratio if low_in else low < ratio, (rule, a, ratio)
        assert ratio <= high if high_in else ratio < high, (rule, a, ratio)
    assert mxfp4.global_factor(rule) == factor


def test_rule_specific_boundaries_literal():
    """Hand-checked exponents at the boundaries where the rules part ways."""
    a = torch.tensor([6.0, 6.0000005, 7.0, 7.9999995, 8.0, 3.0, 3.5])
    assert mxfp4.shared_exponent(a, "ocp").tolist() == [0, 0, 0, 0, 1, -1, -1]
    assert mxfp4.shared_exponent(a, "ceil").tolist() == [0, 1, 1, 1, 1, -1, 0]
    assert mxfp4.shared_exponent(a, "ct-round").tolist() == [0, 0, 1, 1, 1, -1, 0]
    assert mxfp4.shared_exponent(a, "fpquant").tolist() == [2, 2, 2, 2, 3, 1, 1]
    with pytest.raises(ValueError, match="duquantpp-loggrid"):
        mxfp4.shared_exponent(a, "duquantpp-loggrid")


# ---------------------------------------------------------------------------------------------
# a hand-computed case
# ---------------------------------------------------------------------------------------------


def test_hand_computed_case():
    # group 0: amax 7.  ocp: 2^(floor(log2 7) - 2) = 2^0 = 1     -> 7 saturates to 6, 1.0 -> 1, -2.6 -> -3,
    #                                                               1.25 tie -> 1 (even), 0.3 -> 0.5
    #          ceil: 2^ceil(log2(7/6)) = 2^1 = 2                -> 7/2 = 3.5 tie -> 4 -> 8; 1/2 -> 0.5 -> 1;
    #                                                               -2.6/2 = -1.3 -> -1.5 -> -3; 1.25/2 = 0.625 -> 0.5 -> 1;
    #                                                               0.3/2 = 0.15 -> 0
    #          ct-round: 7 = 1.75 * 4 rounds up to 8 -> 2^(3-2) = 2: same as ceil here
    #          fpquant: 2^2 / 3 = 4/3                           -> 7*3/4 = 5.25 -> 6 -> 8; 1*3/4 = 0.75 tie -> 1 -> 4/3;
    #                                                               -2.6*3/4 = -1.95 -> -2 -> -8/3; 1.25*3/4 = 0.9375 -> 1 -> 4/3;
    #                                                               0.3*3/4 = 0.225 -> 0
    # group 1: amax 20. ocp: 2^(4-2) = 4 -> 20/4 = 5 tie -> 4 -> 16; 7/4 = 1.75 tie -> 2 -> 8; -1/4 = -0.25 tie -> 0;
    #                                       3/4 = 0.75 tie -> 1 -> 4
    x = torch.zeros(1, 64)
    x[0, :5] = torch.tensor([7.0, 1.0, -2.6, 1.25, 0.3])
    x[0, 32:36] = torch.tensor([20.0, 7.0, -1.0, 3.0])
    expected = {
        "ocp": [6.0, 1.0, -3.0, 1.0, 0.5],
        "ceil": [8.0, 1.0, -3.0, 1.0, 0.0],
        "ct-round": [8.0, 1.0, -3.0, 1.0, 0.0],
        "fpquant": [8.0, 4.0 / 3.0, -8.0 / 3.0, 4.0 / 3.0, 0.0],
    }
    for rule, exp in expected.items():
        out = mxfp4.quantize_dequantize(x, rule)
        torch.testing.assert_close(out[0, :5], torch.tensor(exp), rtol=0, atol=0, msg=rule)
        assert (out[0, 5:32] == 0).all()
    out = mxfp4.quantize_dequantize(x, "ocp")
    assert out[0, 32:36].tolist() == [16.0, 8.0, 0.0, 4.0]
    away = mxfp4.quantize_dequantize(x, "ocp", "away")
    assert away[0, :5].tolist() == [6.0, 1.0, -3.0, 1.5, 0.5]
    assert away[0, 32:36].tolist() == [24.0, 8.0, -2.0, 4.0]


# ---------------------------------------------------------------------------------------------
# duquantpp-loggrid against a transcription of its definition
# ---------------------------------------------------------------------------------------------


def ref_loggrid_scales(amax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """amax/6 floored onto 256 log-uniform levels (codes 0..255) between the tensor's extreme scales
    (float64); returns (scales, continuous level position) per group. Scales below 2^-126 are raised to it."""
    s = np.maximum(amax.astype(np.float64) / 6.0, 2.0**-126)
    finite = np.isfinite(s)
    logs = np.log2(s)
    lo, hi = logs[finite].min(), logs[finite].max()
    span = hi - lo
    if span <= 0:
        return s, np.zeros_like(s)
    pos = 255.0 * ((logs - lo) / span)  # the largest group sits exactly on the top level 255
    code = np.clip(np.floor(pos), 0, 255)
    return np.exp2(lo + code * span / 255.0), pos


def test_loggrid_matches_transcription():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((64, 256)) * np.exp2(rng.uniform(-12, 12, (64, 1)))).astype(np.float32)
    x[3, :32] = 0.0  # an all-zero group sits at the 2^-126 floor and becomes the grid's minimum
    amax = np.abs(x.reshape(64, 8, 32)).max(-1)
    ref_s, pos = ref_loggrid_scales(amax)
    got_s = mxfp4._loggrid_scale(torch.from_numpy(amax[..., None]).float()).squeeze(-1).numpy()
    frac = pos - np.floor(pos)
    clear = (frac > 1e-3) & (frac < 1 - 1e-3) | (pos <= 0) | (pos >= 255)  # not at a level boundary
    assert clear.mean() > 0.95
    np.testing.assert_allclose(got_s[clear], ref_s[clear], rtol=2e-5)
    # every scale is snapped *down*: amax / scale >= 6 up to float error, and within one level of 6
    s64 = np.maximum(amax.astype(np.float64) / 6, 2.0**-126)
    level = np.log2(s64.max() / s64.min()) / 255
    ratio = amax / got_s
    assert (ratio[amax > 0] >= 6 * (1 - 1e-5)).all()
    assert (ratio[amax > 0] <= 6 * 2 ** (level * 1.001)).all()
    # the largest group is on the top level: its scale is amax / 6, it does not clip
    top = np.unravel_index(amax.argmax(), amax.shape)
    np.testing.assert_allclose(ratio[top], 6.0, rtol=1e-5)
    # elements: nearest E2M1 value of x / scale, times the scale (float32 arithmetic as the definition)
    s32 = np.repeat(ref_s.astype(np.float32), 32, axis=-1)
    ref = (ref_round_e2m1((x / s32).astype(np.float64)).astype(np.float32) * s32).astype(np.float32)
    out = qdq(x, "duquantpp-loggrid")
    rows_clear = np.repeat(clear, 32, axis=-1)
    np.testing.assert_allclose(out[rows_clear], ref[rows_clear], rtol=1e-5, atol=0)


def test_loggrid_single_level_and_zero_tensor():
    rng = np.random.default_rng(11)
    x = rng.uniform(-1, 1, (4, 64)).astype(np.float32)
    x[:, ::32] = 3.0  # every group has amax 3: the grid collapses to scale 3/6 = 0.5 exactly
    out = qdq(x, "duquantpp-loggrid")
    assert_same(out, (ref_round_e2m1(x / np.float32(0.5)) * 0.5).astype(np.float32), "one level")
    assert torch.equal(
        mxfp4.quantize_dequantize(torch.zeros(2, 32), "duquantpp-loggrid"), torch.zeros(2, 32)
    )


# ---------------------------------------------------------------------------------------------
# pack / unpack
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("rule", POW2_RULES)
def test_pack_unpack_round_trip(rule, rounding):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 24, 128)) * np.exp2(rng.uniform(-40, 40, (2, 24, 1)))).astype(
        np.float32
    )
    x[0, 0, :32] = 0.0
    x[0, 1, 32:64] = np.finfo(np.float32).smallest_subnormal
    x[1, 2, 5] = np.nan
    x[1, 3, 70] = -np.inf
    t = torch.from_numpy(x)
    codes, scales = mxfp4.pack(t, rule, rounding)
    assert codes.dtype == torch.uint8 and codes.shape == (2, 24, 64)
    assert scales.dtype == torch.uint8 and scales.shape == (2, 24, 4)
    back = mxfp4.unpack(codes, scales, scale_rule=rule)
    ref = mxfp4.quantize_dequantize(t, rule, rounding)
    assert back.dtype == torch.float32
    assert torch.equal(torch.nan_to_num(back, nan=1234.5), torch.nan_to_num(ref, nan=1234.5))
    assert_same(back.numpy(), ref_qdq(x, rule, rounding), f"unpack {rule}")
    # scale bytes are the biased E8M0 exponents of the reference, 0xFF for non-finite groups
    exps, bad = ref_group_exponents(x, rule)
    expected_bytes = np.where(bad, 0xFF, exps + 127)
    np.testing.assert_array_equal(scales.numpy(), expected_bytes)
    assert mxfp4.unpack(codes, scales, torch.bfloat16, scale_rule=rule).dtype == torch.bfloat16


def test_every_code_and_nibble_order():
    # scale 1 (amax 6 -> ocp 2^(2-2)); element i of the group is the value of 4-bit code i, then codes 0..15 again
    values = list(mxfp4.decode_e2m1(torch.arange(16, dtype=torch.uint8)).tolist())
    assert values == [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    x = torch.tensor([values + values])
    x[0, 8] = 0.0  # code 8 is -0; a +0 input gets code 0
    codes, scales = mxfp4.pack(x)
    assert scales.tolist() == [[127]]  # biased E8M0: 127 is 2^0
    # bytes: (low nibble = even element, high nibble = odd element)
    first = [0x10, 0x32, 0x54, 0x76, 0x90, 0xBA, 0xDC, 0xFE]  # element 8 is +0: code 0, then code 9
    second = [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]  # element 24 is -0: code 8
    assert codes.tolist() == [first + second]
    assert torch.equal(mxfp4.unpack(codes, scales), x)


def test_nibble_order_hand_built_bytes():
    # byte 0x21: low nibble 1 (0.5) is element 0, high nibble 2 (1.0) element 1; byte 0xF7: 6 then -6
    codes = torch.zeros(1, 16, dtype=torch.uint8)
    codes[0, 0], codes[0, 1] = 0x21, 0xF7
    scales = torch.tensor([[127 + 3]], dtype=torch.uint8)  # 2^3
    out = mxfp4.unpack(codes, scales)
    assert out[0, :4].tolist() == [4.0, 8.0, 48.0, -48.0]
    assert (out[0, 4:] == 0).all()
    # fpquant decodes the same bytes with the global factor 1/3
    out = mxfp4.unpack(codes, scales, scale_rule="fpquant")
    torch.testing.assert_close(
        out[0, :4], torch.tensor([4 / 3, 8 / 3, 16.0, -16.0]), rtol=0, atol=0
    )


def test_scale_bytes_are_biased_e8m0():
    x = torch.zeros(1, 5 * 32)
    for i, k in enumerate((-127, -3, 0, 5, 125)):
        x[0, 32 * i] = (
            6.0 * 2.0**k if k > -126 else 2.0**-126
        )  # ocp: 2^-126 -> 2^-128 clamped to 2^-127
    _, scales = mxfp4.pack(x, "ocp")
    assert scales.tolist() == [[0, 124, 127, 132, 252]]


def test_pack_rejects_loggrid_and_unknown_rules():
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="duquantpp-loggrid"):
        mxfp4.pack(x, "duquantpp-loggrid")
    with pytest.raises(ValueError, match="unknown MXFP4 scale rule"):
        mxfp4.pack(x, "nope")
    with pytest.raises(ValueError, match="unknown MXFP4 scale rule"):
        mxfp4.quantize_dequantize(x, "nope")
    with pytest.raises(ValueError, match="rounding"):
        mxfp4.quantize_dequantize(x, "ocp", "up")


# ---------------------------------------------------------------------------------------------
# NaN / Inf, shapes, dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", (*POW2_RULES, "duquantpp-loggrid"))
@pytest.mark.parametrize("bad", (math.nan, math.inf, -math.inf))
def test_non_finite_group_is_all_nan(rule, bad):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    x[1, 40] = bad
    out = qdq(x, rule)
    assert np.isnan(out[1, 32:64]).all()
    assert not np.isnan(np.delete(out.reshape(-1), np.arange(32 + 96, 64 + 96))).any()
    if rule in POW2_RULES:  # other groups are untouched by the bad one
        clean = x.copy()
        clean[1, 32:64] = 0.0
        ok = qdq(clean, rule)
        ok[1, 32:64] = np.nan
        assert_same(out, ok, rule)
        codes, scales = mxfp4.pack(torch.from_numpy(x), rule)
        assert scales[1, 1].item() == 0xFF
        assert (scales.reshape(-1)[[0, 1, 2, 3, 5, 6, 7, 8]] != 0xFF).all()
        assert torch.isnan(mxfp4.unpack(codes, scales, scale_rule=rule)[1, 32:64]).all()


@pytest.mark.parametrize("shape", [(4, 33), (31,), (2, 3, 48), ()])
def test_non_divisible_last_dim_names_the_shape(shape):
    x = torch.zeros(shape)
    with pytest.raises(ValueError, match=r"group size 32") as info:
        mxfp4.quantize_dequantize(x, name="my.weight")
    assert str(tuple(shape)) in str(info.value)
    assert "my.weight" in str(info.value)
    with pytest.raises(ValueError, match=r"divisible"):
        mxfp4.pack(x)


@pytest.mark.parametrize("rule", POW2_RULES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_dtype_and_leading_dims_preserved(rule, dtype):
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 5, 64) * 3).to(dtype)
    out = mxfp4.quantize_dequantize(x, rule)
    assert out.dtype == dtype and out.shape == x.shape
    ref = torch.from_numpy(ref_qdq(x.float().numpy(), rule)).to(dtype)
    assert torch.equal(out, ref)
    spec = QuantSpec("mxfp4", rule)
    assert spec.group_size == 32
    assert torch.equal(spec.fake_quant(x), out)


# ---------------------------------------------------------------------------------------------
# property-based
# ---------------------------------------------------------------------------------------------

_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
_arrays = st.tuples(st.integers(1, 3), st.integers(1, 3)).flatmap(
    lambda s: hnp.arrays(np.float32, (s[0], 32 * s[1]), elements=_f32)
)
_scaled_normal = st.tuples(
    st.integers(0, 2**32 - 1), st.integers(-130, 120), st.sampled_from([1, 2, 4])
).map(
    lambda a: (
        np.random.default_rng(a[0]).standard_normal((2, 32 * a[2])) * np.exp2(float(a[1]))
    ).astype(np.float32)
)


@settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    x=st.one_of(_arrays, _scaled_normal),
    rule=st.sampled_from(POW2_RULES),
    rounding=st.sampled_from(ROUNDINGS),
)
def test_fuzz_against_reference(x, rule, rounding):
    with np.errstate(over="ignore"):
        assert_same(qdq(x, rule, rounding), ref_qdq(x, rule, rounding), f"{rule}/{rounding}")


@settings(max_examples=200, deadline=None, database=None)
@given(x=st.one_of(_arrays, _scaled_normal), rule=st.sampled_from(("ocp", "ceil", "ct-round")))
def test_fuzz_idempotent(x, rule):
    with np.errstate(over="ignore"):
        once = qdq(x, rule)
        if not np.isfinite(once).all():
            return  # a group that overflowed float32 (values beyond 2^128) is not a fixed point
        assert_same(qdq(once, rule), once, rule)


def test_fpquant_is_not_idempotent_by_definition():
    """fpquant's scale 2^floor(log2 amax)/3 moves up a binade when the group max rounds to 6, so a second
    pass halves the grid position of the rest. The codec must follow the definition, not a fixed point."""
    # pass 1: amax 5.9/3 -> e = 0, scale 1/3: 5.9 -> 6 -> 2;  0.5 -> 1.5 -> 0.5 (exact)
    # pass 2: amax 2 -> e = 1, scale 2/3: 2 -> 3 -> 2;  0.5 -> 0.75, a tie -> 1 (even) -> 2/3
    x = np.zeros((1, 32), dtype=np.float32)
    x[0, 0] = 5.9 / 3
    x[0, 1] = 0.5
    once = qdq(x, "fpquant")
    assert once[0, 0] == 2.0 and once[0, 1] == 0.5
    twice = qdq(once, "fpquant")
    assert twice[0, 0] == 2.0 and twice[0, 1] == np.float32(2 / 3)
    assert_same(twice, ref_qdq(once, "fpquant"), "second pass")


def test_loggrid_largest_group_never_clips():
    """Over many random tensors the largest group gets the top level (scale amax / 6): computing the
    level as 255 * (log - lo) / span in float32 can give 254.99997 for it, and a level lower clips it."""
    rng = np.random.default_rng(17)
    for _ in range(300):
        n = int(rng.integers(2, 40))
        amax = (np.abs(rng.standard_normal(n)) * np.exp2(rng.uniform(-20, 20, n))).astype(
            np.float32
        )
        x = np.zeros((n, 32), dtype=np.float32)
        x[:, 0] = amax
        out = qdq(x.reshape(1, -1), "duquantpp-loggrid").reshape(n, 32)
        top = amax.argmax()
        np.testing.assert_allclose(out[top, 0], amax[top], rtol=2e-6, err_msg=f"amax {amax}")


# ---------------------------------------------------------------------------------------------
# `mse`: the per-group best of two E8M0 exponents, against a brute force over every exponent
# ---------------------------------------------------------------------------------------------


def _group_sse(g: np.ndarray, e: int, rounding: str = "even") -> float:
    """Sum of squared errors of rounding group `g` (float64) with the power-of-two scale 2^e."""
    q = ref_round_e2m1(g / 2.0**e, rounding) * 2.0**e
    return float(np.sum((q - g) ** 2))


def test_mse_rule_hand_computed():
    # scale 1 has the grid 0, .5, 1, 1.5, 2, 3, 4, 6; scale 2 has 0, 1, 2, 3, 4, 6, 8, 12. Group
    # [7, 1.5, .5, .5, .5]: scale 1 errs only on 7 -> 6 (1); scale 2 on 7 -> 8 (1), 1.5 -> 2 (.25) and
    # each .5 -> 0 (ties to even, 3 x .25): ocp's scale wins, 1 against 2
    g = np.zeros(32)
    g[:5] = [7.0, 1.5, 0.5, 0.5, 0.5]
    assert (_group_sse(g, 0), _group_sse(g, 1)) == (1.0, 2.0)
    out = mxfp4.quantize_dequantize(torch.tensor(g, dtype=torch.float32)[None], "mse")
    assert out[0, :5].tolist() == [6.0, 1.5, 0.5, 0.5, 0.5]
    # amax 7.9 alone: scale 1 gives 6 (error 1.9), scale 2 gives 8 (error 0.1): mse takes 2
    g2 = np.zeros(32)
    g2[0] = 7.9
    out = mxfp4.quantize_dequantize(torch.tensor(g2, dtype=torch.float32)[None], "mse")
    assert out[0, 0].item() == 8.0
    assert mxfp4.group_scales(torch.tensor(g2, dtype=torch.float32)[None], "mse").item() == 2.0
    codes, scales = mxfp4.pack(torch.tensor(g2, dtype=torch.float32)[None], "mse")
    assert scales.item() == 128  # E8M0 code of 2^1


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_mse_rule_is_best_of_all_amax_rules_per_group(rounding):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 256, generator=gen) * torch.rand(64, 1, generator=gen) * 10
    x[:, ::37] *= 50  # outliers in some groups
    out = mxfp4.quantize_dequantize(x, "mse", rounding).double()
    err = (out - x.double()).square().reshape(64, -1, 32).sum(-1)
    groups = x.double().numpy().reshape(-1, 32)
    for rule in ("ocp", "ceil", "ct-round"):
        other = mxfp4.quantize_dequantize(x, rule, rounding).double()
        err_o = (other - x.double()).square().reshape(64, -1, 32).sum(-1)
        assert (err <= err_o).all(), rule
    # brute force: no exponent in a window of 5 around ocp's does better (the optimum is one of two)
    got = err.reshape(-1).numpy()
    for i in range(0, groups.shape[0], 7):
        g = groups[i]
        e0 = math.frexp(float(np.abs(g).max()))[1] - 1 - 2
        best = min(_group_sse(g, e, rounding) for e in range(e0 - 2, e0 + 3))
        assert got[i] == pytest.approx(best, rel=1e-12, abs=0.0)
    assert torch.equal(
        mxfp4.group_scales(x, "mse").log2().round(), mxfp4.group_scales(x, "mse").log2()
    )


def test_mse_rule_special_values_and_pack_roundtrip():
    x = torch.randn(4, 64)
    x[1, 3] = float("nan")
    x[2] = 0.0
    x[3, 40] = float("inf")
    out = mxfp4.quantize_dequantize(x, "mse")
    assert out[1, :32].isnan().all() and out[3, 32:].isnan().all()
    assert torch.equal(out[2], torch.zeros(64))
    codes, scales = mxfp4.pack(x, "mse")
    back = mxfp4.unpack(codes, scales, scale_rule="mse")
    assert torch.equal(back.nan_to_num(7.0), out.nan_to_num(7.0))
    with pytest.raises(ValueError, match="group maximum alone"):
        mxfp4.shared_exponent(x.abs().amax(-1), "mse")
