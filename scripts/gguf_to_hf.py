"""Save a GGUF model that transformers loads as a Hugging Face safetensors folder (weights dequantized, float32).

Streaming (`duquant run --stream`) reads safetensors shards; the GGUF loader dequantizes the whole file at
once. Usage: python scripts/gguf_to_hf.py model.gguf out_dir [--max-shard-size 2GB]
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM

from duquant.models import load_model
from duquant.models.gguf_cache import plain_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf")
    p.add_argument("out")
    p.add_argument("--max-shard-size", default="2GB")
    args = p.parse_args()
    loaded = load_model(args.gguf)
    config = plain_config(loaded.model.config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.load_state_dict(loaded.model.state_dict(), strict=True)
    ids = torch.arange(32).unsqueeze(0)
    with torch.no_grad():
        if not torch.equal(model(ids).logits, loaded.model(ids).logits):
            raise SystemExit("the re-built model does not reproduce the GGUF model's logits")
    model.save_pretrained(args.out, max_shard_size=args.max_shard_size)
    loaded.tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
