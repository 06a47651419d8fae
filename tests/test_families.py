"""Every supported family: tiny random models from transformers' own config classes, every method.

Full precision: the transforms alone (no quantization) leave the logits unchanged. Quantized: the
forward runs and every linear the adapter names (every expert's included) is a QuantLinear.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, make_tiny_family, transformed_fp_logits
from torch import nn

from duquant.methods import RECIPES, get_method
from duquant.models import adapter_for
from duquant.pipeline import QuantConfig, quantize_model
from duquant.qlinear import QuantLinear

METHOD_NAMES = sorted(RECIPES)
REFUSED = {("gemma3", "quarot")}  # the residual rotation cannot pass Gemma 3's post-norms


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def base_models() -> dict:
    """One tiny model a family, built once; tests deep-copy it."""
    return {f: make_tiny_family(f) for f in FAMILIES}


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_fp_invariance(family, method, base_models):
    if (family, method) in REFUSED:
        pytest.skip("refused (tested below)")
    base = base_models[family]
    ref, out, _ = transformed_fp_logits(base, method, _ids(), max_steps=8)
    err = float((out - ref).abs().max())
    assert torch.allclose(out, ref, atol=2e-4 * ref.abs().max()), err


def _quantized_names(model: nn.Module) -> set[str]:
    return {n for n, mod in model.named_modules() if isinstance(mod, QuantLinear)}


@pytest.mark.parametrize("method", [m for m in METHOD_NAMES if m != "fp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_forward_runs(family, method, base_models):
    if (family, method) in REFUSED:
        pytest.skip("refused (tested below)")
    m = copy.deepcopy(base_models[family])
    ids = _ids(1)
    adapter = adapter_for(m)
    quantize_model(m, adapter, get_method(method, max_steps=4), QuantConfig(), ids)
    with torch.no_grad():
        out = m(ids).logits
    assert torch.isfinite(out).all()
    # every linear of every block is quantized; embeddings, head and a MoE router are not
    linears = {
        n
        for n, mod in m.named_modules()
        if isinstance(mod, nn.Linear) and n.startswith(adapter.layers)
    }
    quantized = _quantized_names(m)
    assert not linears - quantized and quantized
    for i, block in enumerate(adapter.blocks(m)):
        for g in adapter.block_groups(block):
            for name in g.linears:
                assert f"{adapter.layers}.{i}.{name}" in quantized
    if family in ("qwen3_moe", "mixtral", "olmoe"):  # 4 experts; Qwen3-MoE's block 1 is dense
        n_sparse = 1 if family == "qwen3_moe" else 2
        assert len([n for n in quantized if ".experts.experts." in n]) == n_sparse * 4 * 2
        assert not isinstance(m.model.layers[0].mlp.gate, QuantLinear)


def test_gemma3_quarot_is_refused_before_anything_changes(base_models):
    m = copy.deepcopy(base_models["gemma3"])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"quarot.*gemma3.*post-norms"):
        quantize_model(m, adapter_for(m), get_method("quarot"), QuantConfig(), _ids())
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_moe_expert_without_calibration_tokens_gets_the_data_free_plan(base_models, caplog):
    # one calibration token routes to 2 of the 4 experts: the other two have no statistics
    m = copy.deepcopy(base_models["qwen3_moe"])
    ids = _ids()
    with torch.no_grad():
        ref = m(ids).logits
    rep = quantize_model(
        m,
        adapter_for(m),
        get_method("duquant++", max_steps=4),
        QuantConfig(None, None),
        ids[:1, :1],
    )
    with torch.no_grad():
        out = m(ids).logits
    assert torch.allclose(out, ref, atol=2e-4 * ref.abs().max())
    downs = [rep.plans[0][f"experts.{e}.down"] for e in range(4)]
    smoothed = [bool(p.folded) for p in downs]  # smoothing folds into up rows when it ran
    assert sorted(smoothed) == [False, False, True, True]
    assert "saw no calibration tokens" in caplog.text


def test_each_block_replays_its_own_forward_arguments(base_models):
    """Gemma 3 alternates sliding-window and global attention: block i must get its own mask/RoPE."""
    from duquant.calibrate import capture_block_inputs, run_block

    m = base_models["gemma3"]
    adapter = adapter_for(m)
    ids = _ids()
    inputs = capture_block_inputs(m, adapter, ids)
    k0, k1 = inputs.layer_kwargs
    assert not torch.equal(k0["position_embeddings"][0], k1["position_embeddings"][0])
    with torch.no_grad():
        hs = m(ids, output_hidden_states=True).hidden_states  # embeddings, block 0, (normed) last
    blocks = adapter.blocks(m)
    h1 = run_block(blocks[0], inputs)
    assert all(torch.equal(a, b) for a, b in zip(h1, hs[1].split(1), strict=True))
    own = run_block(blocks[1], inputs.next(h1, 1))
    wrong = run_block(blocks[1], inputs.next(h1, 0))  # block 0's arguments
    seen = []  # what the model itself feeds its final norm: block 1's output
    handle = m.get_submodule(adapter.final_norm).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0])
    )
    with torch.no_grad():
        m(ids)
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(own, seen[0].split(1), strict=True))
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(own, wrong, strict=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_names_every_linear_once(family, base_models):
    from duquant.models.moe import unfuse_experts
    from duquant.plan import HeadShape, producer_rows

    m = copy.deepcopy(base_models[family])
    adapter = adapter_for(m)
    assert type(m).__name__ in adapter.architectures
    unfuse_experts(m, adapter)
    heads = HeadShape.of(m.config)
    for block in adapter.blocks(m):
        groups = adapter.block_groups(block)
        names = [n for g in groups for n in g.linears]
        linears = {n for n, mod in block.named_modules() if isinstance(mod, nn.Linear)}
        assert sorted(names) == sorted(linears)
        for g in groups:
            width = block.get_submodule(g.linears[0]).in_features
            assert {block.get_submodule(n).in_features for n in g.linears} == {width}
            if g.norm:
                assert block.get_submodule(g.norm).weight.shape == (width,)
            if g.producer:  # the producer's rows that make this input are exactly as wide
                prod = block.get_submodule(g.producer)
                rows = producer_rows(g, prod.out_features, heads)
                n_rows = len(range(prod.out_features)[rows])
                assert n_rows * (heads.n_heads // heads.n_kv_heads if g.heads else 1) == width


def test_unfused_experts_compute_what_the_fused_ones_do(base_models):
    from duquant.models.moe import ExpertLinears, unfuse_experts

    m = copy.deepcopy(base_models["qwen3_moe"])
    ids = _ids()
    with torch.no_grad():
        ref = m(ids).logits
    assert unfuse_experts(m, adapter_for(m)) == 1  # block 1 is dense
    assert isinstance(m.model.layers[0].mlp.experts, ExpertLinears)
    with torch.no_grad():
        out = m(ids).logits
    assert torch.allclose(out, ref, atol=1e-5 * ref.abs().max())


def test_moe_gptq_solves_each_expert_on_its_own_routed_tokens(base_models, monkeypatch):
    import duquant.stages.gptq as gptq_stage
    from duquant.gptq import gptq_quantize as real
    from duquant.gptq import hessian_from_inputs

    m = copy.deepcopy(base_models["qwen3_moe"])
    ids = _ids()
    seen = []
    monkeypatch.setattr(
        gptq_stage, "gptq_quantize", lambda w, h, *a, **k: seen.append(h) or real(w, h, *a, **k)
    )
    rep = quantize_model(
        m, adapter_for(m), get_method("duquant++", max_steps=4), QuantConfig(weights="gptq"), ids
    )
    with torch.no_grad():
        assert torch.isfinite(m(ids).logits).all()
    experts = [f"mlp.experts.experts.{e}.gate_up_proj" for e in range(4)]
    solved = [e["solved_with"] for e in rep.layer_errors if e["linear"] in experts]
    assert solved == [[n] for n in experts]  # one solve per expert, after q|k|v's and o's
    # independently: what each expert's quantized linear receives in the final model
    got: dict[int, list] = {e: [] for e in range(4)}
    block = m.model.layers[0]
    handles = [
        block.get_submodule(n).register_forward_pre_hook(
            lambda mod, args, e=e: got[e].append(mod.input_quantizer(args[0]))
        )
        for e, n in enumerate(experts)
    ]
    with torch.no_grad():
        for w in ids:
            m(w.unsqueeze(0))
    for h in handles:
        h.remove()
    for e in range(4):
        ref = hessian_from_inputs(torch.cat(got[e]))
        assert torch.allclose(seen[2 + e], ref, rtol=1e-4, atol=1e-6 * ref.abs().max())
    assert len({int(seen[2 + e].trace()) for e in range(4)}) > 1  # the experts' inputs differ


def test_moe_fp_hessians_are_refused_clearly(base_models):
    from duquant.stages import GPTQ

    m = copy.deepcopy(base_models["olmoe"])
    quant = QuantConfig(weights="gptq", gptq=GPTQ(hessian="fp"))
    with pytest.raises(ValueError, match=r"--gptq-hessian fp is not supported for the olmoe"):
        quantize_model(m, adapter_for(m), get_method("rtn"), quant, _ids())


def _gemma3_gguf():
    """The real Gemma 3 270M GGUF (scripts/fetch_gemma3.sh), or skip."""
    import os
    from pathlib import Path

    from duquant.models.loading import user_cache_dir

    path = Path(
        os.environ.get("DUQUANT_GEMMA3") or user_cache_dir() / "models" / "gemma-3-270m-q4_k_m.gguf"
    )
    if not path.is_file():
        pytest.skip("Gemma 3 270M GGUF not found (run scripts/fetch_gemma3.sh)")
    return path


@pytest.mark.slow
def test_real_gemma3_checkpoint():
    """Gemma 3 270M from its GGUF: adapter, per-layer attention kinds, FP invariance, quantized run."""
    from duquant.calibrate import capture_block_inputs
    from duquant.models import load_model

    loaded = load_model(str(_gemma3_gguf()))
    m = loaded.model
    adapter = adapter_for(m)
    assert adapter.name == "gemma3" and len(adapter.blocks(m)) == 18
    ids = loaded.tokenizer(
        "The quick brown fox jumps over the lazy dog. " * 12, return_tensors="pt"
    ).input_ids[:, :96]
    ids = torch.cat([ids, ids.flip(1)])
    kinds = m.config.layer_types
    kw = capture_block_inputs(m, adapter, ids).layer_kwargs
    full, sliding = kinds.index("full_attention"), kinds.index("sliding_attention")
    assert not torch.equal(
        kw[full]["position_embeddings"][0], kw[sliding]["position_embeddings"][0]
    )
    with torch.no_grad():
        ref = m(ids).logits
    fp = copy.deepcopy(m)
    quantize_model(fp, adapter, get_method("duquant++", max_steps=8), QuantConfig(None, None), ids)
    with torch.no_grad():
        out = fp(ids).logits
    assert torch.allclose(out, ref, atol=1e-3 * ref.abs().max()), float((out - ref).abs().max())
    del fp
    quantize_model(m, adapter, get_method("duquant++", max_steps=8), QuantConfig(), ids)
    with torch.no_grad():
        assert torch.isfinite(m(ids).logits).all()
    with pytest.raises(ValueError, match="post-norms"):
        quantize_model(m, adapter, get_method("quarot"), QuantConfig(), ids)


def test_moe_gptq_expert_without_tokens_keeps_rtn_weights(base_models):
    m = copy.deepcopy(base_models["qwen3_moe"])
    one_token = _ids()[:1, :1]  # routes to 2 of the 4 experts
    rep = quantize_model(
        m, adapter_for(m), get_method("rtn"), QuantConfig(weights="gptq"), one_token
    )
    rtn = sorted(e["linear"] for e in rep.layer_errors if e["fallback"] == "rtn")
    assert len(rtn) == 4  # gate|up and down of the two unrouted experts
    unrouted = sorted({n.split(".")[3] for n in rtn})
    assert len(unrouted) == 2
    assert rtn == sorted(
        f"mlp.experts.experts.{e}.{p}" for e in unrouted for p in ("down_proj", "gate_up_proj")
    )
    with torch.no_grad():
        assert torch.isfinite(m(_ids()).logits).all()
