"""Accuracy and quantization cost side by side: duquant's methods vs llm-compressor's MXFP4 W4A4 recipes.

Every case quantizes the same model, --model (a GGUF file, a Hugging Face folder or id: any model
duquant loads; default SmolLM2-135M, as `duquant run`), loaded by `duquant.models.load_model` on
both sides, on the same calibration windows, `duquant.data.calibration_windows(tokenizer, --nsamples, --seqlen, seed)`
(WikiText-2 train, else validation offline), and is evaluated on the same evaluation windows: the
first --eval-windows x --eval-seqlen tokens of WikiText-2 test tokenized as `duquant run` does
(the evaluation registry's `wikitext2`, `duquant.eval.registry`). Both tensors are drawn once here and handed to every case as saved
tensors; both sides compute perplexity with duquant's own `duquant.eval.perplexity.perplexity`
(the llm-compressor side imports it from the source tree, like the loader): a plain forward over
each window, summed next-token NLL over all windows / (windows x (seqlen - 1)), exp.

A second text the methods were not calibrated on (calibration is WikiText-2), --second-text lambada
(the default when its file is found): the LAMBADA (OpenAI) test passages, found as duquant's zero-shot
LAMBADA finds them (`duquant.eval.tasks.utils.local_paths`: $DUQUANT_DATA_DIR, else shared/data beside
the checkout), joined with "\\n\\n" in file order, tokenized with the same call as the WikiText-2 text,
first --second-windows x --eval-seqlen tokens. It is handed to every case like the WikiText-2 windows
and evaluated with the same `perplexity` call (`ppl_second` beside `ppl`). The summary also gives, for
each llm-compressor recipe, our best case's mean PPL / the recipe's on both texts (our best case: the
lowest mean WikiText-2 PPL, kept for the second text; issue 18's target is <= 0.91, i.e. >= 9 % lower
than llm-compressor's best recipe) and the order of the cases by mean PPL on each text.

The two libraries live in different environments (llm-compressor pins its own transformers), so each
case runs in its own subprocess:

* ours (`--ours-methods`, any registered method name; METHOD/fp uses `--gptq-hessian fp`): this
  script with the project's python (`--python`), the calls of `duquant run --method METHOD
  --weights gptq` (`api.check`, `api.quantize_loaded`), then the perplexity. Default:
  `duquant++` (DuQuant++*) and `duquant++mx`;
* llm-compressor (`--llmc-recipes`): this script with `--llmc-python` (default
  /work/.venv-llmc/bin/python, made as below), `oneshot(model, dataset, recipe)` on a
  `datasets.Dataset` (input_ids, attention_mask) of the same windows, then the perplexity of the
  model oneshot leaves (fake-quantized weights, dynamic MXFP4 activation QDQ in every linear's forward):
  - `sq+quip+gptq`: [SmoothQuantModifier(smoothing_strength=0.6), QuIPModifier(rotations=["v"],
    transform_type="random-hadamard", transform_block_size=32), GPTQModifier(targets="Linear",
    scheme="MXFP4", ignore=["lm_head"])], its best MXFP4 W4A4 recipe;
  - `gptq`: the GPTQModifier alone.
  SmoothQuant's (norm -> linears) mappings come from duquant's adapter of the model's family where
  they differ from llm-compressor's defaults (`smoothing_mappings`; recorded per run): on Gemma 3
  its defaults smooth gate/up against post_attention_layernorm, a post-norm there, which changes
  the FP model; duquant's adapter names pre_feedforward_layernorm. For Llama-like models (SmolLM2)
  nothing is passed and the recipe is exactly as before.

Facts about llmcompressor 0.14.0.1 / compressed-tensors 0.19.0 this relies on (checked in their code):
* scheme "MXFP4" (compressed_tensors.quantization.quant_scheme.MXFP4) quantizes weights (static,
  group 32, FP4, uint8 E8M0 scales) AND input activations (dynamic, group 32, FP4): W4A4. The
  quantized forward (compressed_tensors.quantization.lifecycle.forward.set_forward_quantized)
  fake-quantizes the input whenever scheme.input_activations is set and quantization_enabled is
  not False. Each llm-compressor run checks this on the real model: it records every linear's
  quantization status and, on one linear, compares its output with F.linear of our MXFP4
  `ct-round` QDQ of its (rotated) input (`activation_check` in the JSON);
* QuIPModifier's rotations come from compressed_tensors.transform.factory.base.TransformFactory,
  whose __init__ makes `self.generator = torch.Generator()` and seeds it only if given `seed`;
  `apply_transform_config` never passes one, so every run draws the same random Hadamard (the
  generator's fixed default state), whatever torch.manual_seed says. `seeded_transforms` makes
  the factory's default seed the run's seed; the JSON records the sha256 of the rotations
  (`rotation_sha256`): equal for equal seeds, different otherwise (checked). One 32 x 32 matrix is
  shared by all linears (the factory caches weights by size), fused into the weights and applied
  online to the input (float64) before the activation QDQ.

Per seed (--seeds) the calibration windows are redrawn with that seed and every case runs once; the
seed also seeds our methods and llm-compressor's transforms. Reported per case and seed: PPL
(WikiText-2 and the second text), quantize wall time (the quantization step alone,
`time.perf_counter`, model loading not timed),
memory (below); means over seeds; JSON (--out) and a markdown table (same path, .md).
Memory: the process peak (`getrusage(RUSAGE_SELF).ru_maxrss`, model loading included), the RSS when
the step starts, and the step's own peak (VmHWM of /proc/self/status after resetting it through
/proc/self/clear_refs just before the step; where that is not allowed, only the process peak).

    python3 -m venv /work/.venv-llmc && echo torch==2.13.0 > /tmp/llmc_constraints.txt
    /work/.venv-llmc/bin/pip install -c /tmp/llmc_constraints.txt torch==2.13.0
    /work/.venv-llmc/bin/pip install -c /tmp/llmc_constraints.txt torch==2.13.0 llmcompressor gguf
    # the issue-18 protocol (3 seeds, 16 x 1024 calibration, 8 x 1024 WikiText-2 test windows and
    # 8 x 1024 LAMBADA windows); estimated 2.5 h at one thread on an idle 2-core machine before the
    # second text, ~3.5 h shared (docs/benchmarks.md 4b); the LAMBADA windows add one evaluation pass
    OMP_NUM_THREADS=1 python benchmarks/bench_llmcompressor.py --threads 1 --seeds 0,1,2 \\
        --nsamples 16 --seqlen 1024 --eval-windows 8 --eval-seqlen 1024 --fp-check \\
        --second-text lambada --second-windows 8 \\
        --ours-methods duquant++,duquant++mx --llmc-recipes sq+quip+gptq,gptq \\
        --out results/bench/llmcompressor_accuracy.json

To use both cores, run parts in parallel, each with its own --out (same --nsamples, --seqlen,
--eval-windows, --eval-seqlen, --second-text, --second-windows, --model, --llmc-scheme, --threads),
then merge them into the one summary a single run of all their cases and seeds would write (the same
tables, ratios, order, notes, JSON and markdown; the JSON adds `combined_from`: each file's path,
machine and args):

    OMP_NUM_THREADS=1 python benchmarks/bench_llmcompressor.py ... --ours-methods '' \\
        --llmc-recipes sq+quip+gptq,gptq --seeds 0,1,2 --out results/bench/llmc_part.json &
    OMP_NUM_THREADS=1 python benchmarks/bench_llmcompressor.py ... --llmc-recipes '' \\
        --ours-methods duquant++,duquant++mx --seeds 0,1,2 --out results/bench/ours_part.json &
    wait
    python benchmarks/bench_llmcompressor.py --combine results/bench/llmc_part.json \\
        results/bench/ours_part.json --out results/bench/llmcompressor_accuracy.json

--combine orders the cases ours first (in file order; the first is the time base), then
llm-compressor's, and the seeds ascending. It refuses, with one line and exit status 2 before
writing anything: files whose calibration (text, sha256, counts, lengths), evaluation windows or
second text (source, sha256, windows) or model, scheme or threads differ (results on different
windows are never combined); the same (case, seed) in two files; a case without runs for every seed
of the union (its mean would be over other seeds than the rest: rerun its missing seeds and add
that file); --out being one of the inputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import machine, markdown_table, paired_ratio, write_json

SRC = Path(__file__).resolve().parents[1] / "src"
E2M1_ABS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak since the last reset), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def start_quantize() -> dict:
    """RSS figures at the start of the timed step; resets VmHWM so the step's own peak can be read."""
    return {
        "peak_rss_before_quantize_mb": peak_rss_mb(),
        "rss_at_quantize_start_mb": _status_mb("VmRSS"),
        "peak_reset": reset_peak_rss(),
    }


def end_quantize(before: dict) -> dict:
    """Peak RSS of the process (loading included) and of the quantization step (VmHWM).

    The reset also lowers ru_maxrss (Linux computes it from the same high-water mark while the
    process runs), so the process peak is the larger of the peaks before and during the step."""
    return {
        **before,
        "peak_rss_mb": max(before["peak_rss_before_quantize_mb"], peak_rss_mb()),
        "quantize_peak_rss_mb": _status_mb("VmHWM") if before["peak_reset"] else None,
    }


def _versions(*names: str) -> dict:
    """Installed versions of the named distributions (None when absent)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def use_src() -> None:
    """Import duquant from this checkout's source tree (both sides), not from an installed copy."""
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))


def _load(model: str | None):
    """The model through duquant's loader (on the llm-compressor side from the source tree)."""
    use_src()
    from duquant.models import load_model

    start = time.perf_counter()
    loaded = load_model(model)
    return loaded, time.perf_counter() - start


LLMC_RECIPES = ("sq+quip+gptq", "gptq")
SECOND_TEXTS = ("lambada", "none")
SECOND_NAME = {"lambada": "LAMBADA"}  # table name of each second text
TARGET_RATIO = 0.91  # issue 18: our best mean PPL >= 9 % lower than llm-compressor's best recipe's
SMOOTHING_STRENGTH = 0.6  # llm-compressor's best MXFP4 W4A4 recipe (issue 18)
ROTATION_BLOCK = 32  # QuIP's block-diagonal random Hadamard, one MX group wide


def fail(message: str) -> None:
    """Bad input: one line on stderr, exit status 2."""
    print(f"bench_llmcompressor: {message}", file=sys.stderr)
    raise SystemExit(2)


def split_list(text: str) -> list[str]:
    """Comma-separated names in order, blanks and repeats dropped."""
    return list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))


def parse_seeds(text: str) -> list[int]:
    """Comma-separated integer seeds, e.g. '0,1,2'; ValueError names the bad one."""
    seeds = []
    for item in split_list(text):
        try:
            seeds.append(int(item))
        except ValueError:
            raise ValueError(
                f"--seeds {text}: {item!r} is not an integer; give e.g. 0,1,2"
            ) from None
    if not seeds:
        raise ValueError(f"--seeds {text!r}: no seed given; give e.g. 0,1,2")
    return seeds


def first_windows(
    ids: torch.Tensor, n: int, seqlen: int, option: str = "--eval-windows"
) -> torch.Tensor:
    """The first `n` windows of `seqlen` tokens of a 1-D token tensor, flat (what `perplexity` splits)."""
    if n * seqlen > ids.numel():
        raise ValueError(
            f"{n} evaluation windows of {seqlen} tokens need {n * seqlen} tokens, the text has "
            f"{ids.numel()}; lower {option} or --eval-seqlen"
        )
    return ids[: n * seqlen].clone()


def text_windows(
    tok, text: str, n: int, seqlen: int, option: str = "--eval-windows"
) -> torch.Tensor:
    """A whole text tokenized at once (the call of duquant's evaluation registry for wikitext2),
    its first n x seqlen tokens."""
    return first_windows(tok(text, return_tensors="pt").input_ids[0], n, seqlen, option)


def find_lambada() -> Path | None:
    """LAMBADA (OpenAI) test where duquant's zero-shot LAMBADA reads it, or None when absent."""
    use_src()
    from duquant.eval.tasks.utils import local_paths

    try:
        path = local_paths("lambada_openai")[0]
    except FileNotFoundError:  # no data directory at all
        return None
    return path if path.is_file() else None


def passages_text(path: Path) -> str:
    """The `text` of every row of a jsonl file, in file order, joined with blank lines."""
    with open(path, encoding="utf-8") as f:
        return "\n\n".join(json.loads(line)["text"] for line in f if line.strip())


def evaluate(model: torch.nn.Module, ids: torch.Tensor, seqlen: int, desc: str) -> dict:
    """duquant's perplexity over the flat evaluation windows: the same call on both sides."""
    use_src()
    from duquant.eval.perplexity import perplexity

    return perplexity(model, ids, seqlen, desc=desc)


def label(case: str, scheme: str = "MXFP4") -> str:
    """Table label of a case: `ours:<method>[/hessian]` or `llmc:<recipe>`."""
    side, _, name = case.partition(":")
    if side == "llmc":
        if name == "gptq":
            return f"llm-compressor GPTQ ({scheme})"
        return (
            f"llm-compressor SmoothQuant({SMOOTHING_STRENGTH}) + QuIP(B={ROTATION_BLOCK}) "
            f"+ GPTQ ({scheme})"
        )
    method, _, hessian = name.partition("/")
    star = {"duquant++": "DuQuant++*: ", "rtn": "plain GPTQ: "}.get(method, "")
    extra = f" --gptq-hessian {hessian}" if hessian else ""
    return f"{star}duquant {method} --weights gptq{extra}"


def second_text_path(args: argparse.Namespace) -> str | None:
    """The second text's file (None: no second text); resolves --second-text's default (lambada
    when found, else none) and exits with status 2 on a bad choice, a missing file or a bad count."""
    choice = args.second_text
    if choice is not None and choice not in SECOND_TEXTS:
        fail(f"--second-text {choice}: unknown text; choose from {', '.join(SECOND_TEXTS)}")
    if choice == "none":
        return None
    # the count first: a pure argument check, whatever the data directory holds
    if args.second_windows < 1:
        fail(
            f"--second-windows {args.second_windows}: give a positive integer, "
            "or --second-text none for no second text"
        )
    path = find_lambada()
    if path is None and choice is None:
        return None
    if path is None:
        use_src()
        from duquant.data import data_dir

        where = data_dir() or "$DUQUANT_DATA_DIR"
        fail(
            f"--second-text lambada: {where}/lambada_openai/lambada_test.jsonl not found; set "
            "DUQUANT_DATA_DIR to a folder holding it (shared/data/MANIFEST.md) or give --second-text none"
        )
    return str(path)


def model_source(model: str | None) -> str:
    """The model every case loads (--model: a GGUF file, a Hugging Face folder or id; default the
    one `duquant run` loads), checked before anything loads; exits with status 2 when it cannot."""
    use_src()
    from duquant.models import default_model
    from duquant.models.loading import ModelSourceError, check_model_source

    try:
        source = model or default_model()
        check_model_source(source)
    except (ModelSourceError, FileNotFoundError) as exc:
        fail(f"--model: {exc}")
    return source


def load_tokenizer(source: str):
    """The tokenizer exactly as load_model builds it, without loading the weights."""
    from transformers import AutoTokenizer

    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(source)


def cases_of(args: argparse.Namespace) -> list[str]:
    """The cases to run, checked before anything loads: ours first (the first is the base), then
    llm-compressor's; exits with status 2 on an unknown name or a bad number."""
    use_src()
    from duquant.api import check
    from duquant.config import ConfigError, RunConfig
    from duquant.models.loading import refuse_method

    for name in ("nsamples", "seqlen", "eval_seqlen", "threads"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: give a positive integer")
    if args.eval_windows < 0:
        fail(f"--eval-windows {args.eval_windows}: give 0 (no evaluation) or more")
    args.second_path = second_text_path(args)
    try:
        args.seed_list = parse_seeds(args.seeds)
    except ValueError as exc:
        fail(str(exc))
    args.source = model_source(args.model)
    ours = split_list(args.ours_methods)
    for item in ours:
        method, _, hessian = item.partition("/")
        try:
            plan = check(
                RunConfig(method=method, weights="gptq", gptq_hessian=hessian or "quantized")
            )
            refuse_method(args.source, plan.recipe)  # e.g. quarot on Gemma 3, before loading
        except (ConfigError, ValueError) as exc:
            fail(f"--ours-methods {item}: {exc}")
    recipes = split_list(args.llmc_recipes)
    for recipe in recipes:
        if recipe not in LLMC_RECIPES:
            fail(f"--llmc-recipes {recipe}: unknown recipe; choose from {', '.join(LLMC_RECIPES)}")
    if recipes and not Path(args.llmc_python).is_file():
        fail(
            f"--llmc-python {args.llmc_python}: no such interpreter; make the llm-compressor venv "
            "as this script's docstring says, or give --llmc-recipes ''"
        )
    cases = [f"ours:{m}" for m in ours] + [f"llmc:{r}" for r in recipes]
    if not cases:
        fail("no case to run: give --ours-methods and/or --llmc-recipes")
    return cases


def evaluate_texts(
    model: torch.nn.Module, args: argparse.Namespace, texts: dict, desc: str, key: str
) -> dict:
    """`evaluate` on each given text: {key: WikiText-2, key_second: the second text}."""
    out = {}
    for suffix, ids in (("", texts.get("eval")), ("_second", texts.get("second"))):
        if ids is not None:
            out[key + suffix] = evaluate(model, ids, args.eval_seqlen, desc + suffix)
    return out


def worker_ours(args: argparse.Namespace, windows: torch.Tensor, texts: dict) -> dict:
    """What `duquant run --method <method> --weights gptq` does (duquant++: DuQuant++*), timed,
    then duquant's perplexity on the evaluation windows."""
    from dataclasses import asdict

    from duquant.api import check, quantize_loaded
    from duquant.config import RunConfig
    from duquant.qlinear import QuantLinear

    loaded, load_s = _load(args.model)
    method_name, _, hessian = args.method.partition("/")
    cfg = RunConfig(
        model=args.model,
        method=method_name,
        weights="gptq",
        gptq_hessian=hessian or "quantized",
        nsamples=windows.shape[0],
        calib_seqlen=windows.shape[1],
        seed=args.seed,
    )
    plan = check(cfg)
    quant = plan.quant
    model = loaded.model
    out: dict = {"load_seconds": load_s}
    if args.fp_check:
        out |= evaluate_texts(model, args, texts, "fp", "fp_eval")
    torch.manual_seed(cfg.seed)
    mem = start_quantize()
    start = time.perf_counter()
    report = quantize_loaded(plan, model, windows)
    seconds = time.perf_counter() - start
    mem = end_quantize(mem)
    out |= {
        "quantize_seconds": seconds,
        "pipeline_reported_seconds": report.seconds,
        **mem,
        "quantized_linears": sum(isinstance(m, QuantLinear) for m in model.modules()),
        "gptq_layers": len(report.layer_errors),
        "config": {
            "method": plan.recipe.to_dict(),
            "weights": asdict(quant.weight),
            "activations": asdict(quant.act),
            "gptq": asdict(quant.gptq),
        },
        "versions": _versions("duquant", "torch", "transformers"),
    }
    out |= evaluate_texts(model, args, texts, args.method, "eval")
    return out


def _llmc_grid_check(model) -> dict:
    """How many linears llm-compressor quantized, and whether their (fake-quantized) weights lie on
    the MXFP4 grid: power-of-two group scales and weight / scale in the E2M1 values."""
    grid = torch.tensor(E2M1_ABS)
    n, on_grid, total, pow2 = 0, 0, 0, True
    scale_dtypes = set()
    for module in model.modules():
        scale = getattr(module, "weight_scale", None)
        if scale is None or getattr(module, "quantization_scheme", None) is None:
            continue
        n += 1
        w = module.weight.detach().float()
        s = scale.detach().float()
        scale_dtypes.add(str(scale.dtype))
        pow2 &= bool((torch.log2(s) == torch.log2(s).round()).all())
        q = (w.reshape(w.shape[0], s.shape[1], -1) / s.unsqueeze(-1)).abs()
        on_grid += int(torch.isin(q, grid).sum())
        total += q.numel()
    return {
        "quantized_linears": n,
        "weights_on_e2m1_grid": on_grid / max(total, 1),
        "scales_power_of_two": pow2,
        "weight_scale_dtypes": sorted(scale_dtypes),
    }


# llm-compressor's DEFAULT_SMOOTHQUANT_MAPPINGS (0.14.0.1), as (norm, linears) by module name
LLMC_DEFAULT_SMOOTHING = (
    ("input_layernorm", ("q_proj", "k_proj", "v_proj")),
    ("post_attention_layernorm", ("gate_proj", "up_proj")),
)


def smoothing_mappings(model: torch.nn.Module) -> list | None:
    """SmoothQuant's (balance linears, smoothed norm) pairs read from duquant's adapter: each input
    group a norm produces, as llm-compressor's `mappings`; None where they are llm-compressor's
    defaults (Llama, SmolLM2: the recipe stays exactly as before) or the family has experts (its
    own registry entry applies).

    llm-compressor 0.14.0.1 maps Gemma3ForCausalLM to the Llama defaults, which smooth gate/up
    against post_attention_layernorm; in Gemma 3 that norm is a post-norm on the attention output
    and the MLP reads pre_feedforward_layernorm, so the defaults change the FP model (checked on a
    tiny Gemma 3: max logit change 17 of 83 after SmoothQuant alone, 1.5e-5 with these mappings)."""
    use_src()
    from duquant.models import adapter_for

    adapter = adapter_for(model)
    pairs = [(g.norm, g.linears) for g in adapter.groups if g.norm is not None]
    if any("{" in n for _, linears in pairs for n in linears):
        return None
    leaf = tuple((n.split(".")[-1], tuple(x.split(".")[-1] for x in ls)) for n, ls in pairs)
    if leaf == LLMC_DEFAULT_SMOOTHING:
        return None
    return [[[f"re:.*{x}$" for x in linears], f"re:.*{norm}$"] for norm, linears in pairs]


def llmc_recipe(name: str, scheme: str, mappings: list | None = None) -> list:
    """llm-compressor's modifiers of recipe `name` (LLMC_RECIPES), GPTQ on `scheme` last;
    `mappings` (None: llm-compressor's own) go to SmoothQuant."""
    from llmcompressor.modifiers.quantization import GPTQModifier

    gptq = GPTQModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])
    if name == "gptq":
        return [gptq]
    from llmcompressor.modifiers.transform import QuIPModifier, SmoothQuantModifier

    quip = QuIPModifier(
        rotations=["v"], transform_type="random-hadamard", transform_block_size=ROTATION_BLOCK
    )
    extra = {} if mappings is None else {"mappings": mappings}
    return [SmoothQuantModifier(smoothing_strength=SMOOTHING_STRENGTH, **extra), quip, gptq]


@contextmanager
def seeded_transforms(seed: int):
    """Make compressed-tensors' transform factories draw from a generator seeded with `seed`.

    TransformFactory.__init__ makes `torch.Generator()` and seeds it only when given a seed, which
    apply_transform_config (QuIP's path) never passes: unseeded, every run draws the same matrices
    from the generator's fixed default state, and torch.manual_seed does not reach it."""
    from compressed_tensors.transform import TransformFactory

    original = TransformFactory.__init__

    def init(self, name, scheme, seed_=None):
        original(self, name, scheme, seed if seed_ is None else seed_)

    TransformFactory.__init__ = init
    try:
        yield
    finally:
        TransformFactory.__init__ = original


def rotation_digest(model: torch.nn.Module) -> dict:
    """The online transforms llm-compressor left in the model: count, distinct matrices, their
    sha256 (equal for equal seeds) and worst deviation from orthogonality once scaled."""
    from compressed_tensors.transform import TransformBase

    count, mats = 0, {}
    for module in model.modules():
        if isinstance(module, TransformBase):
            count += 1
            mats.setdefault(id(module.weight), module.weight.detach().double().cpu())
    digest, worst = hashlib.sha256(), 0.0
    for w in mats.values():
        digest.update(w.contiguous().numpy().tobytes())
        # the factory stores the +-1 matrix; HadamardTransform divides by sqrt(size) when applying it
        n = w.shape[-1]
        worst = max(worst, float((w @ w.T / n - torch.eye(n, dtype=w.dtype)).abs().max()))
    return {
        "online_transforms": count,
        "distinct_matrices": len(mats),
        "shapes": sorted({str(tuple(w.shape)) for w in mats.values()}),
        "rotation_sha256": digest.hexdigest() if mats else None,
        "orthogonality_max_error": worst if mats else None,
    }


def activation_check(model: torch.nn.Module, window: torch.Tensor) -> dict:
    """Whether llm-compressor's model quantizes linear inputs at eval: every linear's scheme, status
    and enable flag, and one linear's output against F.linear of our MXFP4 QDQ (`ct-round`, the
    compressed-tensors rule) of the input it received after the online rotation, and of the raw one."""
    from duquant.formats.mxfp4 import quantize_dequantize

    linears = [(n, m) for n, m in model.named_modules() if getattr(m, "quantization_scheme", None)]
    name, probe = linears[0]
    seen: dict = {}
    hook = probe.register_forward_hook(
        lambda _m, inp, out: seen.update(x=inp[0].detach(), y=out.detach())
    )
    with torch.no_grad():
        model(window.reshape(1, -1), use_cache=False)
    hook.remove()
    x, y = seen["x"].to(probe.weight.dtype), seen["y"]
    w, b = probe.weight.detach(), probe.bias

    def rel(ref: torch.Tensor) -> float:
        return float((y - ref).norm() / y.norm())

    return {
        "linears": len(linears),
        "with_input_activations": sum(
            m.quantization_scheme.input_activations is not None for _, m in linears
        ),
        "status": dict(Counter(str(m.quantization_status) for _, m in linears)),
        "enabled": sum(getattr(m, "quantization_enabled", True) for _, m in linears),
        "input_activations": linears[0][1].quantization_scheme.input_activations.model_dump()
        if linears[0][1].quantization_scheme.input_activations is not None
        else None,
        "probe": name,
        "probe_rel_diff_to_mxfp4_ct_round_input": rel(
            F.linear(quantize_dequantize(x, "ct-round"), w, b)
        ),
        "probe_rel_diff_to_mxfp4_ocp_input": rel(F.linear(quantize_dequantize(x, "ocp"), w, b)),
        "probe_rel_diff_to_unquantized_input": rel(F.linear(x, w, b)),
    }


def worker_llmc(args: argparse.Namespace, windows: torch.Tensor, texts: dict, tmp: Path) -> dict:
    """llm-compressor: oneshot with recipe `args.recipe` on the same windows, timed, then duquant's
    perplexity of the model oneshot leaves on the evaluation windows."""
    import copy

    from datasets import Dataset
    from llmcompressor import oneshot

    loaded, load_s = _load(args.model)
    model = loaded.model
    out: dict = {"load_seconds": load_s}
    if args.fp_check:
        out |= evaluate_texts(model, args, texts, "fp", "fp_eval")
    # oneshot re-reads the config from model.config.name_or_path and refuses a GGUF-quantized one.
    # transformers has dequantized the GGUF to a plain float32 model, so hand it the same config
    # without the gguf quantization_config.
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(tmp / f"llmc_config_{os.getpid()}")
    model.config._name_or_path = str(tmp / f"llmc_config_{os.getpid()}")
    ds = Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()}
    )
    mappings = smoothing_mappings(model)
    recipe = llmc_recipe(args.recipe, args.llmc_scheme, mappings)
    torch.manual_seed(args.seed)
    mem = start_quantize()
    start = time.perf_counter()
    with seeded_transforms(args.seed):
        oneshot(
            model=model,
            processor=loaded.tokenizer,
            dataset=ds,
            recipe=recipe,
            num_calibration_samples=windows.shape[0],
            max_seq_length=windows.shape[1],
            shuffle_calibration_samples=False,
        )
    seconds = time.perf_counter() - start
    mem = end_quantize(mem)
    scheme = next(
        (m.quantization_scheme for m in model.modules() if hasattr(m, "quantization_scheme")), None
    )
    gptq = recipe[-1]
    out |= {
        "quantize_seconds": seconds,
        **mem,
        **_llmc_grid_check(model),
        "rotations": rotation_digest(model),
        "config": {
            "recipe": args.recipe,
            "modifiers": [repr(m) for m in recipe],
            "scheme": args.llmc_scheme,
            "smoothing_mappings": mappings if args.recipe != "gptq" else None,
            "resolved_scheme": scheme.model_dump() if scheme is not None else None,
            "gptq": {
                k: str(getattr(gptq, k))
                for k in ("block_size", "dampening_frac", "actorder", "batched_quantization")
            },
        },
        "versions": _versions(
            "llmcompressor", "compressed-tensors", "torch", "transformers", "datasets"
        ),
    }
    ids = texts.get("eval")
    if ids is not None:
        out["activation_check"] = activation_check(model, ids[: args.eval_seqlen])
    out |= evaluate_texts(model, args, texts, args.recipe, "eval")
    return out


def run_worker(args: argparse.Namespace) -> None:
    """Subprocess entry: quantize and evaluate one case, write its JSON to --result."""
    torch.set_num_threads(args.threads)
    windows = torch.load(args.windows)
    texts = {
        "eval": torch.load(args.eval_ids) if args.eval_ids else None,
        "second": torch.load(args.second_ids) if args.second_ids else None,
    }
    tmp = Path(args.result).parent
    side, _, name = args.worker.partition(":")
    if side == "ours":
        args.method = name
        out = worker_ours(args, windows, texts)
    else:
        args.recipe = name
        out = worker_llmc(args, windows, texts, tmp)
    out["torch_threads"] = torch.get_num_threads()
    Path(args.result).write_text(json.dumps(out, indent=2, default=str))


def spawn(case: str, python: str, args: argparse.Namespace, tmp: Path, seed: int) -> dict:
    """Run one case for one seed in a fresh subprocess; its result dict (the log tail on failure)."""
    stem = case.replace(":", "_").replace("+", "p").replace("/", "_") + f"_s{seed}"
    result, log = tmp / f"{stem}.json", tmp / f"{stem}.log"
    cmd = [python, str(Path(__file__).resolve()), "--worker", case]
    cmd += ["--windows", str(tmp / f"w{seed}.pt"), "--result", str(result)]
    cmd += ["--threads", str(args.threads), "--seed", str(seed), "--llmc-scheme", args.llmc_scheme]
    cmd += ["--eval-seqlen", str(args.eval_seqlen)]
    cmd += ["--eval-ids", str(tmp / "eval.pt")] if args.eval_windows else []
    cmd += ["--second-ids", str(tmp / "second.pt")] if args.second_path else []
    cmd += ["--fp-check"] if args.fp_check else []
    cmd += ["--model", args.model] if args.model else []
    n = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "HF_HUB_OFFLINE": "1"}
    env |= {"HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"seed {seed}: {label(case, args.llmc_scheme)} ({python}) ...", flush=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0 or not result.is_file():
        tail = log.read_text(errors="replace")[-4000:]
        raise SystemExit(f"{case} worker failed (exit {rc}); end of its log:\n{tail}")
    out = json.loads(result.read_text())
    out["wall_seconds_subprocess"] = time.perf_counter() - start
    ppl = f", PPL {out['eval']['ppl']:.3f}" if "eval" in out else ""
    ppl += f", second text PPL {out['eval_second']['ppl']:.3f}" if "eval_second" in out else ""
    print(
        f"  quantize {out['quantize_seconds']:.1f}s{ppl}, peak RSS {out['peak_rss_mb']:.0f} MiB",
        flush=True,
    )
    return out


def parser() -> argparse.ArgumentParser:
    """The command line (the workers reuse it with hidden options)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="default: duquant.models.load_model()'s")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=1024, help="calibration window length")
    p.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1,2")
    p.add_argument("--eval-windows", type=int, default=8, help="WikiText-2 test windows; 0: none")
    p.add_argument("--eval-seqlen", type=int, default=1024)
    p.add_argument(
        "--second-text",
        default=None,
        help="a second evaluation text, not calibrated on: lambada (LAMBADA OpenAI test passages in\n"
        "file order) or none; default: lambada when its file is found, else none",
    )
    p.add_argument(
        "--second-windows", type=int, default=8, help="second-text windows of --eval-seqlen"
    )
    p.add_argument(
        "--fp-check",
        action="store_true",
        help="also evaluate the unquantized model in every worker (both environments must agree)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--ours-methods",
        default="duquant++,duquant++mx",
        help="duquant methods (any registered name) quantized with --weights gptq, comma-separated;\n"
        "the first is the base of the time ratios; METHOD/fp uses --gptq-hessian fp",
    )
    p.add_argument(
        "--llmc-recipes",
        default=",".join(LLMC_RECIPES),
        help=f"llm-compressor recipes, comma-separated, of: {', '.join(LLMC_RECIPES)}",
    )
    p.add_argument("--python", default=sys.executable, help="python of the duquant environment")
    p.add_argument("--llmc-python", default="/work/.venv-llmc/bin/python")
    p.add_argument(
        "--llmc-scheme",
        default="MXFP4",
        help="compressed-tensors preset: MXFP4 (W4A4) or MXFP4A16 (weights only)",
    )
    p.add_argument("--out", default="results/bench/llmcompressor_accuracy.json")
    p.add_argument(
        "--combine",
        nargs="+",
        metavar="JSON",
        help="run nothing: merge the --out JSONs of several runs (same windows and settings, each\n"
        "(case, seed) once, every case on every seed) into one summary at --out",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--windows", help=argparse.SUPPRESS)
    p.add_argument("--eval-ids", help=argparse.SUPPRESS)
    p.add_argument("--second-ids", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return p


def mean(xs: list[float]) -> float:
    """Arithmetic mean."""
    return statistics.fmean(xs)


def case_ppls(runs: dict, cases: list[str], key: str) -> dict[str, list[float]]:
    """PPL per case and seed on one text (key `eval`: WikiText-2, `eval_second`: the second text);
    a case some run of which lacks that text is left out."""
    return {
        c: [r[key]["ppl"] for r in runs[c]]
        for c in cases
        if runs[c] and all(key in r for r in runs[c])
    }


def best_ours(mean_ppl: dict[str, float]) -> str | None:
    """Our case with the lowest mean WikiText-2 PPL (None without one): chosen on the first text
    and kept for the second, so the second text is not used to pick it."""
    ours = {c: v for c, v in mean_ppl.items() if c.startswith("ours:")}
    return min(ours, key=ours.get) if ours else None


def ratios_to_llmc(means: dict[str, dict[str, float]], best: str) -> dict[str, dict[str, float]]:
    """For each llm-compressor case: mean PPL of our case `best` / its mean PPL, per text
    (`means`: text -> case -> mean PPL over seeds)."""
    recipes = [c for m in means.values() for c in m if c.startswith("llmc:")]
    return {
        c: {text: m[best] / m[c] for text, m in means.items() if best in m and c in m}
        for c in dict.fromkeys(recipes)
    }


def ppl_order(mean_ppl: dict[str, float]) -> list[str]:
    """The cases from lowest to highest mean PPL."""
    return sorted(mean_ppl, key=mean_ppl.get)


def summary_table(
    cases: list[str], runs: dict, seeds: list[int], scheme: str, second: str | None = None
) -> str:
    """Markdown: per case PPL (WikiText-2, then the second text `second` if given) and quantize
    time per seed, their means, time vs the first case."""
    base = cases[0]
    times = {c: [r["quantize_seconds"] for r in runs[c]] for c in cases}
    texts = [("eval", "PPL")] + ([("eval_second", f"{second} PPL")] if second else [])
    texts = [(k, name) for k, name in texts if len(case_ppls(runs, cases, k)) == len(cases)]
    rows = []
    for c in cases:
        row = [label(c, scheme)]
        for key, _ in texts:
            ppl = case_ppls(runs, [c], key)[c]
            row += [", ".join(f"{x:.3f}" for x in ppl), f"{mean(ppl):.3f}"]
        row += [", ".join(f"{x:.0f}" for x in times[c]), f"{mean(times[c]):.1f}"]
        row += [f"{paired_ratio(times, c, base):.2f}"]
        row += [f"{max(r['peak_rss_mb'] for r in runs[c]):.0f}"]
        rows.append(row)
    seed_txt = ",".join(map(str, seeds))
    header = ["case"]
    for _, name in texts:
        header += [f"{name} (seeds {seed_txt})", f"mean {name}"]
    header += [f"quantize s (seeds {seed_txt})", "mean s", "x base time", "peak RSS MiB"]
    return markdown_table(header, rows)


def ratio_table(ratios: dict, best: str, scheme: str, names: dict[str, str]) -> str:
    """Markdown: for each llm-compressor recipe, our best case's mean PPL / its mean PPL per text
    (`names`: text key -> column name) and whether that meets the target (<= TARGET_RATIO)."""
    header = ["llm-compressor recipe"]
    header += [f"{names[t]}: ours / recipe" for t in names]
    header += [f"ours >= {100 * (1 - TARGET_RATIO):.0f} % lower ({', '.join(names.values())})"]
    rows = []
    for case, by_text in ratios.items():
        row = [label(case, scheme)] + [f"{by_text[t]:.3f}" if t in by_text else "" for t in names]
        row += [
            ", ".join("yes" if by_text[t] <= TARGET_RATIO else "no" for t in names if t in by_text)
        ]
        rows.append(row)
    return f"ours = {label(best)} (lowest mean WikiText-2 PPL of our cases)\n\n" + markdown_table(
        header, rows
    )


SETTINGS_ARGS = ("model", "llmc_scheme", "threads")  # run options the combined files must share
HIDDEN_ARGS = ("worker", "windows", "result", "eval_ids", "second_ids", "seed", "combine")


def second_name(choice: str | None, present: bool) -> str | None:
    """Table name of the second text (None without one); --second-text's default is lambada."""
    return SECOND_NAME[choice or "lambada"] if present else None


def write_summary(
    settings: dict, cases: list[str], runs: dict[str, list[dict]], seeds: list[int], out: Path
) -> str:
    """Tables, ratios, order and notes of `runs` (runs[case][i]: seed seeds[i]); prints the markdown,
    writes the JSON at `out` and the markdown beside it (.md) and returns the markdown.

    `settings`: machine, args (a dict), calibration, evaluation, second_text as a run records them,
    the first keys of the JSON; a normal run and --combine both end here."""
    a = settings["args"]
    scheme = a["llmc_scheme"]
    second = second_name(a.get("second_text"), settings["second_text"] is not None)
    table = summary_table(cases, runs, seeds, scheme, second)
    ppl = case_ppls(runs, cases, "eval")
    ppl_second = case_ppls(runs, cases, "eval_second")
    means = {"wikitext2": {c: mean(v) for c, v in ppl.items()}}
    if ppl_second:
        means["second"] = {c: mean(v) for c, v in ppl_second.items()}
    best = best_ours(means["wikitext2"])
    ratios = ratios_to_llmc(means, best) if best else {}
    tables = [table]
    if ratios:
        names = {"wikitext2": "WikiText-2"} | ({"second": second} if "second" in means else {})
        tables.append(ratio_table(ratios, best, scheme, names))
    head = (
        f"{a['nsamples']} x {a['seqlen']} calibration tokens, "
        + (
            f"{a['eval_windows']} x {a['eval_seqlen']} WikiText-2 test tokens, "
            if a["eval_windows"]
            else "no evaluation, "
        )
        + (
            f"{a['second_windows']} x {a['eval_seqlen']} {second} tokens (not calibrated on), "
            if second
            else ""
        )
        + f"seeds {','.join(map(str, seeds))}, {a['threads']} thread(s); "
        + f"time base: {label(cases[0])}"
    )
    notes = []
    for case in cases:
        if case.startswith("llmc:"):
            r = runs[case][0]
            act = r.get("activation_check")
            line = (
                f"{label(case, scheme)}: {r['quantized_linears']} quantized linears, "
                f"{100 * r['weights_on_e2m1_grid']:.2f}% of weights on the E2M1 grid"
            )
            if act:
                line += (
                    f"; {act['with_input_activations']}/{act['linears']} with input activation "
                    f"quantization, status {act['status']}; probe {act['probe']}: output vs our "
                    f"MXFP4 ct-round input QDQ rel. diff {act['probe_rel_diff_to_mxfp4_ct_round_input']:.2e}, "
                    f"vs unquantized input {act['probe_rel_diff_to_unquantized_input']:.2e}"
                )
            rot = [x["rotations"]["rotation_sha256"] for x in runs[case]]
            if any(rot):
                line += f"; rotation sha256 per seed: {', '.join(h[:12] for h in rot)}"
            notes.append(line)
    for key, name in (("fp_eval", "FP PPL"), ("fp_eval_second", f"FP {second} PPL")):
        fp = {c: [r[key]["ppl"] for r in runs[c] if key in r] for c in cases}
        if any(fp.values()):
            notes.append(
                f"{name} in each worker: "
                + "; ".join(f"{c}: {', '.join(f'{x:.4f}' for x in v)}" for c, v in fp.items())
            )
    if len(means) == 2 and means["second"].keys() == means["wikitext2"].keys():
        orders = {t: ppl_order(m) for t, m in means.items()}
        notes.append(
            f"order by mean PPL, WikiText-2: {' < '.join(orders['wikitext2'])}; {second}: "
            f"{' < '.join(orders['second'])} (same order: "
            f"{'yes' if orders['wikitext2'] == orders['second'] else 'no'})"
        )
    md = "\n\n".join([head, *tables, *[f"- {n}" for n in notes]]) + "\n"
    print("\n" + md)
    write_json(
        {
            **settings,
            "cases": cases,
            "labels": {c: label(c, scheme) for c in cases},
            "seeds": seeds,
            "ppl": ppl,
            "mean_ppl": means["wikitext2"],
            "ppl_second": ppl_second,
            "mean_ppl_second": means.get("second", {}),
            "best_ours": best,
            "ratio_to_llmc": ratios,
            "target_ratio": TARGET_RATIO,
            "order": {t: ppl_order(m) for t, m in means.items()},
            "quantize_seconds": {c: [r["quantize_seconds"] for r in runs[c]] for c in cases},
            "mean_quantize_seconds": {
                c: mean([r["quantize_seconds"] for r in runs[c]]) for c in cases
            },
            "runs": runs,
        },
        out,
    )
    out.with_suffix(".md").write_text(md)
    return md


def first_difference(a: object, b: object, where: str = "") -> str | None:
    """Where two JSON values first differ ('key.sub: x vs y'), None when equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in dict.fromkeys([*a, *b]):
            diff = first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
            if diff:
                return diff
        return None
    if a == b:
        return None
    return f"{where}: {a!r} vs {b!r}" if where else f"{a!r} vs {b!r}"


def load_result(path: str) -> dict:
    """One JSON a run of this script wrote (--out); exits with status 2 when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        fail(f"--combine {path}: cannot read it as JSON ({exc})")
    keys = ("args", "calibration", "evaluation", "second_text", "cases", "seeds", "runs")
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        fail(f"--combine {path}: not a bench_llmcompressor result (no {', '.join(missing)})")
    bad = [c for c in data["cases"] if len(data["runs"].get(c, [])) != len(data["seeds"])]
    if bad:
        fail(f"--combine {path}: case {bad[0]} does not have one run per seed {data['seeds']}")
    return data


def combined_settings(paths: list[str], files: list[dict]) -> dict:
    """The settings the files share (calibration per seed, evaluation, second text and their sources
    and sha256s, model, scheme, threads); exits with status 2 naming the first mismatch."""
    first, calib = files[0], {}
    ref = {k: v for k, v in next(iter(first["calibration"].values()), {}).items() if k != "seed"}
    for path, data in zip(paths, files, strict=True):
        checks = [(k, first[k], data[k]) for k in ("evaluation", "second_text")]
        checks += [(f"args.{k}", first["args"].get(k), data["args"].get(k)) for k in SETTINGS_ARGS]
        for seed, info in data["calibration"].items():
            # every seed's windows come from the same text, counts and lengths; only the seed differs
            checks.append((f"calibration[{seed}]", ref | {"seed": int(seed)}, info))
            calib[int(seed)] = info
        for what, want, got in checks:
            diff = first_difference(want, got)
            if diff:
                fail(
                    f"--combine: {paths[0]} and {path} differ in {what} ({diff}); results on "
                    "different settings or windows cannot be combined"
                )
    return {
        "machine": first.get("machine"),
        "args": dict(first["args"]),
        "calibration": dict(sorted(calib.items())),
        "evaluation": first["evaluation"],
        "second_text": first["second_text"],
    }


def combine(paths: list[str], out: Path) -> str:
    """Merge the results of several runs (--out JSONs) into the summary one run of all their cases
    and seeds would write: ours first, then llm-compressor's, seeds sorted; every (case, seed) once
    and every case for every seed (exits with status 2 otherwise)."""
    if any(Path(p).resolve() == out.resolve() for p in paths):
        fail(f"--combine: --out {out} is one of the inputs; give another --out")
    files = [load_result(p) for p in paths]
    settings = combined_settings(paths, files)
    found: dict[str, dict[int, tuple[str, dict]]] = {}
    for path, data in zip(paths, files, strict=True):
        for case in data["cases"]:
            for seed, run in zip(data["seeds"], data["runs"][case], strict=True):
                if seed in found.setdefault(case, {}):
                    fail(
                        f"--combine: case {case} seed {seed} is in both {found[case][seed][0]} "
                        f"and {path}; give each (case, seed) once"
                    )
                found[case][seed] = (path, run)
    seeds = sorted({s for by_seed in found.values() for s in by_seed})
    for case, by_seed in found.items():
        if sorted(by_seed) != seeds:
            fail(
                f"--combine: case {case} has seeds {','.join(map(str, sorted(by_seed)))}, the "
                f"others {','.join(map(str, seeds))}; add its missing runs (a case on only some "
                "seeds is refused: its mean would not compare with the others)"
            )
    cases = sorted(found, key=lambda c: c.startswith("llmc:"))  # stable: file order within a side
    runs = {c: [found[c][s][1] for s in seeds] for c in cases}
    names = {
        side: [c.partition(":")[2] for c in cases if c.startswith(side)]
        for side in ("ours", "llmc")
    }
    settings["args"] |= {
        "seeds": ",".join(map(str, seeds)),
        "seed_list": seeds,
        "ours_methods": ",".join(names["ours"]),
        "llmc_recipes": ",".join(names["llmc"]),
        "out": str(out),
    }
    settings["combined_from"] = [
        {"path": p, "machine": d.get("machine"), "args": d["args"]}
        for p, d in zip(paths, files, strict=True)
    ]
    return write_summary(settings, cases, runs, seeds, out)


def main() -> None:
    """Draw the windows, run every case for every seed, print a table, write JSON and markdown."""
    args = parser().parse_args()
    use_src()
    if args.worker:
        run_worker(args)
        return
    if args.combine:
        combine(args.combine, Path(args.out))
        return
    cases = cases_of(args)
    torch.set_num_threads(args.threads)
    info = machine()
    from dataclasses import asdict

    from duquant.data import calibration_windows, eval_text, file_sha256

    tok = load_tokenizer(args.source)
    eval_ids, eval_src = None, None
    if args.eval_windows:
        # as the evaluation registry's wikitext2: the whole WikiText-2 test text tokenized at once
        text, eval_src = eval_text("wikitext2")
        try:
            eval_ids = text_windows(tok, text, args.eval_windows, args.eval_seqlen)
        except ValueError as exc:
            fail(str(exc))
    second_ids, second_src = None, None
    if args.second_text is None and not args.second_path:
        print(
            "no second text: LAMBADA's lambada_test.jsonl not found in the data directory",
            flush=True,
        )
    if args.second_path:
        # tokenized with the same call as the WikiText-2 text, first N x L tokens
        path = Path(args.second_path)
        text = passages_text(path)
        try:
            second_ids = text_windows(
                tok, text, args.second_windows, args.eval_seqlen, "--second-windows"
            )
        except ValueError as exc:
            fail(str(exc))
        second_src = {
            "dataset": "lambada_openai",
            "split": "test",
            "origin": str(path),
            "sha256": file_sha256(path),
            "joined_with": "\n\n",
            "passage_order": "file",
            "windows": args.second_windows,
            "seqlen": args.eval_seqlen,
        }
    runs: dict[str, list[dict]] = {case: [] for case in cases}
    calib = {}
    with tempfile.TemporaryDirectory(prefix="bench_llmc_") as tmp:
        tmp = Path(tmp)
        if eval_ids is not None:
            torch.save(eval_ids, tmp / "eval.pt")
        if second_ids is not None:
            torch.save(second_ids, tmp / "second.pt")
        for seed in args.seed_list:
            windows, calib[seed] = calibration_windows(tok, args.nsamples, args.seqlen, seed)
            torch.save(windows, tmp / f"w{seed}.pt")
            for case in cases:
                python = args.llmc_python if case.startswith("llmc:") else args.python
                runs[case].append(spawn(case, python, args, tmp, seed))
    settings = {
        "machine": info,
        "args": {k: v for k, v in vars(args).items() if k not in HIDDEN_ARGS},
        "calibration": {seed: asdict(c) for seed, c in calib.items()},
        "evaluation": {
            "source": asdict(eval_src) if eval_src else None,
            "windows": args.eval_windows,
            "seqlen": args.eval_seqlen,
        },
        "second_text": second_src,
    }
    write_summary(settings, cases, runs, args.seed_list, Path(args.out))


if __name__ == "__main__":
    main()
