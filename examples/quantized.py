"""Steer a quantized model: the embedded default model in 8-bit and 4-bit (bitsandbytes runs both on the CPU).

The vector is made on the quantized model itself and steers it through the same API as a float32 model.
Needs bitsandbytes:  pip install "fv_plugin[quant]"
Run:  python examples/quantized.py            (FV_QUANT=8bit|4bit|nf4|fp4 to pick one; default: 8bit and 4bit)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from antonym_vector import QUERIES, antonym_vector, zero_shot

import fv_plugin


def show(quantization: str) -> None:
    model, tokenizer = fv_plugin.load_model(
        os.environ.get("FV_MODEL", "smollm2-135m-instruct"), quantization=quantization, compute_dtype=torch.bfloat16
    )
    footprint = model.get_memory_footprint() / 2**20
    fv = antonym_vector(model, tokenizer)
    enc = tokenizer([zero_shot(q) for q in QUERIES], return_tensors="pt", padding=True, padding_side="left")
    options = dict(max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        plain = model.generate(**enc, **options)
        with fv_plugin.steer(model, fv, positions="last_prompt"):
            steered = model.generate(**enc, **options)
    width = enc["input_ids"].shape[1]
    print(f"\n{quantization}: weights {footprint:.0f} MiB; {fv}")
    print(f"{'query':<8} | {'unsteered':<18} | steered")
    for query, a, b in zip(QUERIES, plain, steered, strict=True):
        before = tokenizer.decode(a[width:], skip_special_tokens=True).strip().replace("\n", " ")
        after = tokenizer.decode(b[width:], skip_special_tokens=True).strip().replace("\n", " ")
        print(f"{query:<8} | {before:<18} | {after}")


def main() -> None:
    chosen = os.environ.get("FV_QUANT")
    for quantization in [chosen] if chosen else ["8bit", "4bit"]:
        show(quantization)


if __name__ == "__main__":
    main()
