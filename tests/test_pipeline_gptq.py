"""GPTQ inside the pipeline: sequential per input group, weights on the grid, lower layer error than RTN."""

from __future__ import annotations

import torch
from conftest import make_tiny_llama

from duquant.formats import QuantSpec
from duquant.methods import get_method
from duquant.models import adapter_for
from duquant.pipeline import QuantConfig, quantize_model
from duquant.qlinear import QuantLinear


def test_gptq_pipeline_weights_on_grid_and_better_than_rtn():
    m = make_tiny_llama(
        seed=2, hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1
    )
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec("mxfp4", "ocp")
    rep = quantize_model(
        m,
        adapter_for(m),
        get_method("smooth+hadamard"),
        QuantConfig(spec, spec, weights="gptq"),
        ids,
    )
    assert len(rep.layer_errors) == 2 * 7
    for e in rep.layer_errors:
        assert not e["fallback"]
    wins = sum(e["gptq_error"] < e["rtn_error"] for e in rep.layer_errors)
    assert wins >= 12, rep.layer_errors  # GPTQ may tie RTN on a near-diagonal Hessian, rarely lose
    mean_g = sum(e["gptq_error"] for e in rep.layer_errors) / len(rep.layer_errors)
    mean_r = sum(e["rtn_error"] for e in rep.layer_errors) / len(rep.layer_errors)
    assert mean_g < 0.9 * mean_r
    for layer in m.model.layers:
        for lin in (layer.self_attn.q_proj, layer.mlp.down_proj):
            assert isinstance(lin, QuantLinear)
            assert torch.equal(spec.fake_quant(lin.weight), lin.weight)  # on the MX grid
    assert rep.peak_rss_mb > 0


def test_gptq_needs_calibration():
    m = make_tiny_llama()
    try:
        quantize_model(m, adapter_for(m), get_method("rtn"), QuantConfig(weights="gptq"), None)
    except ValueError as exc:
        assert "calibration" in str(exc)
    else:
        raise AssertionError("GPTQ without calibration data must fail clearly")


def test_feed_block_until_sees_what_a_full_block_pass_sees():
    """Stopping the block after the hooked module gives that module's outputs of a full pass, and
    runs nothing after it."""
    from duquant.calibrate import capture_block_inputs, feed_block_until

    m = make_tiny_llama(seed=1)
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_block_inputs(m, adapter_for(m), ids)
    block = m.model.layers[0]
    full, calls = [], []
    h1 = block.self_attn.o_proj.register_forward_hook(lambda _m, _a, out: full.append(out.clone()))
    h2 = block.mlp.down_proj.register_forward_hook(lambda *_: calls.append(1))
    for h in inputs.hidden:
        block(h, **inputs.kwargs)
    assert len(calls) == 3
    h1.remove()
    got = []
    feed_block_until(block, inputs, block.self_attn.o_proj, lambda out: got.append(out.clone()))
    assert len(calls) == 3, "the MLP after the stop point must not run"
    h2.remove()
    assert len(got) == 3 and all(torch.equal(a, b) for a, b in zip(got, full, strict=True))


def test_transformed_hessian_is_the_hessian_of_transformed_inputs():
    from duquant.gptq import hessian_from_inputs
    from duquant.stages.gptq import transformed_hessian
    from duquant.transforms.base import BlockRotation, ChannelScale, Sequence
    from duquant.transforms.rotation import random_spread

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 64, generator=g, dtype=torch.float64)
    t = Sequence(
        [ChannelScale(torch.rand(64, generator=g) + 0.5), BlockRotation(random_spread(32, g))]
    )
    expected = hessian_from_inputs(t(x))
    got = transformed_hessian(hessian_from_inputs(x), t)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)


def _gptq_inputs(monkeypatch, hessian: str, act) -> tuple[list[torch.Tensor], int]:
    """Hessians handed to GPTQ and block-0 forward calls of a tiny DuQuant++* run."""
    import duquant.stages.gptq as gptq_stage
    from duquant.gptq import gptq_quantize as real
    from duquant.stages import GPTQ

    m = make_tiny_llama(seed=3)
    ids = torch.randint(0, 128, (3, 32), generator=torch.Generator().manual_seed(1))
    seen, calls = [], []
    monkeypatch.setattr(
        gptq_stage, "gptq_quantize", lambda w, h, *a, **k: seen.append(h) or real(w, h, *a, **k)
    )
    m.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    spec = QuantSpec("mxfp4", "ct-round")
    quant = QuantConfig(spec, act, weights="gptq", gptq=GPTQ(hessian=hessian))
    quantize_model(m, adapter_for(m), get_method("duquant++", max_steps=8), quant, ids)
    return seen, len(calls)


def test_fp_hessians_skip_the_group_passes_and_match_the_first_group(monkeypatch):
    # without activation quantization the first group (q/k/v of block 0) sees the same inputs either
    # way, so its fp Hessian (Tᵀ H T of the statistics pass) equals the one accumulated per group
    h_q, calls_q = _gptq_inputs(monkeypatch, "quantized", None)
    h_f, calls_f = _gptq_inputs(monkeypatch, "fp", None)
    assert len(h_q) == len(h_f) > 0
    assert torch.allclose(h_f[0], h_q[0], rtol=1e-5, atol=1e-6)
    # per window: statistics + output pass (the capture runs no block: recorders stand in), vs
    # those plus one partial pass per group
    assert calls_f == 2 * 3 and calls_q == (2 + 4) * 3


def test_mr_gptq_records_gptq_with_column_act_order_and_static_mse_scales():
    """`--method mr-gptq` alone means GPTQ weights with FP-Quant's order and observer, and the
    recorded config says so; other methods keep the command line's weight quantizer."""
    from duquant import api
    from duquant.config import RunConfig
    from duquant.stages import Hadamard

    def quant_config(cfg: RunConfig):
        return api.check(cfg).quant

    cfg = RunConfig(method="mr-gptq")
    plan = api.check(cfg)
    assert cfg.weights == "gptq"
    record = api.record(plan, "tiny")
    assert plan.recipe.get(Hadamard) == Hadamard(random=True, block_size=32)
    assert record["run"]["weights"] == "gptq" and record["weight_quantizer"] == "gptq"
    g = record["gptq"]
    assert (g["act_order"], g["act_order_scope"], g["static_groups"]) == (True, "column", True)
    assert g["scale_search"] == "fpquant-mse"
    plain = quant_config(RunConfig(method="hadamard", weights="gptq", gptq_scale_search="hessian"))
    assert plain.gptq.scale_search == "hessian" and not plain.gptq.static_groups
    assert quant_config(RunConfig(method="hadamard")).weights == "rtn"


def test_mr_gptq_keeps_full_precision_and_quantizes_on_its_static_scales():
    """The mr-gptq rotation leaves the FP model unchanged; quantized, every weight lies on its
    stored E8M0 scales, GPTQ beats RTN on average, and the Hessian search variant runs too."""
    from conftest import transformed_fp_logits

    from duquant import api
    from duquant.config import RunConfig

    def quant_config(cfg: RunConfig):
        return api.check(cfg).quant

    base = make_tiny_llama(seed=3)
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(1))
    ref, out, _ = transformed_fp_logits(base, "mr-gptq", ids, max_steps=0)
    assert torch.allclose(ref, out, atol=1e-4, rtol=1e-4)
    for search in (None, "hessian"):
        m = make_tiny_llama(seed=3)
        name = "mr-gptq" if search is None else "random-hadamard"
        quant = quant_config(RunConfig(method=name, weights="gptq", gptq_scale_search=search))
        rep = quantize_model(m, adapter_for(m), get_method(name), quant, ids)
        mean_g = sum(e["gptq_error"] for e in rep.layer_errors) / len(rep.layer_errors)
        mean_r = sum(e["rtn_error"] for e in rep.layer_errors) / len(rep.layer_errors)
        assert mean_g < mean_r, (search, mean_g, mean_r)
        for layer in m.model.layers:
            lin = layer.mlp.down_proj
            qw = lin.qweight  # the codes and scales export writes
            assert torch.equal(torch.exp2(torch.log2(qw.scales).round()), qw.scales)
            per_el = qw.scales.repeat_interleave(32, dim=1)
            assert torch.equal(
                qw.spec.decode(qw.spec.encode(lin.weight, per_el), per_el), lin.weight
            )
        with torch.no_grad():
            assert torch.isfinite(m(ids).logits).all()
