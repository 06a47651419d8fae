"""End to end: quantize_model on a tiny Llama, perplexity by hand, and the CLI on the real model."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_llama
from torch import nn

from duquant.eval.perplexity import NonFiniteLossError, perplexity
from duquant.formats import QuantSpec
from duquant.methods import get_method
from duquant.models import adapter_for
from duquant.pipeline import QuantConfig, quantize_model
from duquant.qlinear import QuantLinear

OCP = QuantConfig(QuantSpec("mxfp4", "ocp"), QuantSpec("mxfp4", "ocp"))  # the exactness reference

# ---------------------------------------------------------------------------------------------
# a compact independent MXFP4 `ocp` reference (exhaustive nearest-even search, frexp exponents)
# ---------------------------------------------------------------------------------------------

_GRID = np.array(sorted({s * v for v in (0, 0.5, 1, 1.5, 2, 3, 4, 6) for s in (1.0, -1.0)}))
_EVEN = np.isin(np.abs(_GRID), (0, 1, 2, 4))


def ref_ocp_qdq(x: torch.Tensor) -> torch.Tensor:
    """MXFP4 fake quant, scale 2^(floor(log2 amax) - 2) per 32 along the last dim, ties to even."""
    a = x.detach().float().numpy().astype(np.float64)
    g = a.reshape(*a.shape[:-1], -1, 32)
    amax = np.abs(g).max(-1)
    e = np.array([max(-127, math.frexp(v)[1] - 3) if v > 0 else -127 for v in amax.reshape(-1)])
    pow2 = np.ldexp(1.0, e).reshape(amax.shape)[..., None]
    y = np.clip(g / pow2, -6, 6)
    dist = np.abs(y[..., None] - _GRID)
    cand = dist == dist.min(-1, keepdims=True)
    q = _GRID[np.where(cand, _EVEN.astype(float), -1.0).argmax(-1)]
    return torch.from_numpy((q * pow2).astype(np.float32).reshape(a.shape))


LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


# ---------------------------------------------------------------------------------------------
# quantize_model on the tiny Llama
# ---------------------------------------------------------------------------------------------


def test_rtn_replaces_every_linear_with_grid_weights(tiny_llama):
    model = tiny_llama
    adapter = adapter_for(model)
    original = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    embed = model.get_submodule(adapter.embed).weight.detach().clone()
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)

    report = quantize_model(model, adapter, get_method("rtn"), OCP)
    assert report.seconds >= 0 and len(report.plans) == 2
    for i, block in enumerate(adapter.blocks(model)):
        for lname in LINEARS:
            qlin = block.get_submodule(lname)
            assert isinstance(qlin, QuantLinear), f"layer {i} {lname} is {type(qlin).__name__}"
            w0 = original[f"model.layers.{i}.{lname}"]
            assert qlin.weight.shape == w0.shape
            # RTN: the weight is the MXFP4 (ocp, ties-to-even) quantization of the original weight
            assert torch.equal(qlin.weight.detach(), ref_ocp_qdq(w0)), f"layer {i} {lname}"
            assert not torch.equal(qlin.weight.detach(), w0)
        assert not any(isinstance(m, nn.Linear) for m in block.modules())
    # q/k/v share one online input quantizer, as do gate/up
    blk = adapter.blocks(model)[0]
    assert blk.self_attn.q_proj.input_quantizer is blk.self_attn.v_proj.input_quantizer
    assert blk.mlp.gate_proj.input_quantizer is blk.mlp.up_proj.input_quantizer
    assert blk.mlp.down_proj.input_quantizer is not blk.mlp.up_proj.input_quantizer
    # embeddings and the LM head stay in full precision
    assert torch.equal(model.get_submodule(adapter.embed).weight, embed)
    assert isinstance(model.get_submodule(adapter.lm_head), nn.Linear)
    assert torch.equal(model.get_submodule(adapter.lm_head).weight, original["lm_head"])
    after = _logits(model, ids)
    assert torch.isfinite(after).all()
    assert not torch.allclose(after, before)


def test_rtn_quant_linear_quantizes_activations(tiny_llama):
    model = tiny_llama
    adapter = adapter_for(model)
    quantize_model(model, adapter, get_method("rtn"), OCP)
    down = adapter.blocks(model)[1].mlp.down_proj
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(1)) * 3
    expected = F.linear(ref_ocp_qdq(x), down.weight)
    torch.testing.assert_close(down(x), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(down(x), F.linear(x, down.weight), rtol=1e-3, atol=1e-3)


def test_weight_only_and_nvfp4_configs(tiny_llama):
    """QuantConfig(act=None) leaves activations in full precision; NVFP4 weights use 16-element groups."""
    model = tiny_llama
    adapter = adapter_for(model)
    w0 = adapter.blocks(model)[0].mlp.up_proj.weight.detach().clone()
    quantize_model(model, adapter, get_method("rtn"), QuantConfig(QuantSpec("nvfp4", "e4m3"), None))
    up = adapter.blocks(model)[0].mlp.up_proj
    from duquant.formats import nvfp4

    assert torch.equal(up.weight.detach(), nvfp4.quantize_dequantize(w0))
    x = torch.randn(3, 64)
    torch.testing.assert_close(up(x), F.linear(x, up.weight), rtol=1e-6, atol=1e-6)


def test_fp_method_leaves_logits_unchanged(tiny_llama):
    model = tiny_llama
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(2))
    before = _logits(model, ids)
    report = quantize_model(model, adapter_for(model), get_method("fp"), QuantConfig())
    assert report.plans == []
    assert torch.equal(_logits(model, ids), before)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# perplexity
# ---------------------------------------------------------------------------------------------


def test_perplexity_equals_hand_computed(tiny_llama):
    model = tiny_llama
    ids = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(3))
    res = perplexity(model, ids, seqlen=32)
    assert (res["windows"], res["total_windows"], res["seqlen"], res["tokens"]) == (3, 3, 32, 93)
    nll = []
    for i in range(3):  # non-overlapping windows; token t predicts t + 1 inside each window
        w = ids[i * 32 : (i + 1) * 32]
        logp = torch.log_softmax(_logits(model, w[None])[0].double(), -1)
        nll += [-logp[t, w[t + 1]].item() for t in range(31)]
    assert len(nll) == 93
    assert res["nll"] == pytest.approx(sum(nll) / 93, rel=1e-6)
    assert res["ppl"] == pytest.approx(math.exp(sum(nll) / 93), rel=1e-6)
    two = perplexity(model, ids, seqlen=32, max_windows=2)
    assert two["windows"] == 2 and two["tokens"] == 62 and two["total_windows"] == 3
    assert two["ppl"] == pytest.approx(math.exp(sum(nll[:62]) / 62), rel=1e-6)
    assert res["seconds"] >= 0


class _FixedLM(nn.Module):
    """Logits L on token (x + 1) mod V after token x, 0 elsewhere: P(next) = e^L / (e^L + V - 1)."""

    def __init__(self, vocab: int, logit: float, nan: bool = False):
        super().__init__()
        self.vocab, self.logit, self.nan = vocab, logit, nan
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, ids, use_cache=False):
        logits = torch.zeros(*ids.shape, self.vocab)
        logits.scatter_(-1, ((ids + 1) % self.vocab)[..., None], self.logit)
        if self.nan:
            logits[..., 3, :] = float("nan")
        return SimpleNamespace(logits=logits)


def test_perplexity_closed_form():
    v = 50
    ids = torch.arange(0, 130) % v  # every next token is (x + 1) mod V
    # (the loss is summed in float32: agreement to ~1e-7 relative, not to the last bit)
    assert perplexity(_FixedLM(v, 0.0), ids, seqlen=40)["ppl"] == pytest.approx(50.0, rel=1e-5)
    # L = log 3: P = 3 / (3 + 49) = 3 / 52, ppl = 52 / 3
    assert perplexity(_FixedLM(v, math.log(3.0)), ids, seqlen=40)["ppl"] == pytest.approx(
        52 / 3, rel=1e-5
    )


def test_perplexity_errors():
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(_FixedLM(10, 0.0), torch.arange(10), seqlen=16)
    with pytest.raises(NonFiniteLossError, match="window 0"):
        perplexity(_FixedLM(10, 0.0, nan=True), torch.arange(40) % 10, seqlen=16)


class _Counting(nn.Module):
    """Wraps a model: counts forwards and raises KeyboardInterrupt on the `stop_at`-th one."""

    def __init__(self, model: nn.Module, stop_at: int | None = None):
        super().__init__()
        self.model, self.calls, self.stop_at = model, 0, stop_at

    def forward(self, ids, use_cache=False):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.model(ids, use_cache=use_cache)


def test_perplexity_checkpoint_resumes(tmp_path, tiny_llama):
    """Interrupted after 3 of 5 windows, a re-run checks window 3 again, computes 4-5, and equals a clean run."""
    ids = torch.randint(0, 128, (5 * 32 + 7,), generator=torch.Generator().manual_seed(5))
    clean = perplexity(tiny_llama, ids, seqlen=32)
    ck = tmp_path / "ck.json"
    with pytest.raises(KeyboardInterrupt):
        perplexity(_Counting(tiny_llama, stop_at=4), ids, seqlen=32, checkpoint=ck)
    assert len(json.loads(ck.read_text())["window_nll"]) == 3
    again = _Counting(tiny_llama)
    res = perplexity(again, ids, seqlen=32, checkpoint=ck)
    assert again.calls == 1 + 2  # the check of window 3, then windows 4 and 5
    assert res["resumed_windows"] == 3
    assert res["ppl"] == clean["ppl"]  # same windows, same model: bit-identical
    # finished: a third call only re-checks the last window
    third = _Counting(tiny_llama)
    assert perplexity(third, ids, seqlen=32, checkpoint=ck)["ppl"] == pytest.approx(clean["ppl"])
    assert third.calls == 1


def test_perplexity_checkpoint_of_another_model_or_text_is_discarded(tmp_path, tiny_llama):
    """A checkpoint the model cannot reproduce, or one for other tokens, is ignored: a full pass runs."""
    ids = torch.randint(0, 128, (4 * 32,), generator=torch.Generator().manual_seed(6))
    ck = tmp_path / "ck.json"
    perplexity(make_tiny_llama(seed=1), ids, seqlen=32, checkpoint=ck)  # another model's NLLs
    fresh = _Counting(tiny_llama)
    res = perplexity(fresh, ids, seqlen=32, checkpoint=ck)
    assert fresh.calls == 1 + 4 and res["resumed_windows"] == 0
    assert res["ppl"] == pytest.approx(perplexity(tiny_llama, ids, seqlen=32)["ppl"], rel=1e-9)
    other = _Counting(tiny_llama)
    assert perplexity(other, (ids + 1) % 128, seqlen=32, checkpoint=ck)["resumed_windows"] == 0
    assert other.calls == 4  # other tokens: not even a check window
    ck.write_text("{not json")
    assert perplexity(tiny_llama, ids, seqlen=32, checkpoint=ck)["resumed_windows"] == 0


def test_perplexity_checkpoint_serves_other_max_windows(tmp_path, tiny_llama):
    """A 5-window checkpoint answers max_windows=3 with one check; a 3-window one is extended to 5."""
    ids = torch.randint(0, 128, (5 * 32,), generator=torch.Generator().manual_seed(8))
    ck = tmp_path / "ck.json"
    full = perplexity(tiny_llama, ids, seqlen=32, checkpoint=ck)
    short = _Counting(tiny_llama)
    res = perplexity(short, ids, seqlen=32, max_windows=3, checkpoint=ck)
    assert short.calls == 1 and res["windows"] == 3 and res["resumed_windows"] == 3
    assert res["ppl"] == perplexity(tiny_llama, ids, seqlen=32, max_windows=3)["ppl"]
    assert len(json.loads(ck.read_text())["window_nll"]) == 5  # the longer progress is kept

    ck3 = tmp_path / "ck3.json"
    perplexity(tiny_llama, ids, seqlen=32, max_windows=3, checkpoint=ck3)
    longer = _Counting(tiny_llama)
    res = perplexity(longer, ids, seqlen=32, checkpoint=ck3)
    assert longer.calls == 1 + 2 and res["ppl"] == full["ppl"]
    assert res["resumed_seconds"] > 0 and json.loads(ck3.read_text())["seconds"] > 0


@pytest.mark.parametrize(
    "content", ["[1, 2]", '{"fingerprint": "x"}', "null", "{bad", '{"window_nll": null}']
)
def test_perplexity_malformed_checkpoint_is_ignored(tmp_path, tiny_llama, content):
    """Any checkpoint that is not a well-formed record of these tokens means a full pass, not a crash."""
    ids = torch.randint(0, 128, (2 * 32,), generator=torch.Generator().manual_seed(9))
    ck = tmp_path / "ck.json"
    ck.write_text(content)
    counted = _Counting(tiny_llama)
    assert perplexity(counted, ids, seqlen=32, checkpoint=ck)["resumed_windows"] == 0
    assert counted.calls == 2


def test_write_json_is_atomic_and_says_why_it_failed(tmp_path, monkeypatch):
    """A failed write keeps the old file whole, leaves no temp file, and names the path and the cause."""
    import os

    from duquant.jsonio import write_json

    target = tmp_path / "sub" / "r.json"
    write_json({"a": 1}, target)
    assert json.loads(target.read_text()) == {"a": 1}

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match=r"could not write .*r\.json: No space left on device"):
        write_json({"a": 2}, target)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in target.parent.iterdir()] == ["r.json"]


def test_perplexity_unwritable_checkpoint_still_evaluates(tmp_path, tiny_llama, caplog):
    """A checkpoint that cannot be written (full disk, read-only dir) costs a warning, not the result."""
    ids = torch.randint(0, 128, (3 * 32,), generator=torch.Generator().manual_seed(7))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level("WARNING", logger="duquant.eval.perplexity"):
        res = perplexity(tiny_llama, ids, seqlen=32, checkpoint=blocker / "ck.json")
    assert res["windows"] == 3 and "could not save progress" in caplog.text
    assert res["ppl"] == pytest.approx(perplexity(tiny_llama, ids, seqlen=32)["ppl"], rel=1e-9)


# ---------------------------------------------------------------------------------------------
# the CLI on the real model
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def cli_on_smollm(smollm, offline_data, monkeypatch):
    """`duquant.cli.main` with the runner's model loading served from the session's loaded model
    (a fresh deep copy per run, since quantization works in place), and offline data."""
    import duquant.api
    from duquant.models import LoadedModel

    calls = []

    def fake_load(source=None, dtype="float32", device="cpu"):
        calls.append((source, dtype, device))
        return LoadedModel(copy.deepcopy(smollm.model), smollm.tokenizer, smollm.source)

    monkeypatch.setattr(duquant.api, "load_model", fake_load)
    return calls


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.model
def test_cli_run_rtn_vs_fp(cli_on_smollm, tmp_path, capsys):
    from duquant.cli import main

    results = {}
    for method in ("fp", "rtn"):
        out = tmp_path / f"{method}.json"
        argv = [
            "run",
            "--method",
            method,
            "--max-windows",
            "1",
            "--seqlen",
            "512",
            "--output",
            str(out),
        ]
        assert main(argv) == 0, capsys.readouterr().err
        results[method] = json.loads(out.read_text())
    for source, dtype, device in cli_on_smollm:
        assert (source, dtype, device) == (None, "float32", "cpu")
    for method, r in results.items():
        cfg, metrics = r["config"], r["metrics"]
        assert cfg["run"]["method"] == method
        assert cfg["run"]["seqlen"] == 512 and cfg["run"]["max_windows"] == 1
        wt = metrics["wikitext2"]
        assert wt["windows"] == 1 and wt["tokens"] == 511
        assert math.isfinite(wt["ppl"]) and wt["ppl"] > 1
        assert wt["seconds"] > 0
        assert wt["source"]["split"] == "test"
        assert metrics["quantize_seconds"] >= 0
    # the methods' measured default rule (docs/results.md), recorded in every result
    assert results["rtn"]["config"]["weights"]["scale_rule"] == "ct-round"
    assert results["rtn"]["config"]["activations"]["scale_rule"] == "ct-round"
    fp, rtn = (
        results["fp"]["metrics"]["wikitext2"]["ppl"],
        results["rtn"]["metrics"]["wikitext2"]["ppl"],
    )
    assert 5 < fp < 100, fp  # SmolLM2-135M on WikiText-2 at 512 tokens
    assert rtn > 1.3 * fp, (rtn, fp)
    table = capsys.readouterr().out
    assert "rtn" in table and "wikitext2" in table


def test_cli_reports_errors_cleanly(capsys, monkeypatch, tmp_path):
    from duquant.cli import main

    with pytest.raises(SystemExit):
        main(["run", "--method", "no-such-method"])
    monkeypatch.setenv("DUQUANT_MODEL", str(tmp_path / "missing.gguf"))
    assert main(["run", "--method", "fp"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.model
def test_demo_on_a_fresh_machine(smollm, offline_data, tmp_path, capsys, monkeypatch):
    """`duquant demo` as the README runs it: no hub, no data folder (the packaged WikiText-2), the real
    model: FP and RTN perplexity printed and written, RTN worse than FP."""
    from duquant.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--max-windows", "1", "--seqlen", "256"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    runs = json.loads((tmp_path / "results" / "demo.json").read_text())["runs"]
    assert [r["config"]["run"]["method"] for r in runs] == ["fp", "rtn"]
    w2 = [r["metrics"]["wikitext2"] for r in runs]
    assert all(m["source"]["origin"].startswith("package:") for m in w2)
    assert all(m["windows"] == 1 and m["tokens"] == 255 for m in w2)
    assert w2[1]["ppl"] > w2[0]["ppl"] > 1
    for r, m in zip(runs, w2, strict=True):
        assert f"{m['ppl']:>10.3f}" in out and r["config"]["run"]["method"] in out
