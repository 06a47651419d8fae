"""Quick accuracy sweep: several method settings on one loaded model, the same calibration and windows.

Each SPEC is `method:key=value,...`. Keys are
* the run-level recipe overrides (duquant.config.METHOD_OVERRIDES: alpha, block_size, max_steps,
  learn_epochs, learn_lr, learn_batch, norm_epochs, norm_lr; and fold, learn_target), each applied
  to the stage that owns it as `duquant run --alpha ...` does (norm_epochs > 0 adds norm tweaking);
* `stage.option` (e.g. greedy-rotation.max_steps=16, smooth.alpha=0.5, flatquant.clip_init=3):
  that option of the recipe's stage of that kind (duquant.stages.STAGES), typed like its current
  value; `gptq.option` also sets the run's GPTQ options, from which the pipeline takes every option
  the recipe's GPTQ stage does not fix (so it applies with weights=gptq and no GPTQ stage too);
* `seed`, `weights` (default gptq), `gss` (--gptq-scale-search), `gt` (--gptq-target), `gtd`
  (--gptq-target-damp), `only` (w: weights only, a: activations only), `apos` (activations
  quantized only at these input groups of the adapter, `+`-separated, e.g. qkv+down; turned off
  after quantization, so use it with only=a: GPTQ saw every position quantized), `ns` / `cl`
  (calibration windows / length, default 16 x 1024) and `nw` (evaluation windows of 1024 tokens,
  default 8): the protocol of llm-compressor's comparison in docs/results.md §11.

An unknown key, stage or option, or a bad value, exits with one line.

    OMP_NUM_THREADS=1 python benchmarks/method_sweep.py results/sweep.json \
        "duquant++learn:learn_epochs=2" "duquant++mx:" "duquant++mx:gss=hessian" \
        "duquant++mx:greedy-rotation.start_candidates=4,smooth.alpha=0.5"

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

from duquant.api import check, quantize_loaded
from duquant.config import METHOD_OVERRIDES, ConfigError, RunConfig
from duquant.data import calibration_windows
from duquant.eval.perplexity import perplexity
from duquant.eval.registry import Session, evaluation_for
from duquant.methods import Recipe
from duquant.models import adapter_for, load_model
from duquant.pipeline import QuantConfig
from duquant.stages import GPTQ, STAGES, StageError

SEQLEN = 1024


def _override_defaults() -> dict:
    """Each run-level override with a default of its type (from the stage option it sets)."""
    out: dict = {"fold": True}
    for cls in STAGES.values():
        defaults = {f.name: f.default for f in fields(cls)}
        for name, option in cls.OVERRIDES.items():
            out.setdefault(name, defaults[option])
    return out


OVERRIDE_DEFAULTS = _override_defaults()  # METHOD_OVERRIDES, fold and learn_target
assert set(METHOD_OVERRIDES) <= set(OVERRIDE_DEFAULTS)


def typed(key: str, text: str, like: object) -> object:
    """`text` as a value of the type of `like` (bool: 1 / true / True)."""
    try:
        if isinstance(like, bool):
            return text in ("1", "true", "True")
        if isinstance(like, int):
            return int(text)
        if isinstance(like, float):
            return float(text)
    except ValueError:
        raise SystemExit(f"{key}={text}: not a {type(like).__name__}") from None
    return text


def method_overrides(kv: dict[str, str]) -> dict:
    """The run-level overrides in `kv` (popped from it), typed."""
    return {
        k: typed(k, kv.pop(k), OVERRIDE_DEFAULTS[k]) for k in list(kv) if k in OVERRIDE_DEFAULTS
    }


def with_options(recipe: Recipe, quant: QuantConfig, kv: dict[str, str]) -> tuple:
    """(recipe, quant) with every `stage.option=value` of `kv` applied (see the docstring);
    SystemExit (one line) for an unknown key, stage or option, or a bad value."""
    stages = list(recipe.stages)
    for key, text in kv.items():
        kind, dot, option = key.partition(".")
        if not dot:
            known = ", ".join(OVERRIDE_DEFAULTS)
            raise SystemExit(
                f"unknown key {key!r}: not an override ({known}), stage.option or a sweep option"
            )
        cls = STAGES.get(kind)
        if cls is None:
            raise SystemExit(
                f"unknown key {key!r}: no stage {kind!r}; stages are {', '.join(STAGES)}"
            )
        names = [f.name for f in fields(cls)]
        if option not in names:
            raise SystemExit(
                f"unknown key {key!r}: stage {kind} has no option {option!r}; its options are "
                f"{', '.join(names) or 'none'}"
            )
        at = [i for i, s in enumerate(stages) if s.KIND == kind]
        run_gptq = kind == GPTQ.KIND and quant.weights == "gptq"
        if not at and not run_gptq:
            have = ", ".join(s.KIND for s in stages) or "none"
            rtn = " and rtn weights" if kind == GPTQ.KIND else ""
            raise SystemExit(
                f"unknown key {key!r}: method {recipe.name} has no {kind} stage ({have}){rtn}"
            )
        value = typed(key, text, getattr(stages[at[0]] if at else quant.gptq, option))
        try:
            for i in at:
                stages[i] = replace(stages[i], **{option: value})
            if run_gptq:
                quant = replace(quant, gptq=replace(quant.gptq, **{option: value}))
        except (StageError, ValueError) as exc:
            raise SystemExit(f"{key}={text}: {exc}") from None
    return replace(recipe, stages=tuple(stages)), quant


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
    apos = kw.pop("apos", "")
    only = kw.pop("only", "wa")  # w: weights quantized only (A16), a: activations only (W16)
    try:  # the registered recipe and the run's formats and GPTQ options, as `duquant run` has them
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
        plan = check(cfg)
        recipe = plan.recipe.overridden(**method_overrides(kw))
    except (ConfigError, StageError) as exc:
        raise SystemExit(f"{spec}: {exc}") from None
    recipe, quant = with_options(recipe, plan.quant, kw)
    quant = replace(
        quant,
        weight=quant.weight if "w" in only else None,
        act=quant.act if "a" in only else None,
    )
    plan = replace(plan, recipe=recipe, quant=quant)
    torch.manual_seed(seed)
    model = copy.deepcopy(base.model)
    windows, _ = calibration_windows(base.tokenizer, ns, cl, seed)
    start = time.perf_counter()
    report = quantize_loaded(plan, model, windows)
    seconds = time.perf_counter() - start
    if apos:
        keep_activation_quantizers(model, apos.split("+"))
    rows = model.get_input_embeddings().num_embeddings
    wikitext2 = evaluation_for("wikitext2")  # tokenized and checked as `duquant run` does
    session = Session(cfg, base.tokenizer)
    wikitext2.prepare(session, rows)
    res = perplexity(model, wikitext2.token_ids(session), SEQLEN, nw)
    return {
        "spec": spec,
        "ppl": res["ppl"],
        "quantize_s": seconds,
        "learn": [(d["loss_before"], d["loss_after"]) for d in report.learn],
        "norm_kl_per_epoch": report.norm_tuning.get("kl_per_epoch"),
    }


def main() -> None:
    """Run every SPEC in turn, rewriting the JSON after each."""
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        print(f"usage: {sys.argv[0]} OUT.json SPEC [SPEC ...]\n\n{__doc__}")
        return
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
