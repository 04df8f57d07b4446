"""Streaming a steered generation token by token, the way Hugging Face chat apps stream.

``generate`` runs in a thread that feeds a ``TextIteratorStreamer``. A ``steer`` block belongs to the context
(thread) that opened it, so the thread must steer itself: here with ``SteeredModel.generate(steering=...)``
(the other ways: a ``FunctionVectorProcessor`` on an attached model, or ``contextvars.copy_context().run``).

Run:  python examples/streaming.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from threading import Thread

from transformers import TextIteratorStreamer

import fv_plugin

VECTORS = Path(__file__).resolve().parent.parent / "demo" / "vectors"


def main() -> None:
    name = os.environ.get("FV_MODEL", "smollm2-135m-instruct")
    model, tokenizer = fv_plugin.load_model(name)
    fv = fv_plugin.FunctionVector.load(VECTORS / name / "antonym.safetensors")
    steered = fv_plugin.SteeredModel(model)
    inputs = tokenizer("Q: hot\nA:", return_tensors="pt")
    for label, vectors in (("unsteered", []), ("steered", [fv])):
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(**inputs, steering=vectors, streamer=streamer, max_new_tokens=12, do_sample=False)
        thread = Thread(target=steered.generate, kwargs=kwargs)
        thread.start()
        sys.stdout.write(f"{label:>9}: ")
        for piece in streamer:  # arrives token by token while the thread generates
            sys.stdout.write(piece.replace("\n", " "))
            sys.stdout.flush()
        thread.join()
        print()


if __name__ == "__main__":
    main()
