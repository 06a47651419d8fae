"""Where the quantized model's error comes from: per decoder layer and linear input position,
activations vs weights, and the final logits' KL per layer cut (issue 33).

One quantization (duquant's own path: `api.check`, `api.calibrate`, `api.quantize_loaded`; default
`duquant++mx` with GPTQ on 8 x 512 calibration tokens), then three measurements on the first
--eval-windows x --eval-seqlen tokens of WikiText-2 test:

* local, per linear: while the quantized model runs, every QuantLinear's input x is also pushed
  through the same online transform T with the unquantized transformed weight W_t = W * T^-T (the
  weight GPTQ started from, recorded when the pipeline makes the layer). Relative output errors
  against y_ref = T(x) W_t^T: activations only Q_a(T(x)) W_t^T, weights only T(x) W_q^T, both (the
  layer's real output). Summed over the linears of an input position (q/k/v, o_proj, gate/up,
  down_proj) and the tokens: sqrt(sum |y - y_ref|^2 / sum |y_ref|^2). It is the error the layer adds
  on the inputs it really gets (the quantized chain's), not the error it inherits;
* accumulated: each block's output (residual stream, a basis no duquant++ transform changes) in
  the quantized model against the full-precision model on the same windows, relative L2 error;
* model level: KL(p_FP || p_Q) of the next-token distributions (mean per token) and PPL for the
  quantized model with quantization switched off except where named: activations only, weights
  only, one input position at a time (both / activations / weights), blocks 0..i (a layer cut),
  block i alone. Switching a position off restores its activations (no QDQ) and its unquantized
  transformed weights, which is the full-precision map exactly (the transforms are invertible),
  so only the named part carries error. Methods that tweak norms (`best`) keep their trained norms
  in switched-off blocks: there "off" is not FP, and the JSON says so (`norms_trained`).

    OMP_NUM_THREADS=1 python benchmarks/error_sources.py --out results/error_sources/smollm2.json
    OMP_NUM_THREADS=1 python benchmarks/error_sources.py \\
        --model ~/.cache/duquant/models/gemma-3-270m-q4_k_m.gguf --out results/error_sources/gemma3.json

Writes the JSON (--out) and a markdown summary beside it (.md).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, markdown_table, write_json  # noqa: E402

from duquant import pipeline  # noqa: E402
from duquant.qlinear import InputQuantizer, QuantLinear  # noqa: E402

SIDES = ("act", "weight", "both")


@dataclass
class Linear:
    """One quantized linear: its module, quantized and unquantized (transformed) weights."""

    name: str
    module: QuantLinear
    w_q: Tensor
    w_fp: Tensor


@dataclass
class Unit:
    """One input position of one block: the shared input quantizer and the linears reading it."""

    layer: int
    position: str
    iq: InputQuantizer
    linears: list[Linear]
    spec: object = None
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("ref", *SIDES), 0.0))

    def set(self, act: bool, weight: bool) -> None:
        """Switch this position's activation QDQ and quantized weights on or off."""
        self.iq.spec = self.spec if act else None
        self.iq.reset()
        for lin in self.linears:
            lin.module.weight.data = lin.w_q if weight else lin.w_fp

    def rel(self, side: str) -> float:
        """Relative output error of one side over everything accumulated."""
        return math.sqrt(self.sums[side] / self.sums["ref"]) if self.sums["ref"] > 0 else 0.0


# ----------------------------------------------------------------------------- quantization


@contextmanager
def recording_fp_weights(store: dict[int, Tensor]) -> Iterator[None]:
    """While active, every QuantLinear the pipeline makes leaves its unquantized transformed weight
    in `store` (keyed by id of the module): the reference the weight-side error is measured from."""
    original = pipeline.make_quant_linear

    def wrapped(linear, transform, iq, weight_spec, name, weight=None, clip=None):
        qlin = original(linear, transform, iq, weight_spec, name, weight=weight, clip=clip)
        if weight is None:
            # GPTQ path (weight_spec None): the layer holds W_t until GPTQ rounds it in place
            fp = qlin if weight_spec is None else original(linear, transform, iq, None, name)
            store[id(qlin)] = fp.weight.detach().clone()
        return qlin

    pipeline.make_quant_linear = wrapped
    try:
        yield
    finally:
        pipeline.make_quant_linear = original


def quantize(
    args: argparse.Namespace, loaded, calib_windows: Tensor | None = None
) -> tuple[dict[int, Tensor], dict, float]:
    """Quantize `loaded.model` in place as `duquant run` would (calibration windows drawn as it
    draws them unless given); (FP transformed weights, record, seconds)."""
    from duquant.api import calibrate, check, quantize_loaded
    from duquant.config import RunConfig

    cfg = RunConfig(
        model=args.model,
        method=args.method,
        weights=args.weights,
        nsamples=args.nsamples,
        calib_seqlen=args.calib_seqlen,
        seed=args.seed,
    )
    plan = check(cfg)
    if calib_windows is None:
        windows, calib, _ = calibrate(plan, loaded.tokenizer)
    else:
        windows, calib = calib_windows, {"given": list(calib_windows.shape)}
    store: dict[int, Tensor] = {}
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    with recording_fp_weights(store):
        quantize_loaded(plan, loaded.model, windows)
    return (
        store,
        {"calibration": calib, "stages": plan.recipe.to_dict()},
        time.perf_counter() - start,
    )


def units_of(model: nn.Module, fp_weights: dict[int, Tensor]) -> list[Unit]:
    """Every (block, input position) with its quantizer and linears, in execution order."""
    from duquant.models import adapter_for

    adapter = adapter_for(model)
    units = []
    for i, block in enumerate(adapter.blocks(model)):
        for g in adapter.block_groups(block):
            mods = [(n, block.get_submodule(n)) for n in g.linears]
            mods = [(n, m) for n, m in mods if isinstance(m, QuantLinear) and id(m) in fp_weights]
            if not mods:
                continue
            linears = [Linear(n, m, m.weight.data.clone(), fp_weights[id(m)]) for n, m in mods]
            iq = mods[0][1].input_quantizer
            units.append(Unit(i, g.name, iq, linears, spec=iq.spec))
    return units


# ----------------------------------------------------------------------------- measurements


def local_hook(unit: Unit, lin: Linear) -> Callable:
    """Forward hook adding this linear's squared output errors (act, weight, both) to its unit."""

    def hook(module: QuantLinear, inputs: tuple, out: Tensor) -> None:
        x = inputs[0]
        iq = module.input_quantizer
        t = iq.online.apply_online(x) if iq.online is not None else x
        qa = iq(x)  # the cached QDQ this forward used
        ref = F.linear(t, lin.w_fp.to(x.dtype), module.bias).double()
        s = unit.sums
        s["ref"] += float(ref.pow(2).sum())
        s["act"] += float((F.linear(qa, lin.w_fp.to(x.dtype), module.bias) - ref).pow(2).sum())
        s["weight"] += float((F.linear(t, lin.w_q.to(x.dtype), module.bias) - ref).pow(2).sum())
        s["both"] += float((out.double() - ref).pow(2).sum())

    return hook


def block_outputs(model: nn.Module, window: Tensor) -> list[Tensor]:
    """Every decoder block's output (the residual stream after it) on one window."""
    from duquant.models import adapter_for

    outs: list[Tensor] = []

    def hook(_m, _a, out) -> None:
        outs.append((out[0] if isinstance(out, tuple) else out).detach().float())

    handles = [b.register_forward_hook(hook) for b in adapter_for(model).blocks(model)]
    try:
        model(window.unsqueeze(0), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return outs


@torch.no_grad()
def local_and_accumulated(
    model: nn.Module, fp: nn.Module, units: list[Unit], windows: Tensor
) -> list[float]:
    """Fill every unit's local error sums on the quantized model's own inputs; return each block
    output's relative error against the FP model (all quantization on)."""
    for u in units:
        u.set(True, True)
    handles = [
        lin.module.register_forward_hook(local_hook(u, lin)) for u in units for lin in u.linears
    ]
    err = ref = None
    try:
        for w in windows:
            fp_out, q_out = block_outputs(fp, w), block_outputs(model, w)
            e = torch.tensor(
                [float((q - f).pow(2).sum()) for q, f in zip(q_out, fp_out, strict=True)]
            )
            r = torch.tensor([float(f.pow(2).sum()) for f in fp_out])
            err, ref = (e, r) if err is None else (err + e, ref + r)
    finally:
        for h in handles:
            h.remove()
    return (err / ref).sqrt().tolist()


@torch.no_grad()
def fp_logprobs(fp: nn.Module, windows: Tensor) -> list[Tensor]:
    """The FP model's next-token log-probabilities per window (the reference of every KL)."""
    return [
        F.log_softmax(fp(w.unsqueeze(0), use_cache=False).logits[0].float(), -1) for w in windows
    ]


@torch.no_grad()
def kl_and_ppl(model: nn.Module, windows: Tensor, ref: list[Tensor]) -> dict:
    """Mean per-token KL(p_FP || p_model) and the model's PPL over the windows."""
    kl = nll = 0.0
    n = 0
    for w, lp_fp in zip(windows, ref, strict=True):
        lp = F.log_softmax(model(w.unsqueeze(0), use_cache=False).logits[0].float(), -1)
        kl += float((lp_fp.exp() * (lp_fp - lp)).sum())
        nll += float(-lp[:-1].gather(1, w[1:, None]).sum())
        n += w.numel()
    return {"kl": kl / n, "ppl": math.exp(nll / (n - len(windows)))}


def variants(units: list[Unit], n_layers: int, layer_kl: bool) -> list[tuple[str, Callable]]:
    """(name, which (unit -> (act on, weight on))) of every model-level measurement."""
    out: list[tuple[str, Callable]] = [
        ("W4A4 (everything quantized)", lambda u: (True, True)),
        ("activations only (W16A4)", lambda u: (True, False)),
        ("weights only (W4A16)", lambda u: (False, True)),
    ]
    for p in dict.fromkeys(u.position for u in units):
        out += [
            (f"{p} input: both", lambda u, p=p: (u.position == p,) * 2),
            (f"{p} input: activations", lambda u, p=p: (u.position == p, False)),
            (f"{p} input: weights", lambda u, p=p: (False, u.position == p)),
        ]
    if layer_kl:
        out += [(f"blocks 0..{i}", lambda u, i=i: (u.layer <= i,) * 2) for i in range(n_layers)]
        out += [(f"block {i} only", lambda u, i=i: (u.layer == i,) * 2) for i in range(n_layers)]
    return out


def model_level(
    model: nn.Module, units: list[Unit], windows: Tensor, ref: list[Tensor], layer_kl: bool
) -> dict[str, dict]:
    """KL and PPL of every variant (quantization switched on only where named)."""
    n_layers = 1 + max(u.layer for u in units)
    out = {}
    for name, which in variants(units, n_layers, layer_kl):
        for u in units:
            u.set(*which(u))
        out[name] = kl_and_ppl(model, windows, ref)
        print(f"  {name}: KL {out[name]['kl']:.4f}, PPL {out[name]['ppl']:.3f}", flush=True)
    for u in units:
        u.set(True, True)
    return out


# ----------------------------------------------------------------------------- report


def local_rows(units: list[Unit]) -> list[dict]:
    """Per (layer, position): relative output error of each side and the reference energy."""
    return [
        {
            "layer": u.layer,
            "position": u.position,
            **{s: u.rel(s) for s in SIDES},
            "ref": u.sums["ref"],
        }
        for u in units
    ]


def position_summary(rows: list[dict]) -> list[dict]:
    """Per position: mean over layers of each side's relative error, and the worst layer."""
    out = []
    for p in dict.fromkeys(r["position"] for r in rows):
        mine = [r for r in rows if r["position"] == p]
        worst = max(mine, key=lambda r: r["both"])
        out.append(
            {
                "position": p,
                **{s: sum(r[s] for r in mine) / len(mine) for s in SIDES},
                "worst_layer": worst["layer"],
                "worst_both": worst["both"],
            }
        )
    return out


def markdown(result: dict) -> str:
    """The summary tables: positions, layers, model-level KL, layer cuts."""
    f = "{:.4f}".format
    lines = [
        f"# error sources: {result['model']}, {result['method']} ({result['weights']} weights)\n"
    ]
    lines.append(
        f"FP PPL {result['fp_ppl']:.3f}, quantized PPL {result['model_level']['W4A4 (everything quantized)']['ppl']:.3f}; "
        f"calibration {result['args']['nsamples']} x {result['args']['calib_seqlen']}, "
        f"evaluation {result['args']['eval_windows']} x {result['args']['eval_seqlen']} WikiText-2 test tokens, "
        f"seed {result['args']['seed']}, quantize {result['quantize_seconds']:.0f} s\n"
    )
    lines.append("## Local relative output error per input position (mean over layers)\n")
    pos = result["positions"]
    lines.append(
        markdown_table(
            ["position", "activations only", "weights only", "both", "worst layer (both)"],
            [
                [
                    p["position"],
                    f(p["act"]),
                    f(p["weight"]),
                    f(p["both"]),
                    f"{p['worst_layer']} ({f(p['worst_both'])})",
                ]
                for p in pos
            ],
        )
    )
    lines.append("\n## Local relative output error per layer (both; act / weight)\n")
    names = [p["position"] for p in pos]
    by = {(r["layer"], r["position"]): r for r in result["local"]}
    layers = sorted({r["layer"] for r in result["local"]})
    rows = []
    for i in layers:
        cells = [
            f"{f(by[i, p]['both'])} ({by[i, p]['act']:.3f} / {by[i, p]['weight']:.3f})"
            if (i, p) in by
            else ""
            for p in names
        ]
        rows.append([str(i), *cells, f(result["block_output_error"][i])])
    lines.append(markdown_table(["layer", *names, "block output vs FP (accumulated)"], rows))
    lines.append(
        "\n## Model level: KL(FP || Q) per token and PPL, quantization on only where named\n"
    )
    ml = result["model_level"]
    lines.append(
        markdown_table(
            ["quantized", "KL", "PPL"],
            [
                [k, f(v["kl"]), f"{v['ppl']:.3f}"]
                for k, v in ml.items()
                if not k.startswith("block")
            ],
        )
    )
    cuts = [k for k in ml if k.startswith("blocks 0..")]
    if cuts:
        lines.append("\n## Layer cuts: blocks 0..i quantized, and block i alone\n")
        rows = []
        prev = 0.0
        for i, k in enumerate(cuts):
            one = ml.get(f"block {i} only", {})
            rows.append(
                [str(i), f(ml[k]["kl"]), f(ml[k]["kl"] - prev), f(one.get("kl", float("nan")))]
            )
            prev = ml[k]["kl"]
        lines.append(
            markdown_table(
                ["i", "KL, blocks 0..i", "KL added by block i", "KL, block i alone"], rows
            )
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def eval_windows(tokenizer, n: int, seqlen: int) -> Tensor:
    """The first n x seqlen tokens of WikiText-2 test, tokenized as `duquant run` does, [n, seqlen]."""
    from duquant.data import eval_text

    text, _ = eval_text("wikitext2")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < n * seqlen:
        raise SystemExit(f"error_sources: WikiText-2 test has {ids.numel()} tokens, < {n * seqlen}")
    return ids[: n * seqlen].reshape(n, seqlen)


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--model", default=None, help="GGUF file, Hugging Face folder or id (default: SmolLM2)"
    )
    p.add_argument("--method", default="duquant++mx", help="any registered method")
    p.add_argument("--weights", default="gptq", choices=("rtn", "gptq"))
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=2)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--no-layer-kl", action="store_true", help="skip the per-block KL (2 x layers forwards)"
    )
    p.add_argument("--out", default="results/error_sources/error_sources.json")
    return p


def run(
    args: argparse.Namespace,
    loaded=None,
    windows: Tensor | None = None,
    calib_windows: Tensor | None = None,
) -> dict:
    """Quantize, measure, return the result dict; `loaded` (a LoadedModel), the evaluation windows
    [n, seqlen] and the calibration windows may be given (tests: a tiny model, no data files)."""
    from duquant.api import load_model

    torch.set_num_threads(args.threads)
    loaded = loaded or load_model(args.model)
    fp = copy.deepcopy(loaded.model).eval()
    if windows is None:
        windows = eval_windows(loaded.tokenizer, args.eval_windows, args.eval_seqlen)
    store, info, seconds = quantize(args, loaded, calib_windows)
    model = loaded.model.eval()
    units = units_of(model, store)
    print(f"quantized in {seconds:.0f} s; {len(units)} input positions", flush=True)
    block_err = local_and_accumulated(model, fp, units, windows)
    ref = fp_logprobs(fp, windows)
    fp_nll = sum(
        float(-lp[:-1].gather(1, w[1:, None]).sum()) for w, lp in zip(windows, ref, strict=True)
    )
    rows = local_rows(units)
    result = {
        "model": args.model or "default (SmolLM2-135M-Instruct)",
        "method": args.method,
        "weights": args.weights,
        "args": vars(args),
        "machine": machine(),
        "quantize_seconds": seconds,
        **info,
        "norms_trained": any(s.get("stage") == "norm-tweak" for s in info["stages"]["stages"]),
        "fp_ppl": math.exp(fp_nll / (windows.numel() - len(windows))),
        "local": rows,
        "positions": position_summary(rows),
        "block_output_error": block_err,
        "model_level": model_level(model, units, windows, ref, not args.no_layer_kl),
    }
    return result


def main() -> None:
    """Run and write JSON + markdown."""
    args = parser().parse_args()
    result = run(args)
    out = Path(args.out)
    write_json(result, out)
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
