"""Extract a function vector the paper's way, save it, reload it, and steer zero-shot prompts with it.

Run:  python examples/extract_and_steer.py [task]      (default task: antonym)
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

import fv_plugin


def main(task_name: str = "antonym") -> None:
    model, tokenizer = fv_plugin.load_model(os.environ.get("FV_MODEL", "smollm2-135m-instruct"))
    task = fv_plugin.load_task(task_name)
    method = os.environ.get("FV_METHOD", "auto")  # "auto": the method measured best for this model family
    fv = fv_plugin.extract_function_vector(model, tokenizer, task, method=method, k=10, progress=True)  # type: ignore[arg-type]
    print(f"extracted {fv} at layer {fv.layer}; top heads {fv.heads[:5] if fv.heads else '-'}")

    with tempfile.TemporaryDirectory() as tmp:
        fv = fv_plugin.FunctionVector.load(fv.save(os.path.join(tmp, f"{task_name}.safetensors")))

    test = fv_plugin.make_prompts(task, n_shots=0, split="test")
    before, _ = fv_plugin.zero_shot_scores(model, tokenizer, test)
    after, _ = fv_plugin.zero_shot_scores(model, tokenizer, test, [fv])
    print(f"zero-shot first-token accuracy on {len(test)} test queries: {before:.2f} -> {after:.2f}")

    enc = fv_plugin.encode_prompts(tokenizer, test[:5])
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode(), fv_plugin.steer(model, fv, positions="last_prompt"):
        steered = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, **kwargs)
    width = enc.input_ids.shape[1]
    for prompt, row in zip(test[:5], steered, strict=True):
        text = tokenizer.decode(row[width:], skip_special_tokens=True).strip().replace("\n", " ")
        print(f"  {prompt.query.input!r:<14} -> {text!r:<20} (expected {prompt.query.output!r})")


if __name__ == "__main__":
    main(*sys.argv[1:2])
