"""GPTQ onto the MXFP4 / NVFP4 grid: better than RTN, on the grid, hand-checkable limits, diagnostics."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from duquant.formats import QuantSpec, mxfp4
from duquant.formats.e2m1 import E2M1_MAX
from duquant.formats.nvfp4 import tensor_scale_of
from duquant.gptq import (
    GPTQResult,
    HessianAccumulator,
    act_order_permutation,
    gptq_quantize,
    grid_scales,
    hessian_from_inputs,
    hessian_output_error,
    hessian_row_energy,
    layer_output_error,
    round_to_grid,
)

OUT, IN, TOKENS = 96, 256, 2048
SPECS = [
    QuantSpec("mxfp4", "ocp"),
    QuantSpec("mxfp4", "fpquant"),
    QuantSpec("mxfp4", "ceil"),
    QuantSpec("mxfp4", "ct-round"),
    QuantSpec("mxfp4", "duquantpp-loggrid"),
    QuantSpec("nvfp4", "e4m3"),
]
# rules for which fake-quant of a grid weight is the identity (see GPTQResult for why not the others)
IDEMPOTENT_RULES = ("ocp", "ceil", "ct-round")
# (act_order, static_groups): DuQuant++ default, grouped act-order, FP-Quant-like static scales
VARIANTS = [(False, False), (True, False), (True, True)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run single-threaded: these matrices are too small to gain from threads, and on a busy 2-core
    machine OpenMP barriers waiting for a descheduled thread made the file 8x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ids(spec: QuantSpec) -> str:
    """Readable test id of a spec."""
    return f"{spec.format}-{spec.scale_rule}"


@functools.cache
def _layer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random linear (W [96, 256]) with correlated inputs X = Z·L, a few heavy channels, and H of X."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(OUT, IN, generator=g)
    mixing = torch.eye(IN) + 1.2 * torch.randn(IN, IN, generator=g) / math.sqrt(IN)
    channel_scale = torch.ones(IN)
    channel_scale[torch.randperm(IN, generator=g)[:8]] = 10.0
    x = (torch.randn(TOKENS, IN, generator=g) @ mixing) * channel_scale
    return w, x, hessian_from_inputs(x)


@functools.cache
def _gptq(spec: QuantSpec, act_order: bool, static_groups: bool) -> GPTQResult:
    """GPTQ of the shared layer, computed once per configuration."""
    w, _, h = _layer()
    return gptq_quantize(w, h, spec, act_order=act_order, static_groups=static_groups)


def _assert_on_grid(res: GPTQResult, spec: QuantSpec) -> None:
    """`res.weight` is a fixed point of rounding with `res.scales`, and the scales are storable."""
    gs = spec.group_size
    scale = res.scales.repeat_interleave(gs, dim=1)
    assert res.weight.dtype == torch.float32
    assert torch.equal(round_to_grid(res.weight, scale, spec, res.tensor_scale), res.weight)
    if spec.format == "nvfp4":
        bound = E2M1_MAX * scale * res.tensor_scale
    else:
        bound = E2M1_MAX * scale * mxfp4.global_factor(spec.scale_rule)
    assert (res.weight.abs() <= bound).all()
    if spec.format == "nvfp4":
        assert torch.equal(res.scales.to(torch.float8_e4m3fn).float(), res.scales)
    elif spec.scale_rule in mxfp4.POWER_OF_TWO_RULES:
        mantissa, _ = torch.frexp(res.scales)
        assert (mantissa == 0.5).all(), "MXFP4 scale is not an E8M0 power of two"


# --- the spec-level scale and rounding helpers ---------------------------------------------------


def _near_ties(spec: QuantSpec) -> torch.Tensor:
    """Groups whose amax sets the group scale to 1 (1/3 for fpquant; loggrid: about 1) and whose
    other element sits on, just below or just above an E2M1 rounding tie."""
    unit = 1.0 / 3.0 if spec.scale_rule == "fpquant" else 1.0
    ties = (
        torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float64) * unit
    ).float()
    vals = torch.cat((ties, ties.nextafter(torch.zeros(1)), ties.nextafter(torch.full((1,), 9.0))))
    vals = torch.cat((vals, -vals))
    head = torch.full_like(vals, 5.9 * unit if spec.format == "mxfp4" else 6.0)
    groups = torch.nn.functional.pad(torch.stack((head, vals), dim=1), (0, spec.group_size - 2))
    out = groups.reshape(-1, 2 * spec.group_size).clone()
    if spec.format == "nvfp4":
        out[0, 0] = 6.0 * 448.0  # per-tensor scale 1, so a group with amax 6 gets E4M3 scale 1
    return out


@pytest.mark.parametrize(
    "spec",
    [*SPECS, QuantSpec("mxfp4", "fpquant", "away"), QuantSpec("nvfp4", "e4m3", "away")],
    ids=str,
)
def test_grid_helpers_reproduce_fake_quant_bit_exactly(spec: QuantSpec) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 128, generator=g) * torch.logspace(-3, 3, 128)
    x[0, :32] = 0.0  # an all-zero group
    for data in (x, _near_ties(spec)):
        ts = tensor_scale_of(data) if spec.format == "nvfp4" else None
        scale = grid_scales(data, spec, ts).repeat_interleave(spec.group_size, dim=1)
        assert torch.equal(round_to_grid(data, scale, spec, ts), spec.fake_quant(data))


# --- GPTQ against RTN and the grid ------------------------------------------------------------------


@pytest.mark.parametrize(("act_order", "static_groups"), VARIANTS)
@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_gptq_beats_rtn_on_the_same_grid(
    spec: QuantSpec, act_order: bool, static_groups: bool
) -> None:
    w, x, _ = _layer()
    res = _gptq(spec, act_order, static_groups)
    rtn = layer_output_error(x, w, spec.fake_quant(w))
    err = layer_output_error(x, w, res.weight)
    assert not res.fallback and res.dead_columns == 0
    assert err < 0.9 * rtn, f"GPTQ {err:.4f} vs RTN {rtn:.4f}"


@pytest.mark.parametrize(("act_order", "static_groups"), VARIANTS)
@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_gptq_weight_lies_on_the_grid(
    spec: QuantSpec, act_order: bool, static_groups: bool
) -> None:
    res = _gptq(spec, act_order, static_groups)
    # scales are per group of the ORIGINAL column order, so this also checks act_order kept groups whole
    _assert_on_grid(res, spec)
    if spec.format == "mxfp4" and spec.scale_rule in IDEMPOTENT_RULES:
        assert torch.equal(spec.fake_quant(res.weight), res.weight)
        codes, scales = mxfp4.pack(res.weight, spec.scale_rule)
        assert torch.equal(mxfp4.unpack(codes, scales, scale_rule=spec.scale_rule), res.weight)


def test_act_order_helps_on_heavy_channels() -> None:
    spec = QuantSpec("mxfp4", "ocp")
    w, x, _ = _layer()
    plain = layer_output_error(x, w, _gptq(spec, False, False).weight)
    ordered = layer_output_error(x, w, _gptq(spec, True, False).weight)
    assert ordered < plain


def test_hessian_and_input_forms_of_the_output_error_agree() -> None:
    w, x, h = _layer()
    w_q = _gptq(QuantSpec("mxfp4", "ocp"), False, False).weight
    assert layer_output_error(x, w, w_q) == pytest.approx(hessian_output_error(h, w, w_q), rel=1e-9)


def test_row_energy_report_matches_the_float64_error() -> None:
    w, x, h = _layer()
    w_q = _gptq(QuantSpec("mxfp4", "ocp"), False, False).weight
    num = hessian_row_energy(h, w - w_q).sum().item()
    den = hessian_row_energy(h, w).sum().item()
    assert math.sqrt(num / den) == pytest.approx(hessian_output_error(h, w, w_q), rel=1e-4)


def test_stacked_rows_solve_like_separate_linears() -> None:
    """GPTQ is row-independent given H: a q/k/v stack solved at once gives each linear's solution."""
    spec = QuantSpec("mxfp4", "ct-round")
    w, _, h = _layer()
    g = torch.Generator().manual_seed(5)
    w2 = torch.randn(24, w.shape[1], generator=g) * 0.05
    both = gptq_quantize(torch.cat([w, w2]), h, spec).weight
    apart = torch.cat([gptq_quantize(w, h, spec).weight, gptq_quantize(w2, h, spec).weight])
    # the same up to float64 summation order in the lazy block updates: a rare flipped rounding
    assert (both == apart).float().mean() > 0.999


def test_float32_products_hessian_is_close_to_float64() -> None:
    _, x, h = _layer()
    acc = HessianAccumulator(product_dtype=torch.float32)
    for chunk in x.split(64):
        acc.add(chunk)
    assert torch.allclose(acc.finalize(), h.double(), rtol=1e-5, atol=1e-6 * h.abs().max().item())


# --- hand-checkable limits -------------------------------------------------------------------------


@pytest.mark.parametrize(("act_order", "static_groups"), [*VARIANTS, (False, True)])
@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_diagonal_hessian_gives_rtn_exactly(
    spec: QuantSpec, act_order: bool, static_groups: bool
) -> None:
    # uncorrelated inputs: U is diagonal, no error reaches another column, so every group is still
    # untouched when the loop enters it and its scale is the RTN scale
    if spec.scale_rule == "duquantpp-loggrid" and not static_groups:
        pytest.skip(
            "a dynamic loggrid scale spans one 32-column slice, fake_quant the whole tensor"
        )
    w, _, _ = _layer()
    for h in (
        torch.eye(IN),
        torch.diag(torch.rand(IN, generator=torch.Generator().manual_seed(2))),
    ):
        res = gptq_quantize(w, h, spec, act_order=act_order, static_groups=static_groups)
        assert torch.equal(res.weight, spec.fake_quant(w))


@pytest.mark.parametrize("static_groups", [True, False])
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[5]], ids=_ids)
def test_blocksize_does_not_change_the_result(spec: QuantSpec, static_groups: bool) -> None:
    # lazy batching only regroups the same updates; with scales taken from the current weights
    # (not the block-stale outer W) that holds for dynamic scales too
    w, _, h = _layer()
    ref = gptq_quantize(w, h, spec, blocksize=128, static_groups=static_groups).weight
    for bs in (32, 64, 256):
        res = gptq_quantize(w, h, spec, blocksize=bs, static_groups=static_groups).weight
        torch.testing.assert_close(res, ref)


def test_dead_columns_are_zeroed_and_do_not_break_gptq() -> None:
    spec = QuantSpec("mxfp4", "ocp")
    w, x, _ = _layer()
    dead = torch.tensor([3, 40, 41, 200, *range(96, 128)])  # scattered ones and one whole group
    x = x.clone()
    x[:, dead] = 0.0
    h = hessian_from_inputs(x)
    for act_order in (False, True):
        res = gptq_quantize(w, h, spec, act_order=act_order)
        assert res.dead_columns == dead.numel() and not res.fallback
        assert torch.isfinite(res.weight).all()
        assert (res.weight[:, dead] == 0).all()
        _assert_on_grid(res, spec)
        assert layer_output_error(x, w, res.weight) < layer_output_error(x, w, spec.fake_quant(w))


def test_act_order_permutation_keeps_groups_whole() -> None:
    gs = 4
    diag = torch.tensor([1.0, 5, 2, 0, 9, 0, 0, 0, 3, 3, 3, 4])  # group sums 8, 9, 13
    perm = act_order_permutation(diag, gs)
    assert perm.tolist() == [11, 8, 9, 10, 4, 5, 6, 7, 1, 2, 0, 3]
    groups = perm.reshape(-1, gs) // gs
    assert (groups == groups[:, :1]).all()


# --- damping and fallback --------------------------------------------------------------------------


def _indefinite_hessian(off_diagonal: float) -> torch.Tensor:
    """Identity with one 2x2 block [[1, c], [c, 1]]: smallest eigenvalue 1 - c."""
    h = torch.eye(64)
    h[0, 1] = h[1, 0] = off_diagonal
    return h


def test_damping_is_raised_until_cholesky_succeeds() -> None:
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    # eigenvalue -0.05: 1% damping of mean diag 1 is not enough, 10% is
    res = gptq_quantize(w, _indefinite_hessian(1.05), QuantSpec("mxfp4", "ocp"))
    assert not res.fallback
    assert res.percdamp == pytest.approx(0.1) and res.damping == pytest.approx(0.1)


def test_cholesky_failure_falls_back_to_rtn() -> None:
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    spec = QuantSpec("nvfp4", "e4m3")
    res = gptq_quantize(w, _indefinite_hessian(1e4), spec)
    assert res.fallback and res.percdamp == pytest.approx(10.0)
    assert torch.equal(res.weight, spec.fake_quant(w))
    _assert_on_grid(res, spec)


@pytest.mark.parametrize(
    ("weight", "hessian", "blocksize", "match"),
    [
        (torch.zeros(4, 48), torch.eye(48), 128, "divisible"),
        (torch.zeros(4, 64), torch.eye(64), 48, "multiple of the group"),
        (torch.zeros(4, 64), torch.eye(32), 128, "needs"),
        (torch.full((4, 64), math.nan), torch.eye(64), 128, "NaN"),
        (torch.zeros(4, 64), torch.full((64, 64), math.inf), 128, "NaN or Inf"),
        (torch.zeros(64), torch.eye(64), 128, "2-D"),
    ],
)
def test_bad_inputs_are_rejected(weight, hessian, blocksize: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        gptq_quantize(weight, hessian, QuantSpec("mxfp4", "ocp"), blocksize=blocksize)


# --- Hessian accumulation and the error metric ----------------------------------------------------


def test_accumulator_matches_one_shot_hessian() -> None:
    x = torch.randn(3, 50, 16, generator=torch.Generator().manual_seed(4))
    acc = HessianAccumulator()
    acc.add(x[0])
    acc.add(x[1:])  # leading dims are tokens
    flat = x.reshape(-1, 16).double()
    assert acc.count == 150
    torch.testing.assert_close(acc.finalize(), 2.0 / 150 * flat.T @ flat)
    torch.testing.assert_close(hessian_from_inputs(x), acc.finalize())
    kept = acc.finalize()
    consumed = acc.finalize(consume=True)  # scaled in the running sum's storage, bit for bit
    assert torch.equal(consumed, kept) and acc.count == 0
    with pytest.raises(ValueError, match="no inputs"):
        acc.finalize()


def test_float32_products_add_into_the_float64_sum_exactly() -> None:
    """The float32 product added in place equals the product converted to float64 first."""
    x = torch.randn(4, 64, 96, generator=torch.Generator().manual_seed(5))
    acc = HessianAccumulator(product_dtype=torch.float32)
    ref = torch.zeros(96, 96, dtype=torch.float64)
    for xi in x:
        acc.add(xi)
        ref += (xi.T @ xi).double()
    assert torch.equal(acc.finalize(), ref * (2.0 / 256))


def test_accumulator_rejects_bad_input() -> None:
    acc = HessianAccumulator()
    with pytest.raises(ValueError, match="no inputs"):
        acc.finalize()
    acc.add(torch.ones(2, 8))
    with pytest.raises(ValueError, match="features"):
        acc.add(torch.ones(2, 9))
    with pytest.raises(ValueError, match="NaN"):
        acc.add(torch.full((2, 8), math.nan))


def test_layer_output_error_by_hand() -> None:
    x = torch.eye(2)
    w_ref = torch.tensor([[3.0, 4.0]])
    assert layer_output_error(x, w_ref, torch.tensor([[3.0, 0.0]])) == pytest.approx(0.8)
    assert layer_output_error(x, w_ref, w_ref) == 0.0
    assert layer_output_error(x, torch.zeros(1, 2), torch.zeros(1, 2)) == 0.0


# ----------------------------------------------------------------------------- MR-GPTQ pieces


def _obs_row(
    w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, scale: torch.Tensor
) -> torch.Tensor:
    """Brute-force reference: quantize one row `w` [K] column by column on fixed group `scale`
    [K / g] (per column), each error compensated on the remaining columns through the explicit
    inverse of H restricted to them (OBS), no Cholesky, no lazy blocks. Returns q [K]."""
    w = w.double().clone()
    q = torch.empty_like(w)
    left = list(range(w.numel()))
    per_col = scale.repeat_interleave(spec.group_size)
    for j in range(w.numel()):
        hinv = torch.linalg.inv(h[left][:, left])
        s = per_col[j : j + 1]
        q[j] = spec.decode(spec.encode(w[j : j + 1].float(), s), s).double()
        rest = left[1:]
        w[rest] -= (w[j] - q[j]) / hinv[0, 0] * hinv[0, 1:]
        left = rest
    return q


def _hessian(cols: int, seed: int) -> torch.Tensor:
    """A well-conditioned, strongly correlated Hessian of `cols` inputs with a few heavy channels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.8 * torch.randn(cols, cols, generator=g) / math.sqrt(cols)
    x = torch.randn(4096, cols, generator=g) @ mix
    x[:, :3] *= 4.0
    return hessian_from_inputs(x)


@pytest.mark.parametrize("rule", ["ocp", "ct-round"])
def test_hessian_scale_search_picks_the_brute_force_best(rule: str) -> None:
    """One group: per row, the chosen scale is the one of {ocp 2^e, 2^(e+1)} whose brute-force
    GPTQ result has the smaller output error (w - q) H (w - q)ᵀ; both candidates get chosen."""
    spec = QuantSpec("mxfp4", rule)
    h = _hessian(32, seed=3)
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(4))
    res = gptq_quantize(w, h, spec, percdamp=0.0, scale_search="hessian")
    lo = mxfp4.group_scales(w, "ocp")
    picked_hi = 0
    for r in range(w.shape[0]):
        errs = []
        for s in (lo[r], 2 * lo[r]):
            d = w[r].double() - _obs_row(w[r], h, spec, s)
            errs.append((d @ h @ d).item())
        best = lo[r] if errs[0] <= errs[1] else 2 * lo[r]
        if abs(errs[0] - errs[1]) > 1e-9 * max(errs):  # an exact tie may go either way
            assert res.scales[r, 0] == best, (r, errs)
        picked_hi += int(res.scales[r, 0] == 2 * lo[r])
    assert 0 < picked_hi < w.shape[0]
    # the scales returned are E8M0 powers of two and the ones the weight lies on
    assert torch.equal(torch.exp2(torch.log2(res.scales).round()), res.scales)
    assert torch.equal(
        round_to_grid(res.weight, res.scales.repeat_interleave(32, 1), spec), res.weight
    )
    # and the packed codes decode to it on those scales (what export writes)
    decoded = mxfp4.decode_with_scale(_grid_of(res), res.scales.repeat_interleave(32, 1), rule)
    assert torch.equal(decoded, res.weight)


def _grid_of(res: GPTQResult) -> torch.Tensor:
    """The E2M1 values the packed codes of `res` hold."""
    from duquant.formats.e2m1 import decode_e2m1, unpack_nibbles

    return decode_e2m1(unpack_nibbles(res.codes))


def test_hessian_scale_search_lowers_the_layer_error() -> None:
    """On the shared correlated layer, the search never raises and here lowers the output error,
    with dynamic and with static scales."""
    w, _, h = _layer()
    spec = QuantSpec("mxfp4", "ct-round")
    for static in (False, True):
        base = gptq_quantize(w, h, spec, static_groups=static)
        srch = gptq_quantize(w, h, spec, static_groups=static, scale_search="hessian")
        e0, e1 = hessian_output_error(h, w, base.weight), hessian_output_error(h, w, srch.weight)
        assert e1 < e0, (static, e0, e1)


def test_column_act_order_matches_the_brute_force_reference() -> None:
    """MR-GPTQ's order: columns by descending diag(H), each on its original group's static scale;
    the result matches the explicit-inverse reference run in that order."""
    spec = QuantSpec("mxfp4", "ocp")
    h = _hessian(64, seed=5)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(6))
    res = gptq_quantize(
        w, h, spec, percdamp=0.0, act_order=True, act_order_scope="column", static_groups=True
    )
    static = mxfp4.group_scales(w, "ocp")
    assert torch.equal(res.scales, static)
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    assert not torch.equal(perm // 32, torch.sort(perm // 32).values)  # groups really interleave
    hp = h[perm][:, perm]
    same = 0
    for r in range(w.shape[0]):
        s = static[r].repeat_interleave(32)[perm]
        wr = w[r, perm].double().clone()
        q = torch.empty_like(wr)
        left = list(range(64))
        for j in range(64):
            hinv = torch.linalg.inv(hp[left][:, left])
            q[j] = spec.decode(
                spec.encode(wr[j : j + 1].float(), s[j : j + 1]), s[j : j + 1]
            ).double()
            wr[left[1:]] -= (wr[j] - q[j]) / hinv[0, 0] * hinv[0, 1:]
            left = left[1:]
        ref = torch.empty_like(q)
        ref[perm] = q
        same += int((ref.float() == res.weight[r]).sum())
    assert same >= 0.99 * w.numel()


def test_column_act_order_needs_static_scales() -> None:
    w, _, h = _layer()
    with pytest.raises(ValueError, match="static"):
        gptq_quantize(w, h, QuantSpec("mxfp4", "ocp"), act_order=True, act_order_scope="column")


def _fpquant_cast(y: torch.Tensor) -> torch.Tensor:
    """FP-Quant's E2M1 cast (thresholds of its `cast_to_fp4`, ties to even), written out."""
    a = y.abs()
    edges = [(0.25, 0.0, True), (0.75, 0.5, False), (1.25, 1.0, True), (1.75, 1.5, False)]
    edges += [(2.5, 2.0, True), (3.5, 3.0, False), (5.0, 4.0, True)]
    out = torch.full_like(a, 6.0)
    for edge, value, inclusive in reversed(edges):
        out = torch.where(a <= edge if inclusive else a < edge, value, out)
    return out * y.sign()


def test_fpquant_mse_observer_matches_a_per_group_reference() -> None:
    """`fpquant_mse_scales` with rule fpquant gives FP-Quant's scale 2^floor(log2(f* amax)) / 3,
    f* the shrink of 100 with the smallest Σ|x - q|^2.4 on the float scale f amax / 6."""
    from duquant.gptq import fpquant_mse_scales

    g = torch.Generator().manual_seed(7)
    w = torch.randn(6, 128, generator=g)
    w[:, ::32] *= 3.0  # one large value per group: clipping it can pay
    w[0, :32] = 0.0  # an all-zero group keeps the rule's scale
    got = fpquant_mse_scales(w, QuantSpec("mxfp4", "fpquant")) / 3.0
    for r in range(w.shape[0]):
        for k in range(w.shape[1] // 32):
            x = w[r, 32 * k : 32 * (k + 1)].double()
            amax = x.abs().max().item()
            if amax == 0:
                assert got[r, k] == 2.0**-127 / 3.0
                continue
            errs = []
            for i in range(100):
                s = (1 - i * 0.8 / 100) * amax / 6
                errs.append(((x - _fpquant_cast(x / s) * s).abs() ** 2.4).sum().item())
            f = 1 - min(range(100), key=lambda i: (errs[i], i)) * 0.8 / 100
            want = 2.0 ** math.floor(math.log2(f * amax)) / 3.0
            assert math.isclose(got[r, k].item(), want, rel_tol=1e-6), (r, k)
    assert (got < mxfp4.group_scales(w, "fpquant") / 3.0).any()  # the search does shrink
