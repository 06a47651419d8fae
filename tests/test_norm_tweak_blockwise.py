"""Norm tweaking block by block (duquant.learn.norms, duquant.learn.teacher): the gradient equals the
whole model's, a streamed `best` equals the in-memory one, no copy of the model is made, and two ranks
follow one rank's trajectory."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.parametrize as parametrize
from conftest import make_tiny_family, make_tiny_llama, run_gloo_ranks

from duquant.learn.norms import (
    RelativeScale,
    _Slots,
    check_batch,
    collect_slots,
    step_grads,
    tune_norms,
    tuned_norms,
)
from duquant.learn.sequence import causal, share_mask
from duquant.learn.teacher import teacher_targets, top_k, top_k_kl
from duquant.methods import get_method
from duquant.models import adapter_for
from duquant.models.streaming import InMemoryBlocks
from duquant.pipeline import QuantConfig, quantize_model


def _ids(n: int = 4, seqlen: int = 24, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _quantized_mx(seed: int = 4, ids=None, family: str = "llama"):
    """A tiny model of `family` and its duquant++mx (RTN weights) quantization, on `ids`."""
    fp = make_tiny_llama(seed) if family == "llama" else make_tiny_family(family, seed)
    if family == "gemma3":  # Gemma's final soft cap of the logits, on
        fp.config.final_logit_softcapping = 3.0
    model = copy.deepcopy(fp)
    ids = _ids() if ids is None else ids
    quantize_model(model, adapter_for(model), get_method("duquant++mx"), QuantConfig(), ids)
    return fp, model, ids


def _targets(fp, ids, k: int):
    adapter = adapter_for(fp)
    return teacher_targets(fp, adapter, InMemoryBlocks(adapter.blocks(fp)), ids, k)


def test_top_k_kl_is_the_full_kl_when_k_covers_the_vocabulary():
    """k = vocab − 1 (the rest bucket is one token) gives the exact KL; a small k a lower bound."""
    gen = torch.Generator().manual_seed(0)
    t, s = torch.randn(5, 40, generator=gen) * 3, torch.randn(5, 40, generator=gen) * 3
    tl, sl = t.log_softmax(-1), s.log_softmax(-1)
    full = (tl.exp() * (tl - sl)).sum(-1).mean()
    torch.testing.assert_close(top_k_kl(s, top_k(t, 1000)), full)
    assert 0 <= top_k_kl(s, top_k(t, 4)) <= full + 1e-6


@pytest.mark.parametrize(
    "k,family,chunk",
    [
        (8, "llama", 256),
        (1000, "llama", 256),
        (8, "llama", 5),
        (8, "gemma3", 7),
        (8, "qwen3_moe", 256),
    ],
)
def test_blockwise_gradient_equals_the_whole_model_gradient(k, family, chunk, monkeypatch):
    """One step's gradient of every norm's t, block by block (forward keeping inputs, backward
    recomputing each block; the head and loss `chunk` tokens at a time), equals autograd through
    the whole model of the same loss (Gemma's 1 + w norms and final soft cap, routed experts
    included)."""
    import duquant.learn.norms as norms_mod
    import duquant.learn.teacher as teacher_mod

    monkeypatch.setattr(norms_mod, "HEAD_CHUNK", chunk)
    monkeypatch.setattr(teacher_mod, "HEAD_CHUNK", chunk)
    fp, model, ids = _quantized_mx(family=family)
    adapter = adapter_for(model)
    targets = _targets(fp, ids, k)
    model.requires_grad_(False)
    store = InMemoryBlocks(adapter.blocks(model))
    slots = collect_slots(model, adapter, store)
    loss = step_grads(model, adapter, store, ids, targets, _Slots(slots))
    got = [s.t.grad for s in slots]

    norms = tuned_norms(model, adapter)  # the same norms in the same order
    for m in norms:
        scale = RelativeScale(m.weight.data, adapter.norm_offset)
        parametrize.register_parametrization(m, "weight", scale)
    params = [m.parametrizations.weight.original.requires_grad_(True) for m in norms]
    with torch.enable_grad():
        logits = model(ids).logits
        ref = sum(top_k_kl(logits[j], targets[j]) for j in range(len(ids)))
        ref.backward()
    assert abs(loss - ref.item()) < 1e-5 * max(1.0, abs(loss))
    assert len(got) == len(params) == 2 * 2 + 1
    for g, p in zip(got, params, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_token_shares_gradient_equals_the_whole_model_gradient(family):
    """One window's step cut into two token shares run one after the other (later share's
    attention over the earlier one's keys and values, their gradients carried back to it) gives
    the gradient of autograd through the whole model (Gemma 3's sliding window of 8 across the
    12-token shares too)."""
    from duquant.learn import sequence

    fp, model, ids = _quantized_mx(family=family)
    ids = ids[:1]
    adapter = adapter_for(model)
    targets = _targets(fp, ids, 8)
    model.requires_grad_(False)
    store = InMemoryBlocks(adapter.blocks(model))
    slots = collect_slots(model, adapter, store)
    with sequence.parallel(model):
        shares = sequence.shares(ids.shape[1], model.config)
        loss = step_grads(model, adapter, store, ids, targets, _Slots(slots), shares)
    bounds = sequence.cuts(sequence.token_costs(model.config, 24), 2)
    assert [(t.start, t.stop) for t in shares] == [(0, bounds[1]), (bounds[1], 24)]
    assert 12 < bounds[1] < 24  # the earlier share is longer: its tokens read fewer keys
    got = [s.t.grad for s in slots]

    norms = tuned_norms(model, adapter)
    for m in norms:
        parametrize.register_parametrization(
            m, "weight", RelativeScale(m.weight.data, adapter.norm_offset)
        )
    params = [m.parametrizations.weight.original.requires_grad_(True) for m in norms]
    with torch.enable_grad():
        ref = top_k_kl(model(ids).logits[0], targets[0])
        ref.backward()
    assert abs(loss - ref.item()) < 1e-5 * max(1.0, abs(loss))
    for g, p in zip(got, params, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("batch", "family", "seqlen"), [(1, "llama", 16), (2, "llama", 16), (1, "gemma3", 24)]
)
def test_kept_graphs_train_what_recomputing_trains(monkeypatch, batch, family, seqlen):
    """Keeping the forward's block graphs for the backward (in memory, within the budget) trains
    the norm weights bit for bit as recomputing every block does (budget 0), and as keeping only
    the first blocks' graphs does (a budget one block's saved tensors exceed)."""
    import duquant.learn.norms as norms_mod

    kept, run = [], norms_mod._Graphs.run

    def counted(self, i, *args):
        kept.append(i)
        return run(self, i, *args)

    monkeypatch.setattr(norms_mod._Graphs, "run", counted)
    runs, blocks = [], []
    for budget in (0, 1 << 40, 3000):
        monkeypatch.setattr(norms_mod, "KEEP_GRAPHS_BYTES", budget)
        runs.append(_tweak(batch, family, seqlen))
        blocks.append(sorted(set(kept)))
        kept.clear()
    assert blocks == [[], [0, 1], [0]]  # none kept, both blocks, the first only
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other, strict=True))


def test_streamed_best_equals_in_memory_best(tmp_path):
    """`best` streamed from a safetensors checkpoint (one block in memory at a time) gives the
    in-memory run's norm weights and perplexity with the same seed; it is no longer refused."""
    from transformers import AutoModelForCausalLM

    from duquant.stream import quantize_streaming, streamed_nll

    m = make_tiny_llama(seed=2, num_hidden_layers=3)
    m.save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    ckpt, ids = tmp_path / "ckpt", _ids(4, 32, seed=5)
    recipe, quant = get_method("best"), QuantConfig(weights="gptq")

    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    adapter = adapter_for(ref)
    before = [w.weight.detach().clone() for w in tuned_norms(ref, adapter)]
    rep = quantize_model(ref, adapter, recipe, quant, ids, seed=1)
    assert rep.norm_tuning["steps"] > 0
    want = [w.weight.detach() for w in tuned_norms(ref, adapter)]
    assert not any(torch.equal(a, b) for a, b in zip(before, want, strict=True))
    with torch.no_grad():
        logits = ref(ids).logits
    nll_ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    model, adapter, store, rep_s = quantize_streaming(
        ckpt, recipe, quant, ids, tmp_path / "work", seed=1
    )
    assert rep_s.norm_tuning["kl_per_epoch"] == pytest.approx(rep.norm_tuning["kl_per_epoch"])
    got = []
    for i in range(3):  # the trained weights are in the kept blocks, read back from disk
        block = store.load(i)
        got += [block.get_submodule(n).weight.clone() for n in ("input_layernorm",)]
        got += [block.post_attention_layernorm.weight.clone()]
        store.release(i)
    with store.head():
        got.append(model.get_submodule(adapter.final_norm).weight.clone())
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert abs(streamed_nll(model, adapter, store, ids) - nll_ref.item()) < 1e-4


def test_no_copy_of_the_model_is_made(monkeypatch):
    """Norm tweaking keeps no teacher model: nothing deep-copies the model, and what setup keeps
    is the teacher's compact distributions (k per token), not a module."""
    model, ids = make_tiny_llama(6), _ids()
    copied = []
    real = copy.deepcopy

    def spy(obj, memo=None):
        copied.append(type(obj).__name__)
        return real(obj, memo)

    monkeypatch.setattr(copy, "deepcopy", spy)
    stage = get_method("best").stages[-1]
    kept = {}

    setup = type(stage).setup

    def keep_setup(self, ctx):
        setup(self, ctx)
        kept["teacher"] = ctx.teacher

    monkeypatch.setattr(type(stage), "setup", keep_setup)
    rep = quantize_model(
        model, adapter_for(model), get_method("best"), QuantConfig(weights="gptq"), ids
    )
    assert rep.norm_tuning["steps"] > 0
    assert "LlamaForCausalLM" not in copied and "LlamaModel" not in copied
    teacher = kept["teacher"]
    assert isinstance(teacher, list) and len(teacher) == len(ids)
    assert not any(isinstance(t, torch.nn.Module) for t in teacher)
    assert teacher[0].logp.shape == (ids.shape[1], min(stage.topk, 127))


def test_a_batch_larger_than_the_calibration_is_refused():
    """A global batch larger than the calibration is refused in one line before any work."""
    check_batch(4, 4)
    with pytest.raises(ValueError, match="larger than the 4 calibration windows") as err:
        check_batch(5, 4)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ two ranks (gloo, 127.0.0.1)


def _tweak(batch: int, family: str = "llama", seqlen: int = 16) -> list[torch.Tensor]:
    """Norm tweaking of one tiny model towards another (built from seeds in every process: no
    model crosses a process boundary); the trained weights, then whether steps split by tokens."""
    make = make_tiny_llama if family == "llama" else lambda s: make_tiny_family(family, s)
    fp, model, ids = make(8), make(9), _ids(4, seqlen, seed=8)
    targets = _targets(fp, ids, 16)
    adapter = adapter_for(model)
    store = InMemoryBlocks(adapter.blocks(model))
    with torch.no_grad():  # as the pipeline calls it
        info = tune_norms(
            model, adapter, store, ids, targets, epochs=2, lr=2e-2, batch=batch, seed=7
        )
    weights = [m.weight.detach().clone() for m in tuned_norms(model, adapter)]
    return weights + [torch.tensor(info["sequence_parallel"])]


def _rank_main(rank: int, out, batch: int, family: str, seqlen: int) -> None:
    """One rank of the test's process group: tweak, write its weights."""
    torch.save(_tweak(batch, family, seqlen), f"{out}/rank{rank}.pt")


@pytest.mark.parametrize(
    ("batch", "family", "seqlen"),
    [(1, "llama", 16), (2, "llama", 16), (3, "llama", 16), (1, "gemma3", 24), (1, "llama", 15)],
)
def test_two_ranks_give_one_ranks_norm_weights(tmp_path, one_thread, batch, family, seqlen):
    """Two gloo ranks train the same norm weights as one process: a batch of 2 windows one each, 3
    two and one (gradients summed over ranks, divided by the global batch); one window a step is
    split by tokens (attention over the gathered keys and values: Gemma 3's sliding window of 8
    across the shares too), exactly as one process runs the same two shares one after the other,
    shares of unequal length included (cut where they cost alike; 15 tokens)."""
    *one, one_split = _tweak(batch, family, seqlen)
    assert not one_split  # one process never splits
    make = make_tiny_llama if family == "llama" else lambda s: make_tiny_family(family, s)
    start = [m.weight for m in tuned_norms(make(9), adapter_for(make(9)))]
    assert not any(torch.equal(a, b) for a, b in zip(one, start, strict=True))  # trained at all
    run_gloo_ranks(_rank_main, 2, (str(tmp_path), batch, family, seqlen))
    for r in range(2):
        *two, split = torch.load(tmp_path / f"rank{r}.pt")
        assert bool(split) == (batch == 1)
        if split:  # one process runs the same two token shares: bit for bit
            assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
        for a, b in zip(one, two, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_bidirectional_model_is_not_split_by_tokens():
    """Only causal attention splits (the share's mask is causal): Gemma 3 run bidirectionally does not."""
    model = make_tiny_family("gemma3", 1)
    assert causal(model.config)
    model.config.use_bidirectional_attention = True
    assert not causal(model.config)


def test_share_mask_is_the_causal_sliding_mask_rows():
    """A share's mask is rows start..stop of the full causal (sliding-window) mask, cut at stop."""
    n = 12
    for window in (None, 4):
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        full = (j <= i) & ((i - j) < window if window else True)
        for start, stop in [(0, 6), (6, 12), (4, 8)]:
            got = share_mask(start, stop, window, torch.float32, "cpu")[0, 0] == 0
            assert torch.equal(got, full[start:stop, :stop])


def test_teacher_targets_in_chunks_equal_one_pass(monkeypatch):
    """The teacher's head run a few tokens at a time gives the targets of one pass over the window."""
    import duquant.learn.teacher as teacher_mod

    fp, ids = make_tiny_llama(3), _ids()
    whole = _targets(fp, ids, 8)
    monkeypatch.setattr(teacher_mod, "HEAD_CHUNK", 5)
    for a, b in zip(whole, _targets(fp, ids, 8), strict=True):
        torch.testing.assert_close(a.logp, b.logp, rtol=1e-5, atol=1e-6)
        assert torch.equal(a.index, b.index) and a.logp.shape[0] == ids.shape[1] > 5
        torch.testing.assert_close(a.tail, b.tail, rtol=1e-5, atol=1e-6)


def _e2e_run(batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
    """duquant++e2e on a tiny model (block by block, like norm tweaking): every learned plan's
    tensors, the first step's gradients (summed over ranks), whether steps split by tokens."""
    from duquant.learn import norms

    grads, sync = [], norms._sync_step

    def first_grads(ts, loss, b):
        out = sync(ts, loss, b)
        if not grads:
            grads.extend(t.grad.clone() for t in ts)
        return out

    model, ids = make_tiny_llama(9), _ids(4, 16, seed=8)
    method = get_method("duquant++e2e", learn_epochs=2, learn_lr=2e-2, learn_batch=batch)
    norms._sync_step = first_grads
    try:
        rep = quantize_model(model, adapter_for(model), method, QuantConfig(), ids, seed=7)
    finally:
        norms._sync_step = sync
    plans = [t for block in rep.plans for p in block.values() for t in _plan_tensors(p)]
    return plans, grads, rep.learn[-1]["sequence_parallel"]


def test_e2e_token_shares_gradient_equals_the_whole_window_gradient(monkeypatch):
    """duquant++e2e's first step cut into two token shares (the default) gives the gradient of the
    same step over the whole window (more shares than tokens: no cut) to float order."""
    from duquant.learn import sequence

    _, cut, _ = _e2e_run(1)
    monkeypatch.setattr(sequence, "LOCAL_SHARES", 17)  # 16 tokens: not cut
    _, whole, _ = _e2e_run(1)
    assert len(cut) == len(whole) > 0
    for a, b in zip(cut, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    assert not all(torch.equal(a, b) for a, b in zip(cut, whole, strict=True))


def _plan_tensors(plan) -> list[torch.Tensor]:
    """A plan's transform tensors (smoothing scales, rotations) in a fixed order."""
    return list(plan.weight_transform.state_dict().values())


def _e2e_rank_main(rank: int, out, batch: int) -> None:
    """One rank: duquant++e2e, write its plans and first gradients."""
    plans, grads, split = _e2e_run(batch)
    torch.save((plans, grads, split), f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("batch", [1, 2])
def test_two_ranks_train_one_ranks_end_to_end_plans(tmp_path, one_thread, batch):
    """duquant++e2e trains through the same block-by-block steps as norm tweaking: two gloo ranks
    give one process's first gradients and plans bit for bit, two windows a step one each, or one
    window a step cut into two token shares (one a rank; one process runs both); the plans differ
    from the searched start."""
    one, g_one, one_split = _e2e_run(batch)
    assert not one_split
    model, ids = make_tiny_llama(9), _ids(4, 16, seed=8)
    start = quantize_model(
        model, adapter_for(model), get_method("duquant++mx"), QuantConfig(), ids, seed=7
    )
    searched = [t for block in start.plans for p in block.values() for t in _plan_tensors(p)]
    assert len(searched) == len(one) and not all(
        torch.equal(a, b) for a, b in zip(one, searched, strict=True)
    )
    run_gloo_ranks(_e2e_rank_main, 2, (str(tmp_path), batch))
    for r in range(2):
        two, g_two, split = torch.load(tmp_path / f"rank{r}.pt")
        assert split == (batch == 1) and len(g_two) == len(g_one) > 0
        assert all(torch.equal(a, b) for a, b in zip(g_one, g_two, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
