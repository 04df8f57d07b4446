"""Drop-in steering of a transformers text-generation pipeline with a logits processor.

`attach(model)` once; then any `pipe(..., logits_processor=[proc])` call is steered, and only that call.
Run:  python examples/pipeline_dropin.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from antonym_vector import QUERIES, antonym_vector, zero_shot
from transformers import pipeline

import fv_plugin


def main() -> None:
    model, tokenizer = fv_plugin.load_model(os.environ.get("FV_MODEL", "smollm2-135m-instruct"))
    fv = antonym_vector(model, tokenizer)
    pipe = pipeline("text-generation", model=fv_plugin.attach(model), tokenizer=tokenizer)
    proc = fv_plugin.FunctionVectorProcessor(fv, strength=1.0, positions="last_prompt")
    kwargs = dict(max_new_tokens=4, do_sample=False, return_full_text=False)
    for query in QUERIES[:4]:
        plain = pipe(zero_shot(query), **kwargs)[0]["generated_text"].strip().replace("\n", " ")
        steered = pipe(zero_shot(query), logits_processor=[proc], **kwargs)[0]["generated_text"]
        print(f"{query:<8} plain: {plain!r:<24} steered: {steered.strip().replace(chr(10), ' ')!r}")


if __name__ == "__main__":
    main()
