"""FlatQuant on the MX grid: Kronecker transform, clipped quantization and its gradients, training."""

from __future__ import annotations

import copy

import pytest
import torch

from duquant.calibrate import capture_block_inputs, collect_input_stats
from duquant.formats import spec_for
from duquant.formats.mxfp4 import shared_exponent
from duquant.gptq import gptq_quantize
from duquant.learn.flatquant import FlatQuantGroup, check_quant, decompose_dim, ste_clipped_quant
from duquant.learn.trainer import quantized_outputs, train_block
from duquant.methods import get_method
from duquant.models import adapter_for
from duquant.pipeline import QuantConfig, _swap_linears, online_flops_per_token, quantize_model
from duquant.plan import HeadShape, plan_from_steps
from duquant.qlinear import reset_caches_after_forward
from duquant.transforms.kronecker import Kronecker

SPEC = spec_for("mxfp4")


def _invertible(n: int, gen: torch.Generator) -> torch.Tensor:
    """A well-conditioned, non-orthogonal invertible matrix."""
    return torch.eye(n) + 0.3 * torch.randn(n, n, generator=gen) / n**0.5


@pytest.mark.parametrize("n1,n2", [(4, 8), (8, 8), (3, 64)])
def test_kronecker_matches_explicit_kron(n1, n2):
    gen = torch.Generator().manual_seed(n1 * n2)
    left, right = _invertible(n1, gen), _invertible(n2, gen)
    full = torch.kron(left, right).double()
    x = torch.randn(5, 7, n1 * n2, generator=gen)
    w = torch.randn(11, n1 * n2, generator=gen)
    t = Kronecker(left, right)
    torch.testing.assert_close(t(x).double(), x.double() @ full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        t.weight(w).double(), w.double() @ torch.linalg.inv(full).T, rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(t.inverse(t(x)), x, rtol=1e-4, atol=1e-5)
    # (x·A)·(W·A⁻ᵀ)ᵀ = x·Wᵀ
    torch.testing.assert_close(t(x) @ t.weight(w).T, x @ w.T, rtol=1e-4, atol=1e-4)
    n = n1 * n2
    assert t.flops_per_token(n) == 2 * n * (n1 + n2)
    # one factor missing: the identity of the size the width leaves
    for t1, m in (
        (Kronecker(None, right), torch.kron(torch.eye(n1), right)),
        (Kronecker(left, None), torch.kron(left, torch.eye(n2))),
    ):
        torch.testing.assert_close(t1(x).double(), x.double() @ m.double(), rtol=1e-5, atol=1e-5)
    assert Kronecker(None, right).flops_per_token(n) == 2 * n * n2


def test_decompose_dim_hand_computed():
    # a² - b² = n with a the first integer >= sqrt(n) giving a square a² - n
    assert decompose_dim(576) == (24, 24)  # SmolLM2 hidden
    assert decompose_dim(1536) == (32, 48)  # 40² - 1536 = 64 = 8²
    assert decompose_dim(128) == (8, 16)  # 12² - 128 = 16
    assert decompose_dim(4096) == (64, 64)
    assert decompose_dim(11008) == (86, 128)  # 107² - 11008 = 441 = 21²


def test_clipped_fake_quant_scale_and_ratio_one():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=gen) * torch.logspace(-2, 2, 64)
    torch.testing.assert_close(SPEC.fake_quant_clipped(x, 1.0), SPEC.fake_quant(x), rtol=0, atol=0)
    r = torch.rand(6, 1, generator=gen) * 0.5 + 0.5
    q = SPEC.fake_quant_clipped(x, r)
    # by hand: the E8M0 exponent of ratio · amax, elements rounded on it and saturated at ±6
    amax = x.reshape(6, 2, 32).abs().amax(-1)
    scale = torch.ldexp(torch.ones_like(amax), shared_exponent(amax * r, SPEC.scale_rule))
    y = x.reshape(6, 2, 32) / scale.unsqueeze(-1)
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    mag = grid[(y.abs().unsqueeze(-1) - grid).abs().argmin(-1)]  # no ties in random data
    ref = (torch.sign(y) * mag * scale.unsqueeze(-1)).reshape(6, 64)
    torch.testing.assert_close(q, ref, rtol=0, atol=0)
    # the weight quantizer's codes and scales decode to the same values
    torch.testing.assert_close(SPEC.quantize_weight(x, clip=r).dequantize(), q, rtol=0, atol=0)


def test_clip_ste_gradient_hand_computed():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 32, generator=gen)
    x[0, 5] = 7.0  # an outlier that a clip ratio < 1 saturates
    logit = torch.tensor(0.5, requires_grad=True)
    xin = x.clone().requires_grad_(True)
    q = ste_clipped_quant(xin, torch.sigmoid(logit), SPEC)
    torch.testing.assert_close(
        q.detach(), SPEC.fake_quant_clipped(x, torch.sigmoid(logit).detach())
    )
    upstream = torch.randn(1, 32, generator=gen)
    (q * upstream).sum().backward()
    # by hand: s = 2^e(c·amax), ds/dc = s / c (STE on the exponent), dq/ds = grid - x/s in range,
    # ±6 saturated; dc/dθ = c (1 - c)
    c = torch.sigmoid(torch.tensor(0.5)).item()
    amax = x.abs().max().item()
    s = 2.0 ** shared_exponent(torch.tensor([c * amax]), SPEC.scale_rule).item()
    y = x[0] / s
    grid = SPEC.fake_quant_clipped(x, c)[0] / s
    sat = y.abs() > 6
    assert sat.any() and not sat.all()
    dq_ds = torch.where(sat, torch.sign(y) * 6.0, grid - y)
    expected = (upstream[0] * dq_ds).sum().item() * (s / c) * c * (1 - c)
    assert logit.grad is not None and logit.grad.item() != 0.0
    assert logit.grad.item() == pytest.approx(expected, rel=1e-4)
    # elements: identity in range, nothing saturated, plus the group maximum's share via the scale
    g = xin.grad[0]
    in_range = ~sat
    in_range[5] = False
    torch.testing.assert_close(g[in_range], upstream[0][in_range])


def test_check_quant_refuses_non_mx_grids():
    check_quant(QuantConfig())
    with pytest.raises(ValueError, match="mxfp4"):
        check_quant(QuantConfig(weight=spec_for("nvfp4"), act=spec_for("nvfp4")))
    with pytest.raises(ValueError, match="scale rule"):
        check_quant(QuantConfig(act=spec_for("mxfp4", "mse")))


def test_gptq_honours_weight_clip():
    # with H = I no error propagates: GPTQ is RTN on the clipped scales
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(8, 64, generator=gen)
    clip = torch.rand(8, 1, generator=gen) * 0.4 + 0.6
    res = gptq_quantize(w, torch.eye(64), SPEC, clip=clip)
    torch.testing.assert_close(res.weight, SPEC.fake_quant_clipped(w, clip), rtol=0, atol=0)


def test_flatquant_refuses_save():
    from duquant.export.atomic import ExportError
    from duquant.export.ct import check_request

    for name in ("flatquant",):
        with pytest.raises(ExportError, match="not exportable"):
            check_request(get_method(name), QuantConfig())
    # the learned block rotations are one smoothing and one 32 x 32 rotation: exportable
    for name in ("duquant++learn", "duquant++e2e"):
        check_request(get_method(name), QuantConfig())


def _one_block(model, ids, fold=True):
    """(block 0, its groups, inputs, heads, learned groups) of a tiny model."""
    adapter = adapter_for(model)
    block = adapter.blocks(model)[0]
    groups = adapter.block_groups(block)
    inputs = capture_block_inputs(model, adapter, ids)
    stats = collect_input_stats(block, groups, inputs)
    heads = HeadShape.of(model.config)
    learned = {
        g.name: FlatQuantGroup(
            g,
            {n: block.get_submodule(n).weight.detach().float() for n in g.linears},
            stats[g.name].absmax,
            heads,
            torch.Generator().manual_seed(j),
            fold=fold,
        )
        for j, g in enumerate(groups)
    }
    return adapter, block, groups, inputs, heads, learned


def _block_mse(block, groups, inputs, learned, quant, heads) -> float:
    """Mean MSE of the training-time quantized block against its full-precision outputs."""
    with torch.no_grad():
        ref = [block(h, **inputs.kwargs)[0] for h in inputs.hidden]
    outs = quantized_outputs(block, groups, inputs, learned, quant, heads)
    return sum(torch.mean((o - r) ** 2).item() for o, r in zip(outs, ref, strict=True)) / len(ref)


def test_trained_block_mse_goes_down(tiny_llama):
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(3))
    _, block, groups, inputs, heads, learned = _one_block(tiny_llama, ids)
    quant = QuantConfig()
    before = _block_mse(block, groups, inputs, learned, quant, heads)
    info = train_block(
        block,
        groups,
        inputs,
        learned,
        quant,
        epochs=30,
        lr=5e-3,
        batch=4,
        seed=0,
        heads=heads,
        normalize_loss=True,
    )
    after = _block_mse(block, groups, inputs, learned, quant, heads)
    # a random tiny model's error is mostly irreducible: 0.77x measured
    assert after < 0.85 * before, (before, after, info)
    lg = learned["attn_in"] if "attn_in" in learned else next(iter(learned.values()))
    assert not torch.allclose(lg.left.sigma, torch.ones_like(lg.left.sigma))  # it learned


@pytest.mark.parametrize("fold", [False, True])
def test_inference_equals_training_forward(tiny_llama, fold):
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(4))
    _, block, groups, inputs, heads, learned = _one_block(tiny_llama, ids, fold=fold)
    quant = QuantConfig()
    train_block(
        block, groups, inputs, learned, quant, epochs=2, lr=5e-3, batch=2, seed=0, heads=heads
    )
    trained = quantized_outputs(block, groups, inputs, learned, quant, heads)
    plans = {}
    for g in groups:  # what learn_block hands the pipeline
        act_clip, weight_clip = learned[g.name].clips()
        plans[g.name] = plan_from_steps(
            learned[g.name].steps(), g, heads, fold, act_clip=act_clip, weight_clip=weight_clip
        )
    for g in groups:  # what the pipeline does with the plans
        plans[g.name].fold(block, g, heads)
    for g in groups:
        _swap_linears(block, g, plans[g.name], quant, layer=0)
    reset_caches_after_forward(block)
    with torch.no_grad():
        outs = [block(h, **inputs.kwargs)[0] for h in inputs.hidden]
    for o, t in zip(outs, trained, strict=True):
        if not fold:  # the same arithmetic: bit for bit
            torch.testing.assert_close(o, t.reshape(o.shape), rtol=0, atol=0)
        else:  # the scales folded into the norms round differently: a rare flipped code at most
            rel = (o - t.reshape(o.shape)).norm() / (t.norm())
            assert rel < 1e-3


def test_flatquant_fp_invariance_untrained_and_trained(tiny_llama, monkeypatch):
    import duquant.pipeline as pipeline

    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
    # untrained (0 epochs) and trained under W4A4 (3 epochs): the transforms, clips ignored,
    # applied with quantization off leave the logits unchanged
    fp = QuantConfig(None, None)
    real_swap = pipeline._swap_linears
    monkeypatch.setattr(
        pipeline,
        "_swap_linears",
        lambda block, g, plan, quant, **kw: real_swap(block, g, plan, fp, **kw),
    )
    for epochs in (0, 3):
        m = copy.deepcopy(tiny_llama)
        report = quantize_model(
            m, adapter_for(m), get_method("flatquant", learn_epochs=epochs), QuantConfig(), ids
        )
        assert len(report.learn) == 2
        with torch.no_grad():
            out = m(ids).logits
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        assert online_flops_per_token(m) > 0


def test_flatquant_with_gptq_weights_runs(tiny_llama):
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(6))
    m = copy.deepcopy(tiny_llama)
    report = quantize_model(
        m,
        adapter_for(m),
        get_method("flatquant", learn_epochs=1),
        QuantConfig(weights="gptq"),
        ids,
    )
    assert report.layer_errors and all(
        e["gptq_error"] <= e["rtn_error"] * 1.5 for e in report.layer_errors
    )
    with torch.no_grad():
        assert torch.isfinite(m(ids).logits).all()
