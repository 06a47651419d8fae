"""Learned transforms (duquant.learn): the orthogonal parametrisation, the straight-through quantizer,
block training, and that what was learned folds into an exactly equivalent full-precision model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_llama

from duquant.calibrate import capture_block_inputs, collect_input_stats
from duquant.formats import QuantSpec
from duquant.learn import ste_fake_quant
from duquant.learn.rotation import LearnedRotation, cayley, nearest_orthogonal
from duquant.methods import get_method
from duquant.models import adapter_for
from duquant.pipeline import QuantConfig, _swap_linears, quantize_model
from duquant.plan import HeadShape, plan_group
from duquant.stages import EndToEnd, LearnRotation
from duquant.transforms.base import BlockRotation

MX = QuantSpec("mxfp4", "ct-round")


def test_cayley_is_orthogonal_and_identity_at_zero():
    """cayley(A) is orthogonal for any A (its skew part is used), and the identity at A = 0."""
    a = torch.randn(3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    q = cayley(a)
    eye = torch.eye(32, dtype=torch.float64)
    assert torch.allclose(q @ q.transpose(-1, -2), eye.expand(3, 32, 32), atol=1e-12)
    assert torch.equal(cayley(torch.zeros(32, 32, dtype=torch.float64)), eye)


def test_nearest_orthogonal_recovers_a_perturbed_rotation():
    """The polar factor of a slightly perturbed rotation is orthogonal and close to it."""
    gen = torch.Generator().manual_seed(1)
    r = cayley(torch.randn(32, 32, dtype=torch.float64, generator=gen))
    noisy = r + 1e-4 * torch.randn(32, 32, dtype=torch.float64, generator=gen)
    p = nearest_orthogonal(noisy)
    assert torch.allclose(p @ p.T, torch.eye(32, dtype=torch.float64), atol=1e-12)
    assert (p - r).abs().max() < 1e-3


def test_ste_quantizes_forward_and_passes_gradients_through():
    """Forward: the format's fake quantization bit for bit; backward: the identity."""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    y = ste_fake_quant(x, MX)
    assert torch.equal(y.detach(), MX.fake_quant(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_learned_rotation_starts_at_the_searched_plan():
    """At initialisation the learned group is the plan it was built from (online and weight map)."""
    gen = torch.Generator().manual_seed(3)
    s = torch.rand(64, generator=gen) + 0.5
    r = cayley(torch.randn(32, 32, generator=gen))
    lg = LearnedRotation(s, r, learn_scale=True, per_block=True, dim=64)
    x, w = torch.randn(5, 64, generator=gen), torch.randn(7, 64, generator=gen)
    xb = (x / s).reshape(5, 2, 32) @ r
    wb = (w * s).reshape(7, 2, 32) @ r
    assert torch.allclose(lg.online(x), xb.reshape(5, 64), atol=1e-5)
    assert torch.allclose(lg.weight(w), wb.reshape(7, 64), atol=1e-5)
    # a pure rotation: activations and weights rotate alike, so the product is unchanged
    assert torch.allclose(lg.online(x) @ lg.weight(w).T, x @ w.T, atol=1e-4)


def _first_block_setup(seed: int = 0):
    """A tiny Llama, its first block's groups, captured inputs, statistics and duquant++mx plans."""
    model = make_tiny_llama(seed)
    adapter = adapter_for(model)
    ids = torch.randint(
        0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(4)
    )
    quant = QuantConfig(weight=MX, act=MX)
    method = get_method("duquant++learn", learn_epochs=4, learn_lr=1e-2, learn_batch=2)
    block = adapter.blocks(model)[0]
    groups = adapter.block_groups(block)
    with torch.no_grad():
        inputs = capture_block_inputs(model, adapter, ids)
        stats = collect_input_stats(block, groups, inputs, sample_rows=256, seed=0)
    heads = HeadShape.of(model.config)
    plans = {
        g.name: plan_group(block, g, method, quant, stats[g.name], heads, seed=j)
        for j, g in enumerate(groups)
    }
    return model, adapter, block, groups, inputs, stats, plans, method, quant, heads


def _outliers_and_identity_start(inputs, plans) -> None:
    """Two massive residual channels (as in SmolLM2) and every rotation reset to the identity: a
    start that a rotation can clearly improve on."""
    for h in inputs.hidden:
        h[..., 3] *= 30
        h[..., 40] *= 30
    for p in plans.values():
        for step in p.weight_transform.steps:
            if isinstance(step, BlockRotation):
                step.rotation.copy_(torch.eye(32).expand_as(step.rotation))


def test_training_lowers_the_quantized_block_error_and_restores_the_block():
    """From a poor start (outlier channels, no rotation) training lowers the quantized block-output
    MSE clearly; the block's own weights are untouched."""
    _, _, block, groups, inputs, stats, plans, method, quant, heads = _first_block_setup()
    _outliers_and_identity_start(inputs, plans)
    stage = method.overridden(learn_lr=3e-3).get(LearnRotation)
    before = copy.deepcopy(block.state_dict())
    new_plans, info = stage.learn(block, groups, inputs, plans, stats, quant, heads, seed=0)
    assert info["steps"] == stage.epochs * 4
    assert info["loss_after"] < 0.97 * info["loss_before"]
    after = block.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.info.get("learned") for p in new_plans.values())


def test_learned_plans_are_exact_in_full_precision():
    """Folding and applying the learned transforms with quantization off leaves the block's output
    unchanged: what training found is an exact reparametrisation, like every other plan."""
    model, adapter, block, groups, inputs, stats, plans, method, quant, heads = _first_block_setup()
    h = inputs.hidden[0]
    with torch.no_grad():
        ref = block(h, **inputs.kwargs)
        ref = ref[0] if isinstance(ref, tuple) else ref
    stage = method.get(LearnRotation)
    new_plans, _ = stage.learn(block, groups, inputs, plans, stats, quant, heads, seed=0)
    for g in groups:
        new_plans[g.name].fold(block, g, heads, adapter.norm_offset)
    for g in groups:
        _swap_linears(block, g, new_plans[g.name], QuantConfig(None, None), layer=0)
    with torch.no_grad():
        out = block(h, **inputs.kwargs)
        out = out[0] if isinstance(out, tuple) else out
    assert (out - ref).abs().max() / ref.abs().max() < 1e-4


@pytest.mark.parametrize("weights", ["rtn", "gptq"])
def test_learned_method_runs_end_to_end_on_a_tiny_model(weights):
    """duquant++learn quantizes a tiny model (RTN or GPTQ weights) and reports per-block losses."""
    model = make_tiny_llama(1)
    ids = torch.randint(
        0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(5)
    )
    quant = QuantConfig(weight=MX, act=MX, weights=weights)
    rep = quantize_model(
        model, adapter_for(model), get_method("duquant++learn", learn_epochs=1), quant, ids
    )
    assert len(rep.learn) == model.config.num_hidden_layers
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_model_target_trains_towards_the_unquantized_model():
    """learn_target=model: block 0 sees the same targets as learn_target=block (nothing before it
    is quantized), later blocks the full-precision model's own outputs; both run end to end."""
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(6))
    quant = QuantConfig(weight=MX, act=MX)
    reports = {}
    for target in ("block", "model"):
        model = make_tiny_llama(2)
        method = get_method("duquant++learn", learn_epochs=1, learn_target=target)
        reports[target] = quantize_model(model, adapter_for(model), method, quant, ids).learn
    assert reports["block"][0] == reports["model"][0]
    assert reports["block"][1]["loss_before"] != reports["model"][1]["loss_before"]


def test_method_best_is_duquant_nt_with_gptq():
    """`--method best` is the recipe duquant++nt with GPTQ weights, and the record says so."""
    from duquant import api
    from duquant.config import RunConfig
    from duquant.stages import GPTQ

    plan = api.check(RunConfig(method="best"))
    record = api.record(plan, "model")
    assert plan.recipe.without(GPTQ).stages == get_method("duquant++nt").stages
    assert plan.quant.weights == "gptq" and record["weight_quantizer"] == "gptq"
    assert record["method"]["name"] == "best" and record["run"]["method"] == "best"
    assert [s["stage"] for s in record["method"]["stages"]] == [
        "smooth",
        "greedy-rotation",
        "gptq",
        "norm-tweak",
    ]


def test_end_to_end_learning_lowers_the_kl_and_keeps_an_exact_plan(one_thread):
    """duquant++e2e: joint training (block by block, towards the teacher's targets) lowers the
    quantized model's KL from the full-precision model on the calibration windows, leaves the
    model untouched, and what it learned is still one smoothing and one orthogonal block rotation
    per input (exact with quantization off)."""
    from duquant.learn.distill import kl_from_teacher
    from duquant.learn.e2e import learn_end_to_end
    from duquant.learn.teacher import teacher_targets
    from duquant.models.streaming import InMemoryBlocks

    model = make_tiny_llama(3)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(7))
    before = copy.deepcopy(model.state_dict())
    method = get_method("duquant++e2e", learn_epochs=6, learn_lr=2e-2)
    quant = QuantConfig(weight=MX, act=MX)
    adapter = adapter_for(model)
    searched = quantize_model(  # the plans EndToEnd starts from: its recipe's search, RTN weights
        copy.deepcopy(model), adapter, method.without(EndToEnd), quant, ids, seed=0
    ).plans
    stage = method.get(EndToEnd)
    store = InMemoryBlocks(adapter.blocks(model))
    targets = teacher_targets(model, adapter, store, ids, 256)  # k + 1 >= vocab: the exact KL
    plans, info = learn_end_to_end(
        model,
        adapter,
        store,
        searched,
        quant,
        ids,
        targets,
        seed=0,
        epochs=stage.epochs,
        lr=stage.lr,
        batch=stage.batch,
    )
    assert info["steps"] == 6 * 4 and len(info["kl_per_epoch"]) == 6
    kls = info["kl_per_epoch"]
    # the rotations are re-rounded onto the MX grid every step, so the per-epoch KL is not monotone
    # and its path moves with float summation order (token shares a step since session 19, cut by
    # cost since session 20: one epoch went 20 % above the first): the last epoch below the
    # first, the best 3 % below it (and the whole method below its untrained recipe, further down)
    assert kls[-1] < kls[0] and min(kls[1:]) < 0.97 * kls[0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for plan in (p for block in plans for p in block.values()):
        assert plan.info.get("learned")
        rot = [s for s in plan.weight_transform.steps if isinstance(s, BlockRotation)]
        r = rot[0].rotation.double()
        eye = torch.eye(r.shape[-1], dtype=torch.float64)
        assert torch.allclose(r @ r.transpose(-1, -2), eye.expand_as(r), atol=1e-5)
    # the whole method against its recipe without the training: a lower KL from full precision on
    # the mean of three seeds (one seed's ratio ranges 0.71-1.09 on this tiny case as float order
    # changes: session 20 measured 1.013, 0.714, 1.001 with shares cut by cost, 0.978, 0.974,
    # 0.971 cut evenly, 0.963, 0.858, 1.014 uncut)
    ratios = []
    for seed in range(3):
        kls = []
        for recipe in (method, method.without(EndToEnd)):
            q = copy.deepcopy(model)
            quantize_model(q, adapter_for(q), recipe, quant, ids, seed=seed)
            with torch.no_grad():
                kls.append(kl_from_teacher(q(ids).logits, model(ids).logits).item())
        ratios.append(kls[0] / kls[1])
    assert sum(ratios) / len(ratios) < 0.99, ratios
    # with quantization off the learned plans reproduce the full-precision model
    fp = copy.deepcopy(model)
    adapter = adapter_for(fp)
    heads = HeadShape.of(fp.config)
    for block, block_plans in zip(adapter.blocks(fp), plans, strict=True):
        groups = adapter.block_groups(block)
        for g in groups:
            block_plans[g.name].fold(block, g, heads, adapter.norm_offset)
        for g in groups:
            _swap_linears(block, g, block_plans[g.name], QuantConfig(None, None), layer=0)
    with torch.no_grad():
        assert kl_from_teacher(fp(ids).logits, model(ids).logits) < 1e-6


def test_end_to_end_makes_no_copy_of_the_model_and_plans_on_one_block_copy_at_a_time(monkeypatch):
    """duquant++e2e without a second model: the searched starting plans come from copies of one
    block at a time (`ScratchBlocks`), equal to the plans a quantization of a whole copy gives,
    and the training runs block by block on the model itself, which is left exactly as it was;
    nothing deep-copies the model."""
    from duquant.learn.e2e import learn_end_to_end
    from duquant.learn.teacher import teacher_targets
    from duquant.models.streaming import InMemoryBlocks, ScratchBlocks

    model = make_tiny_llama(3)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(7))
    method = get_method("duquant++e2e", learn_epochs=1).without(EndToEnd)
    quant = QuantConfig(weight=MX, act=MX)
    whole = quantize_model(copy.deepcopy(model), adapter_for(model), method, quant, ids).plans
    before = copy.deepcopy(model.state_dict())
    copied, deepcopy = [], copy.deepcopy

    def recording(obj, *args, **kw):
        copied.append(id(obj))
        return deepcopy(obj, *args, **kw)

    monkeypatch.setattr(copy, "deepcopy", recording)
    adapter = adapter_for(model)
    scratch = ScratchBlocks(InMemoryBlocks(adapter.blocks(model)))
    plans = quantize_model(model, adapter, method, quant, ids, store=scratch).plans
    assert len(plans) == len(whole)
    compared = 0
    for mine, ref in zip(plans, whole, strict=True):
        for name, plan in mine.items():
            ours, theirs = (
                plan.weight_transform.state_dict(),
                ref[name].weight_transform.state_dict(),
            )
            assert ours.keys() == theirs.keys()
            for k, x in ours.items():
                assert torch.equal(x, theirs[k])
                compared += 1
    assert compared >= 2 * len(plans)  # a smoothing scale and a rotation per input at least
    assert id(model) not in copied and all(id(b) in copied for b in adapter.blocks(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    store = InMemoryBlocks(adapter.blocks(model))
    targets = teacher_targets(model, adapter, store, ids, 16)
    learn_end_to_end(model, adapter, store, plans, quant, ids, targets, epochs=1, lr=1e-2, batch=1)
    assert id(model) not in copied
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_kl_from_teacher_matches_torch():
    """The distillation loss is torch's KL(teacher || student) averaged over tokens."""
    gen = torch.Generator().manual_seed(8)
    s, t = torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen)
    from duquant.learn.distill import kl_from_teacher

    ref = torch.nn.functional.kl_div(
        s.log_softmax(-1).reshape(-1, 11),
        t.log_softmax(-1).reshape(-1, 11),
        log_target=True,
        reduction="batchmean",
    )
    torch.testing.assert_close(kl_from_teacher(s, t), ref)
