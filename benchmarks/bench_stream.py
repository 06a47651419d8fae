"""Streaming quantization of a synthetic Llama larger than the RSS budget: peak RSS and wall time.

`make` writes a random Llama (float32, safetensors shards) to a folder; `quantize` quantizes it block
by block in a fresh process (so its peak RSS is its own) and records peak RSS against the float32
size of the checkpoint, wall time, and the mean NLL of two streamed windows (a finite number shows
the quantized blocks read back and run):

python benchmarks/bench_stream.py make --out /tmp/synth3g
python benchmarks/bench_stream.py quantize --model /tmp/synth3g --method duquant++ \
    --work /tmp/synth3g-work --out results/bench/stream_3g.json

`export` writes the quantized blocks of a finished `quantize` (or `duquant run --stream`) work folder as a
sharded compressed-tensors checkpoint (`export.save_streamed`) in a fresh process, and records its peak RSS:

python benchmarks/bench_stream.py export --model /tmp/synth3g --work /tmp/synth3g-work \
    --save /tmp/synth3g-export --out results/bench/stream_export_3g.json
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time
from pathlib import Path

from _common import machine, write_json

# 3.08 GiB (3.30 GB) of float32 parameters: 50 blocks of 15.2 M and two untied 32000 x 1024 matrices
SYNTH = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=50,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def make(out: Path, seed: int) -> None:
    """Build the random Llama and save it as safetensors shards of at most 1 GB."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SYNTH)).float().eval()
    model.save_pretrained(out, max_shard_size="1GB")
    n = sum(p.numel() for p in model.parameters())
    print(f"{n / 1e9:.3f} G parameters, {n * 4 / 2**30:.2f} GiB float32 -> {out}")


def quantize(args) -> dict:
    """Quantize `args.model` streamed; peak RSS, wall time and a streamed NLL."""
    import torch

    torch.set_num_threads(args.threads)
    from duquant.methods import get_method
    from duquant.models.streaming import SafetensorsCheckpoint
    from duquant.pipeline import QuantConfig
    from duquant.stream import quantize_streaming, streamed_nll

    ckpt = SafetensorsCheckpoint(args.model)
    fp32_bytes = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, SYNTH["vocab_size"], (args.nsamples, args.calib_seqlen), generator=gen)
    if Path(args.work).exists():
        shutil.rmtree(args.work)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    method = get_method(args.method)
    model, adapter, store, report = quantize_streaming(
        args.model, method, QuantConfig(), calib, args.work, device=args.device
    )
    seconds = time.perf_counter() - start
    rss_q = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    evals = torch.randint(0, SYNTH["vocab_size"], (2, 256), generator=gen)
    t = time.perf_counter()
    nll = streamed_nll(model, adapter, store, evals)
    eval_seconds = time.perf_counter() - t
    rss_e = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "model": str(args.model),
        "shards": len(set(ckpt.weight_map.values())),
        "checkpoint_fp32_mib": fp32_bytes / 2**20,
        "method": args.method,
        "weights": "gptq" if method.gptq is not None else "rtn",
        "norm_tuning": report.norm_tuning,
        "calibration": f"{args.nsamples}x{args.calib_seqlen}",
        "device": args.device,
        "quantize_seconds": seconds,
        "peak_rss_mib_before": rss0,
        "peak_rss_mib_quantize": rss_q,
        "peak_rss_fraction_of_fp32": rss_q * 2**20 / fp32_bytes,
        "streamed_eval": {"windows": "2x256", "mean_nll": nll, "seconds": eval_seconds},
        "peak_rss_mib_after_eval": rss_e,
        "blocks": len(report.plans),
        "machine": machine(),
    }


def export(args) -> dict:
    """Export the quantized blocks in `args.work` shard by shard; peak RSS and wall time."""
    import torch

    torch.set_num_threads(args.threads)
    from duquant.export import save_streamed
    from duquant.models.streaming import open_streamed

    fp32_bytes = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model, adapter, store = open_streamed(args.model, args.work)
    n = len(adapter.blocks(model))
    if not all(store.block_file(i).is_file() for i in range(n)):
        raise SystemExit(
            f"{args.work} does not hold all {n} quantized blocks: run `quantize` first"
        )
    start = time.perf_counter()
    figures = save_streamed(model, adapter, store, None, args.save, overwrite=True)
    seconds = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    shards = sorted(Path(args.save).glob("*.safetensors"))
    return {
        "model": str(args.model),
        "checkpoint_fp32_mib": fp32_bytes / 2**20,
        "export_dir": str(args.save),
        "export_mib": sum(f.stat().st_size for f in shards) / 2**20,
        "shards": len(shards),
        "largest_shard_mib": max(f.stat().st_size for f in shards) / 2**20,
        "export_seconds": seconds,
        "peak_rss_mib_before": rss0,
        "peak_rss_mib_export": rss,
        "peak_rss_fraction_of_fp32": rss * 2**20 / fp32_bytes,
        "figures": figures,
        "machine": machine(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pm = sub.add_parser("make")
    pm.add_argument("--out", type=Path, required=True)
    pm.add_argument("--seed", type=int, default=0)
    pq = sub.add_parser("quantize")
    pq.add_argument("--model", type=Path, required=True)
    pq.add_argument("--work", type=Path, required=True)
    pq.add_argument("--method", default="duquant++")
    pq.add_argument("--nsamples", type=int, default=8)
    pq.add_argument("--calib-seqlen", type=int, default=256)
    pq.add_argument("--threads", type=int, default=1)
    pq.add_argument("--device", default="cpu")
    pq.add_argument("--out", type=Path, default=Path("results/bench/stream.json"))
    pe = sub.add_parser("export")
    pe.add_argument("--model", type=Path, required=True)
    pe.add_argument("--work", type=Path, required=True)
    pe.add_argument("--save", type=Path, required=True)
    pe.add_argument("--threads", type=int, default=1)
    pe.add_argument("--out", type=Path, default=Path("results/bench/stream_export.json"))
    args = p.parse_args()
    if args.cmd == "make":
        make(args.out, args.seed)
        return
    if args.cmd == "export":
        res = export(args)
        write_json(res, args.out)
        print(
            f"{res['checkpoint_fp32_mib']:.0f} MiB fp32 checkpoint -> {res['shards']} shards, "
            f"{res['export_mib']:.0f} MiB, largest {res['largest_shard_mib']:.0f} MiB: peak RSS "
            f"{res['peak_rss_mib_export']:.0f} MiB, {res['export_seconds']:.0f} s"
        )
        return
    res = quantize(args)
    write_json(res, args.out)
    print(
        f"{res['checkpoint_fp32_mib']:.0f} MiB fp32 checkpoint: peak RSS "
        f"{res['peak_rss_mib_quantize']:.0f} MiB ({100 * res['peak_rss_fraction_of_fp32']:.1f} %), "
        f"{res['quantize_seconds']:.0f} s; streamed NLL {res['streamed_eval']['mean_nll']:.3f}"
    )


if __name__ == "__main__":
    main()
