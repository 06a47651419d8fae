"""GPTQ's asymmetric target (GPTAQ): W* answers reference inputs from the inputs a layer really sees."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from duquant.config import ConfigError, RunConfig
from duquant.formats import QuantSpec
from duquant.gptq import CrossAccumulator, HessianAccumulator, asymmetric_target
from duquant.methods import get_method
from duquant.models import adapter_for
from duquant.pipeline import QuantConfig, quantize_model
from duquant.stages import GPTQ


def _pair(seed: int = 0, n: int = 400, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference inputs and a noisy, rounded copy of them (what a quantized layer would see)."""
    g = torch.Generator().manual_seed(seed)
    x_ref = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, d)
    x = torch.round(x_ref * 2) / 2 + 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x_ref, x


def _accumulate(x_ref: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, D) from two batches, as the pipeline adds windows one by one."""
    h, c = HessianAccumulator(), CrossAccumulator()
    for part_ref, part in zip(x_ref.split(150), x.split(150), strict=True):
        h.add(part)
        c.add(part_ref, part)
    return h.finalize(), c.finalize()


def test_asymmetric_target_is_the_least_squares_solution():
    x_ref, x = _pair()
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h, d = _accumulate(x_ref, x)
    w_star = asymmetric_target(w, h, d, percdamp=0.0)
    # brute force: argmin_W' ‖x W'ᵀ − x_ref Wᵀ‖ by lstsq
    expect = torch.linalg.lstsq(x, x_ref @ w.T).solution.T
    torch.testing.assert_close(w_star, expect, rtol=1e-4, atol=1e-5)  # float32 products


def test_gptq_of_w_star_minimises_the_reference_error_up_to_a_constant():
    x_ref, x = _pair(seed=3)
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    h, d = _accumulate(x_ref, x)
    w_star = asymmetric_target(w, h, d, percdamp=0.0)
    const = None
    for k in range(5):  # any candidate weight: the two objectives differ by the same constant
        cand = torch.randn(
            8, 16, generator=torch.Generator().manual_seed(10 + k), dtype=torch.float64
        )
        asym = (x_ref @ w.T - x @ cand.T).square().sum()
        sym = (x @ (w_star - cand).T).square().sum()
        if const is None:
            const = asym - sym
        torch.testing.assert_close(asym - sym, const, rtol=1e-4, atol=1e-3)
    assert const > 0  # the part no weight can undo


def test_no_mismatch_gives_the_weight_back_exactly_even_with_damping():
    x_ref, _ = _pair(seed=5)
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    h, d = _accumulate(x_ref, x_ref)
    assert torch.equal(d, torch.zeros_like(d))
    assert torch.equal(asymmetric_target(w, h, d, percdamp=0.01), w)


def test_cross_accumulator_refuses_unaligned_inputs():
    with pytest.raises(ValueError, match="do not match"):
        CrossAccumulator().add(torch.zeros(3, 4), torch.zeros(2, 4))


def _final_hidden(m, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m.model(ids).last_hidden_state


@pytest.mark.parametrize("target", ["unquantized", "model"])
def test_asymmetric_gptq_runs_in_the_pipeline_and_moves_the_weights(target):
    torch.manual_seed(0)
    ref = make_tiny_llama(seed=2, hidden_size=64, intermediate_size=128)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    spec = QuantSpec("mxfp4", "ct-round")
    out = {}
    for t in ("quantized", target):
        m = make_tiny_llama(seed=2, hidden_size=64, intermediate_size=128)
        rep = quantize_model(
            m,
            adapter_for(m),
            get_method("smooth+hadamard"),
            QuantConfig(spec, spec, weights="gptq", gptq=GPTQ(target=t)),
            ids,
        )
        assert not any(e["fallback"] for e in rep.layer_errors)
        out[t] = (m, _final_hidden(m, ids))
    fp = _final_hidden(ref, ids)
    w_classic = out["quantized"][0].model.layers[1].mlp.down_proj.weight
    w_asym = out[target][0].model.layers[1].mlp.down_proj.weight
    assert not torch.equal(w_classic, w_asym)
    assert torch.equal(spec.fake_quant(w_asym), w_asym)  # still on the grid
    err = {t: (h - fp).square().mean().item() for t, (_, h) in out.items()}
    # on its calibration tokens, matching the unquantized answers brings the output closer to FP
    assert err[target] < err["quantized"], err


def test_asymmetric_target_needs_quantized_hessians():
    with pytest.raises(ValueError, match="quantized Hessians"):
        GPTQ(target="model", hessian="fp")
    with pytest.raises(ConfigError, match="--gptq-hessian quantized"):
        RunConfig(gptq_target="model", gptq_hessian="fp")
    with pytest.raises(ConfigError, match="gptq_target|gptq-target"):
        RunConfig(gptq_target="nonsense")


def test_target_damp_must_be_positive():
    with pytest.raises(ValueError, match="target_damp"):
        GPTQ(target="model", target_damp=0.0)
    with pytest.raises(ConfigError, match="--gptq-target-damp"):
        RunConfig(gptq_target_damp=-1.0)
