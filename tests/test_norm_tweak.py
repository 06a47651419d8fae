"""Norm tweaking (duquant.learn.norms): the pre-norm weights trained after GPTQ on the KL from full
precision, through straight-through activation quantization; nothing else of the model changes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama

from duquant.formats import QuantSpec
from duquant.learn.distill import kl_from_teacher
from duquant.learn.norms import RelativeScale, tuned_norms
from duquant.methods import get_method
from duquant.models import adapter_for
from duquant.pipeline import QuantConfig, quantize_model
from duquant.qlinear import InputQuantizer, QuantLinear
from duquant.transforms.base import BlockRotation
from duquant.transforms.hadamard import hadamard

MX = QuantSpec("mxfp4", "ct-round")


def _quantized(method: str, seed: int = 4, **overrides):
    fp = make_tiny_llama(seed)
    model = copy.deepcopy(fp)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(seed))
    rep = quantize_model(
        model, adapter_for(model), get_method(method, **overrides), QuantConfig(weights="gptq"), ids
    )
    return fp, model, ids, rep


def test_norm_tweaking_lowers_the_kl_and_changes_only_the_norms():
    """Against duquant++mx* on the same calibration: the same quantized weights and online
    transforms bit for bit, other norm weights, and a clearly lower KL from the FP model."""
    fp, base, ids, _ = _quantized("duquant++mx")
    _, tuned, _, rep = _quantized("duquant++nt", norm_epochs=8, norm_lr=5e-2)
    assert rep.norm_tuning["steps"] == 8 * 4
    assert rep.norm_tuning["norms"] == 2 * fp.config.num_hidden_layers + 1
    names = {n for n, m in tuned.named_modules() if m in tuned_norms(tuned, adapter_for(tuned))}
    sd_base, sd_tuned = base.state_dict(), tuned.state_dict()
    assert sd_base.keys() == sd_tuned.keys()
    for k in sd_base:
        same = torch.equal(sd_base[k], sd_tuned[k])
        assert same != any(k == f"{n}.weight" for n in names), k
    with torch.no_grad():
        kl_base = kl_from_teacher(base(ids).logits, fp(ids).logits).item()
        kl_tuned = kl_from_teacher(tuned(ids).logits, fp(ids).logits).item()
    assert kl_tuned < 0.8 * kl_base
    # the trained weights are plain parameters again, with the model's own requires_grad flags
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    assert flags == {n: p.requires_grad for n, p in tuned.named_parameters()}


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_relative_scale_starts_at_the_weight(offset):
    """(offset + w0)·exp(0) − offset = w0 (Gemma's 1 + w norms included); steps are relative."""
    w0 = torch.tensor([0.5, -0.2, 2.0])
    p = RelativeScale(w0, offset)
    t = p.right_inverse(w0)
    assert torch.equal(t, torch.zeros(3))
    torch.testing.assert_close(p(t), w0)
    torch.testing.assert_close(
        p(torch.full((3,), 0.1)), (offset + w0) * torch.exp(torch.tensor(0.1)) - offset
    )


def test_input_quantizer_is_straight_through_under_grad():
    """With gradients on, the activation quantizer computes the same values as without and passes
    the gradient through the quantization (only the online rotation acts on it)."""
    gen = torch.Generator().manual_seed(5)
    rot = BlockRotation(hadamard(32))
    iq = InputQuantizer(rot, MX)
    x = torch.randn(3, 64, generator=gen)
    with torch.no_grad():
        ref = iq(x.clone())
    iq.reset()
    xg = x.clone().requires_grad_(True)
    y = iq(xg)
    assert torch.equal(y.detach(), ref)
    g = torch.randn(3, 64, generator=gen)
    y.backward(g)
    torch.testing.assert_close(xg.grad, rot.inverse(g), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["quarot"])
def test_whole_model_steps_are_refused_when_streaming(method):
    """QuaRot rotates the whole model at once: a streamed quantization is refused before anything
    changes (norm tweaking and end-to-end training go block by block and stream:
    test_norm_tweak_blockwise, test_streaming)."""
    from duquant.models.streaming import InMemoryBlocks

    class _Streamed(InMemoryBlocks):
        whole_model = False

    model = make_tiny_llama(1)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(9))
    adapter = adapter_for(model)
    with pytest.raises(ValueError, match="load the model in memory"):
        quantize_model(
            model,
            adapter,
            get_method(method),
            QuantConfig(),
            ids,
            store=_Streamed(adapter.blocks(model)),
        )
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_norm_epochs_from_the_command_line_override_the_method():
    """--norm-epochs / --norm-lr reach the method (norm tweaking added to any method, or switched
    off), and duquant++nt with 0 epochs is duquant++mx bit for bit."""
    from duquant import api
    from duquant.config import ConfigError, RunConfig
    from duquant.stages import NormTweak

    cfg = RunConfig(method="duquant++mx", norm_epochs=3, norm_lr=0.05, norm_batch=2)
    plan = api.check(cfg)
    stage = plan.recipe.get(NormTweak)
    assert (stage.epochs, stage.lr, stage.batch) == (3, 0.05, 2)
    record = api.record(plan, "tiny")
    want = {**NormTweak().to_dict(), "epochs": 3, "lr": 0.05, "batch": 2}
    assert record["method"]["stages"][-1] == want
    with pytest.raises(ConfigError, match="larger than the 4 calibration"):
        api.check(RunConfig(method="best", norm_batch=8, nsamples=4))
    best = get_method("best", **RunConfig(method="best").method_overrides())
    assert best.get(NormTweak).epochs == 1
    _, base, ids, _ = _quantized("duquant++mx")
    _, off, _, rep = _quantized("duquant++nt", norm_epochs=0)
    assert rep.norm_tuning == {}
    sd_base, sd_off = base.state_dict(), off.state_dict()
    assert sd_base.keys() == sd_off.keys()
    assert all(torch.equal(sd_base[k], sd_off[k]) for k in sd_base)
    with torch.no_grad():
        assert torch.equal(base(ids).logits, off(ids).logits)
