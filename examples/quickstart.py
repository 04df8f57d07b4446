"""Quickstart: make an antonym vector on the embedded default model and steer zero-shot prompts with it.

Run:  python examples/quickstart.py
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from antonym_vector import QUERIES, antonym_vector, zero_shot

import fv_plugin


def main() -> None:
    model, tokenizer = fv_plugin.load_model(os.environ.get("FV_MODEL", "smollm2-135m-instruct"))
    fv = antonym_vector(model, tokenizer)
    print(f"made {fv}")

    prompts = [zero_shot(q) for q in QUERIES]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        plain = model.generate(**enc, **kwargs)
        with fv_plugin.steer(model, fv, strength=1.0, positions="last_prompt"):
            steered = model.generate(**enc, **kwargs)

    width = enc["input_ids"].shape[1]
    print(f"\n{'query':<8} | {'unsteered':<22} | steered with the antonym vector")
    for query, a, b in zip(QUERIES, plain, steered, strict=True):
        before = tokenizer.decode(a[width:], skip_special_tokens=True).strip().replace("\n", " ")
        after = tokenizer.decode(b[width:], skip_special_tokens=True).strip().replace("\n", " ")
        print(f"{query:<8} | {before:<22} | {after}")

    with tempfile.TemporaryDirectory() as tmp:
        path = fv.save(os.path.join(tmp, "antonym.safetensors"))
        again = fv_plugin.FunctionVector.load(path)
        print(f"\nsaved and reloaded: {again}")


if __name__ == "__main__":
    main()
