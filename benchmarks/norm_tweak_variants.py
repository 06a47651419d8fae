"""Norm-tweaking variants on one duquant++mx* quantization: epochs, batch, learning rate, tokens, top-k.

One process, one thread: the default model, 16 x 1024 WikiText-2 calibration windows (seed 0), the
full-precision teacher's top-1024 targets computed once (`duquant.learn.teacher`), duquant++mx with
GPTQ, then for each variant the norms reset to the quantized model's and trained again block by
block (`duquant.learn.norms.tune_norms`); perplexity on the first 8 x 1024 tokens of the WikiText-2
test text. A smaller top-k or fewer tokens are cut from the same targets (the rest's mass summed).
Appends one JSON line per measurement to OUT:

    OMP_NUM_THREADS=1 python benchmarks/norm_tweak_variants.py results/bench/nt_variants.jsonl \\
        '[{"epochs": 1}, {"epochs": 2}, {"epochs": 1, "tokens": 512}, {"epochs": 1, "batch": 2, "lr": 0.02}]'
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _append(out: Path, rec: dict) -> None:
    """One JSON line more in `out`."""
    with out.open("a") as f:
        f.write(json.dumps(rec) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("variants", help='JSON list of {"epochs", "batch", "lr", "tokens", "topk"}')
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    variants = json.loads(args.variants)
    torch.set_num_threads(1)

    from duquant.api import check, quantize_loaded
    from duquant.config import RunConfig
    from duquant.data import calibration_windows, eval_text
    from duquant.eval.perplexity import perplexity
    from duquant.learn.norms import tune_norms, tuned_norms
    from duquant.learn.teacher import TopK, teacher_targets
    from duquant.models import adapter_for, load_model
    from duquant.models.streaming import InMemoryBlocks

    loaded = load_model(None)
    model, tok = loaded.model, loaded.tokenizer
    windows, _ = calibration_windows(tok, 16, 1024, args.seed)
    text, _ = eval_text("wikitext2")
    eval_ids = tok(text, return_tensors="pt").input_ids[0][: 8 * 1024].clone()
    adapter = adapter_for(model)
    store = InMemoryBlocks(adapter.blocks(model))
    t0 = time.perf_counter()
    big = teacher_targets(model, adapter, store, windows, 1024)
    _append(args.out, {"teacher_s": time.perf_counter() - t0})

    def cut(tg: TopK, k: int, tokens: int | None) -> TopK:
        """The same target with fewer tokens and a smaller top-k (the dropped mass joins the rest)."""
        n = tokens or tg.logp.shape[0]
        tail = torch.cat([tg.tail[:n, None], tg.logp[:n, k:]], -1).logsumexp(-1).clamp(min=-80)
        return TopK(tg.logp[:n, :k].contiguous(), tg.index[:n, :k].contiguous(), tail)

    cfg = RunConfig(method="duquant++mx", weights="gptq", nsamples=16, calib_seqlen=1024)
    plan = check(cfg)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    quantize_loaded(plan, model, windows)
    _append(args.out, {"mx_quantize_s": time.perf_counter() - t0})
    norms = tuned_norms(model, adapter)
    snap = [m.weight.detach().clone() for m in norms]
    _append(args.out, {"variant": "mx*", "ppl": perplexity(model, eval_ids, 1024)["ppl"]})
    for v in variants:
        with torch.no_grad():
            for m, w in zip(norms, snap, strict=True):
                m.weight.copy_(w)
        targets = [cut(t, v.get("topk", 256), v.get("tokens")) for t in big]
        w = windows if v.get("tokens") is None else windows[:, : v["tokens"]]
        t0 = time.perf_counter()
        with torch.no_grad():  # as the pipeline calls it
            info = tune_norms(
                model, adapter, store, w, targets, epochs=v.get("epochs", 1),
                lr=v.get("lr", 1e-2), batch=v.get("batch", 1), seed=args.seed,
            )  # fmt: skip
        seconds = time.perf_counter() - t0
        ppl = perplexity(model, eval_ids, 1024)["ppl"]
        _append(args.out, {"variant": v, "nt_s": seconds, "ppl": ppl, "kl": info["kl_per_epoch"]})


if __name__ == "__main__":
    main()
