"""Quick accuracy sweep: several method settings on one loaded model, the same calibration and windows.

Each SPEC is `method:key=value,...`; keys are MethodConfig fields (e.g. learn_epochs, learn_lr,
learn_batch, learn_target) plus `seed`, `weights` (default gptq), `gss` (--gptq-scale-search),
`gt` (--gptq-target), `gtd` (--gptq-target-damp), `only` (w: weights only, a: activations only),
`apos` (activations quantized only at these input groups of the adapter, `+`-separated, e.g. qkv+down;
turned off after quantization, so use it with only=a: GPTQ saw every position quantized),
`ns` / `cl` (calibration windows / length, default 16 x 1024) and `nw` (evaluation windows of 1024
tokens, default 8): the protocol of llm-compressor's comparison in docs/results.md §11.

    OMP_NUM_THREADS=1 python benchmarks/method_sweep.py results/sweep.json \
        "duquant++learn:learn_epochs=2" "duquant++mx:" "duquant++mx:gss=hessian"

Writes one record per SPEC (PPL, quantize seconds, per-block training losses) after each run.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import time
from dataclasses import fields, replace

import torch

from duquant.config import RunConfig
from duquant.data import calibration_windows
from duquant.eval import perplexity
from duquant.methods import MethodConfig, get_method
from duquant.models import adapter_for, load_model
from duquant.pipeline import quantize_model
from duquant.runner import eval_tokens, quant_config

SEQLEN = 1024
FIELD_TYPES = {f.name: f.type for f in fields(MethodConfig)}


def method_overrides(kv: dict[str, str]) -> dict:
    """MethodConfig fields from their text values, typed like the registered defaults."""
    out = {}
    for key, value in kv.items():
        if key not in FIELD_TYPES:
            raise SystemExit(f"unknown key {key!r}: not a MethodConfig field or a sweep option")
        kind = FIELD_TYPES[key]
        if "bool" in str(kind):
            out[key] = value in ("1", "true", "True")
        elif "int" in str(kind):
            out[key] = int(value)
        elif "float" in str(kind):
            out[key] = float(value)
        else:
            out[key] = value
    return out


# sweep keys for RunConfig's GPTQ options; a key not given keeps RunConfig's default
GPTQ_KEYS = {
    "gss": ("gptq_scale_search", str),
    "gt": ("gptq_target", str),
    "gtd": ("gptq_target_damp", float),
}


def gptq_options(kw: dict[str, str]) -> dict:
    """The GPTQ options named in `kw` (popped from it), typed for RunConfig."""
    return {field: kind(kw.pop(key)) for key, (field, kind) in GPTQ_KEYS.items() if key in kw}


def keep_activation_quantizers(model: torch.nn.Module, groups: list[str]) -> None:
    """Turn activation quantization off at every input position whose adapter group is not in
    `groups` (the adapter says which linears read each group's input)."""
    adapter, seen = adapter_for(model), set()
    for block in adapter.blocks(model):
        for group in adapter.block_groups(block):
            seen.add(group.name)
            if group.name not in groups:
                for name in group.linears:
                    block.get_submodule(name).input_quantizer.spec = None
    if not set(groups) <= seen:
        raise SystemExit(
            f"apos: unknown input group(s) {sorted(set(groups) - seen)}; known {sorted(seen)}"
        )


def run_spec(base, spec: str) -> dict:
    """Quantize a copy of the loaded model as `spec` says and evaluate it."""
    name, _, kv = spec.partition(":")
    kw = dict(x.split("=", 1) for x in kv.split(",") if x)
    seed, weights = int(kw.pop("seed", 0)), kw.pop("weights", "gptq")
    ns, cl, nw = int(kw.pop("ns", 16)), int(kw.pop("cl", 1024)), int(kw.pop("nw", 8))
    cfg = RunConfig(
        method=name,
        weights=weights,
        seed=seed,
        nsamples=ns,
        calib_seqlen=cl,
        seqlen=SEQLEN,
        max_windows=nw,
        **gptq_options(kw),
    )
    apos = kw.pop("apos", "")
    only = kw.pop("only", "wa")  # w: weights quantized only (A16), a: activations only (W16)
    quant = quant_config(cfg)
    quant = replace(
        quant,
        weight=quant.weight if "w" in only else None,
        act=quant.act if "a" in only else None,
    )
    method = get_method(name, **method_overrides(kw))
    torch.manual_seed(seed)
    model = copy.deepcopy(base.model)
    windows, _ = calibration_windows(base.tokenizer, ns, cl, seed)
    start = time.perf_counter()
    report = quantize_model(model, adapter_for(model), method, quant, windows, seed=seed)
    seconds = time.perf_counter() - start
    if apos:
        keep_activation_quantizers(model, apos.split("+"))
    rows = model.get_input_embeddings().num_embeddings
    ids, _ = eval_tokens("wikitext2", base.tokenizer, cfg, rows)
    res = perplexity(model, ids, SEQLEN, nw)
    return {
        "spec": spec,
        "ppl": res["ppl"],
        "quantize_s": seconds,
        "learn": [(d["loss_before"], d["loss_after"]) for d in report.learn],
        "norm_kl_per_epoch": report.norm_tuning.get("kl_per_epoch"),
    }


def main() -> None:
    """Run every SPEC in turn, rewriting the JSON after each."""
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    logging.basicConfig(level=logging.WARNING)
    base = load_model(None)
    results = []
    for spec in sys.argv[2:]:
        results.append(run_spec(base, spec))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "learn"}), flush=True)
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
