"""End-to-end quantization cost: DuQuant++* (duquant++ with GPTQ weights) vs llm-compressor's GPTQ (MXFP4).

Both quantize the default model (SmolLM2-135M, loaded by `duquant.models.load_model`) on the same
calibration token windows: `duquant.data.calibration_windows(tokenizer, --nsamples, --seqlen, --seed)`,
drawn once here and handed to both sides as a saved tensor. The two libraries live in different
environments (llm-compressor pins its own transformers), so each side runs in its own subprocess:

* ours: this script with the project's python (`--python`, default this interpreter), the same calls
  as `duquant run --method duquant++ --weights gptq` (`runner.quant_config`, `pipeline.quantize_model`),
  quantization only, no evaluation (`--ours-methods duquant++,rtn` also times plain GPTQ on the MX
  grid, `rtn --weights gptq`, which has no transform, like llm-compressor's);
* llm-compressor: this script with `--llmc-python` (default /work/.venv-llmc/bin/python, made as
  below), `oneshot(model, dataset, recipe=GPTQModifier(targets="Linear", scheme=--llmc-scheme,
  ignore=["lm_head"]))` on a `datasets.Dataset` (input_ids, attention_mask) of the same windows.

Each subprocess loads the model (not timed), then times the quantization step alone with
`time.perf_counter`. Memory: the process peak (`getrusage(RUSAGE_SELF).ru_maxrss`, model loading
included), the RSS when the step starts, and the step's own peak (VmHWM of /proc/self/status after
resetting it through /proc/self/clear_refs just before the step; without that reset, where it is not
allowed, only the process peak is reported). With `--repeats N` the cases
alternate N times and the table shows medians; ratios (to the first of --ours-methods) are medians of
per-round ratios.

    python3 -m venv /work/.venv-llmc && echo torch==2.13.0 > /tmp/llmc_constraints.txt
    /work/.venv-llmc/bin/pip install torch==2.13.0
    /work/.venv-llmc/bin/pip install -c /tmp/llmc_constraints.txt llmcompressor gguf
    python benchmarks/bench_llmcompressor.py --threads 1 --nsamples 16 --seqlen 512 --out results/bench/llmcompressor.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
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


def _load(model: str | None):
    """The model through duquant's loader (on the llm-compressor side from the source tree)."""
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    from duquant.models import load_model

    start = time.perf_counter()
    loaded = load_model(model)
    return loaded, time.perf_counter() - start


def label(case: str, scheme: str) -> str:
    """Table label of a case: `ours:<method>` or `llmc`."""
    if case == "llmc":
        return f"llm-compressor GPTQ ({scheme})"
    method, _, hessian = case.split(":", 1)[1].partition("/")
    star = {"duquant++": "DuQuant++*: ", "rtn": "plain GPTQ: "}.get(method, "")
    extra = f" --gptq-hessian {hessian}" if hessian else ""
    return f"{star}duquant {method} --weights gptq{extra}"


def worker_ours(args: argparse.Namespace, windows: torch.Tensor) -> dict:
    """What `duquant run --method <method> --weights gptq` does before evaluating (duquant++:
    DuQuant++*; rtn: GPTQ on the MX grid with no transform)."""
    from dataclasses import asdict

    from duquant.config import RunConfig
    from duquant.methods import get_method
    from duquant.models import adapter_for
    from duquant.pipeline import quantize_model
    from duquant.qlinear import QuantLinear
    from duquant.runner import quant_config

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
    method = get_method(cfg.method)
    quant = quant_config(cfg)
    model = loaded.model
    torch.manual_seed(cfg.seed)
    mem = start_quantize()
    start = time.perf_counter()
    report = quantize_model(model, adapter_for(model), method, quant, windows, seed=cfg.seed)
    seconds = time.perf_counter() - start
    mem = end_quantize(mem)
    n_quant = sum(isinstance(m, QuantLinear) for m in model.modules())
    return {
        "load_seconds": load_s,
        "quantize_seconds": seconds,
        "pipeline_reported_seconds": report.seconds,
        **mem,
        "quantized_linears": n_quant,
        "gptq_layers": len(report.layer_errors),
        "config": {
            "method": asdict(method),
            "weights": asdict(quant.weight),
            "activations": asdict(quant.act),
            "gptq": asdict(quant.gptq),
        },
        "versions": _versions("duquant", "torch", "transformers"),
    }


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


def worker_llmc(args: argparse.Namespace, windows: torch.Tensor, tmp: Path) -> dict:
    """llm-compressor: oneshot GPTQ with the MXFP4 preset scheme on the same windows."""
    import copy

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    loaded, load_s = _load(args.model)
    model = loaded.model
    # oneshot re-reads the config from model.config.name_or_path and refuses a GGUF-quantized one.
    # transformers has dequantized the GGUF to a plain float32 model, so hand it the same config
    # without the gguf quantization_config.
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(tmp / "llmc_config")
    model.config._name_or_path = str(tmp / "llmc_config")
    ds = Dataset.from_dict(
        {"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()}
    )
    recipe = GPTQModifier(targets="Linear", scheme=args.llmc_scheme, ignore=["lm_head"])
    torch.manual_seed(args.seed)
    mem = start_quantize()
    start = time.perf_counter()
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
    return {
        "load_seconds": load_s,
        "quantize_seconds": seconds,
        **mem,
        **_llmc_grid_check(model),
        "config": {
            "scheme": args.llmc_scheme,
            "resolved_scheme": scheme.model_dump() if scheme is not None else None,
            "gptq": {
                k: str(getattr(recipe, k))
                for k in ("block_size", "dampening_frac", "actorder", "batched_quantization")
            },
        },
        "versions": _versions(
            "llmcompressor", "compressed-tensors", "torch", "transformers", "datasets"
        ),
    }


def run_worker(args: argparse.Namespace) -> None:
    """Subprocess entry: quantize one case, write its JSON to --result."""
    torch.set_num_threads(args.threads)
    windows = torch.load(args.windows)
    tmp = Path(args.result).parent
    if args.worker.startswith("ours:"):
        args.method = args.worker.split(":", 1)[1]
        out = worker_ours(args, windows)
    else:
        out = worker_llmc(args, windows, tmp)
    out["torch_threads"] = torch.get_num_threads()
    Path(args.result).write_text(json.dumps(out, indent=2, default=str))


def spawn(case: str, python: str, args: argparse.Namespace, tmp: Path, round_: int) -> dict:
    """Run one case in a fresh subprocess; its result dict (the log tail on failure)."""
    stem = case.replace(":", "_").replace("+", "p").replace("/", "_") + str(round_)
    result, log = tmp / f"{stem}.json", tmp / f"{stem}.log"
    cmd = [python, str(Path(__file__).resolve()), "--worker", case, "--windows", str(tmp / "w.pt")]
    cmd += ["--result", str(result), "--threads", str(args.threads), "--seed", str(args.seed)]
    cmd += ["--llmc-scheme", args.llmc_scheme] + (["--model", args.model] if args.model else [])
    n = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "HF_HUB_OFFLINE": "1"}
    env |= {"HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"round {round_ + 1}: {label(case, args.llmc_scheme)} ({python}) ...", flush=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0 or not result.is_file():
        tail = log.read_text(errors="replace")[-4000:]
        raise SystemExit(f"{case} worker failed (exit {rc}); end of its log:\n{tail}")
    out = json.loads(result.read_text())
    out["wall_seconds_subprocess"] = time.perf_counter() - start
    print(
        f"  quantize {out['quantize_seconds']:.1f}s, peak RSS {out['peak_rss_mb']:.0f} MiB",
        flush=True,
    )
    return out


def main() -> None:
    """Draw the windows, run every case --repeats times alternately, print a table, write JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="default: duquant.models.load_model()'s")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="alternating rounds of all cases")
    p.add_argument(
        "--ours-methods",
        default="duquant++",
        help="duquant methods quantized with --weights gptq, comma-separated; the first is the\n"
        "baseline of the ratios (rtn = plain GPTQ on the MX grid, no transform); METHOD/fp\n"
        "uses --gptq-hessian fp",
    )
    p.add_argument("--python", default=sys.executable, help="python of the duquant environment")
    p.add_argument("--llmc-python", default="/work/.venv-llmc/bin/python")
    p.add_argument(
        "--llmc-scheme",
        default="MXFP4",
        help="compressed-tensors preset: MXFP4 (W4A4) or MXFP4A16 (weights only)",
    )
    p.add_argument("--out", default="results/bench/llmcompressor.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--windows", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run_worker(args)
        return
    torch.set_num_threads(args.threads)
    info = machine()
    from dataclasses import asdict

    from transformers import AutoTokenizer

    from duquant.data import calibration_windows
    from duquant.models import default_model

    source = Path(args.model or default_model())
    # the tokenizer exactly as load_model builds it, without loading the weights here
    if source.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    else:
        tok = AutoTokenizer.from_pretrained(str(source))
    windows, calib = calibration_windows(tok, args.nsamples, args.seqlen, args.seed)
    cases = [f"ours:{m.strip()}" for m in args.ours_methods.split(",") if m.strip()] + ["llmc"]
    base = cases[0]
    runs: dict[str, list[dict]] = {case: [] for case in cases}
    with tempfile.TemporaryDirectory(prefix="bench_llmc_") as tmp:
        tmp = Path(tmp)
        torch.save(windows, tmp / "w.pt")
        for r in range(args.repeats):
            for case in cases:
                python = args.llmc_python if case == "llmc" else args.python
                runs[case].append(spawn(case, python, args, tmp, r))
    times = {side: [x["quantize_seconds"] for x in rs] for side, rs in runs.items()}
    rss = {side: [x["peak_rss_mb"] for x in rs] for side, rs in runs.items()}
    step_ok = all(x["quantize_peak_rss_mb"] is not None for rs in runs.values() for x in rs)
    step = {side: [x["quantize_peak_rss_mb"] for x in rs] for side, rs in runs.items()}

    def med(side: str, key: str) -> str:
        return f"{statistics.median(x[key] for x in runs[side]):.0f}"

    rows = []
    for side in cases:
        row = [
            label(side, args.llmc_scheme),
            f"{statistics.median(times[side]):.1f}",
            f"{paired_ratio(times, side, base):.2f}",
        ]
        row += [med(side, "rss_at_quantize_start_mb")]
        if step_ok:
            row += [med(side, "quantize_peak_rss_mb"), f"{paired_ratio(step, side, base):.2f}"]
        row += [med(side, "peak_rss_mb"), f"{paired_ratio(rss, side, base):.2f}"]
        rows.append(row + [str(runs[side][0]["quantized_linears"])])
    header = ["case", "quantize s", "x base time", "RSS at start MiB"]
    if step_ok:
        header += ["peak RSS in quantize MiB", "x base"]
    header += ["process peak RSS MiB", "x base", "quantized linears"]
    print(
        f"\n{args.nsamples} x {args.seqlen} calibration tokens, {args.threads} thread(s), "
        f"{args.repeats} round(s); base: {label(base, args.llmc_scheme)}\n"
    )
    print(markdown_table(header, rows))
    llmc = runs["llmc"][0]
    print(
        f"\nllm-compressor output: {llmc['quantized_linears']} quantized linears, "
        f"{100 * llmc['weights_on_e2m1_grid']:.2f}% of their weights on the E2M1 grid, "
        f"power-of-two scales: {llmc['scales_power_of_two']}"
    )
    write_json(
        {
            "machine": info,
            "args": {
                k: v for k, v in vars(args).items() if k not in ("worker", "windows", "result")
            },
            "calibration": asdict(calib),
            "quantize_seconds": times,
            "peak_rss_mb": rss,
            "quantize_peak_rss_mb": step,
            "base": base,
            "ratio_to_base": {
                case: {
                    "time": paired_ratio(times, case, base),
                    "peak_rss": paired_ratio(rss, case, base),
                    "quantize_peak_rss": paired_ratio(step, case, base) if step_ok else None,
                }
                for case in cases
            },
            "runs": runs,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
