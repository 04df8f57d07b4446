"""Steer and extract on a model that accelerate dispatched: some layers offloaded to disk, the rest in memory.

With GPUs, ``device_map="auto"`` and ``max_memory`` spread the layers over them and the CPU; each vector is
added on the device its layer runs on. Without one, this example offloads the middle layers to disk, which is
the same machinery (their weights stay on ``meta`` until the layer runs), and checks the steered generation
against the same model fully in memory.
Run:  python examples/multi_device.py
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from antonym_vector import QUERIES, antonym_vector, zero_shot

import fv_plugin


def device_map(num_layers: int, main: str) -> dict[str, str]:
    """Embeddings, norm, head and the outer layers on ``main``; the middle third of the layers on disk."""
    placement = {"model.embed_tokens": main, "model.rotary_emb": main, "model.norm": main, "lm_head": main}
    for i in range(num_layers):
        placement[f"model.layers.{i}"] = "disk" if num_layers // 3 <= i < 2 * num_layers // 3 else main
    return placement


def main() -> None:
    name = os.environ.get("FV_MODEL", "smollm2-135m-instruct")
    main_device = "cuda:0" if torch.cuda.is_available() else "cpu"
    reference, tokenizer = fv_plugin.load_model(name, device_map=main_device)
    with tempfile.TemporaryDirectory() as folder:
        layers = fv_plugin.resolve_architecture(reference).num_layers
        model, _ = fv_plugin.load_model(name, device_map=device_map(layers, main_device), offload_folder=folder)
        on_disk = sorted(k for k, v in model.hf_device_map.items() if v == "disk")
        print(f"{len(on_disk)} of {layers} layers on disk: {on_disk[0]} ... {on_disk[-1]}")
        fv = antonym_vector(model, tokenizer)  # extraction through the offloaded layers (the vector sits at 18)
        same = antonym_vector(reference, tokenizer)
        cosine = torch.nn.functional.cosine_similarity(fv.vector, same.vector, dim=0)
        print(f"vector from the offloaded model vs the in-memory one: cosine {cosine:.6f}")
        enc = tokenizer([zero_shot(q) for q in QUERIES], return_tensors="pt", padding=True, padding_side="left")
        enc = enc.to(main_device)
        options = dict(max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        outs = []
        for m in (model, reference):
            with torch.inference_mode(), fv_plugin.steer(m, fv, positions="last_prompt"):
                outs.append(m.generate(**enc, **options))
    width = enc["input_ids"].shape[1]
    print(f"steered generations identical with and without offload: {torch.equal(outs[0], outs[1])}")
    for query, row in zip(QUERIES, outs[0], strict=True):
        print(f"{query:<8} -> {tokenizer.decode(row[width:], skip_special_tokens=True).strip()!r}")


if __name__ == "__main__":
    main()
