"""Function vectors, live: a Gradio app that steers a small model with vectors extracted from examples.

Run from the repository root:

    python demo/app.py                      # the embedded default model, http://127.0.0.1:7860
    python demo/app.py --model gemma-3-270m # or FV_DEMO_MODEL=gemma-3-270m

On a Hugging Face Space (``app_file: demo/app.py``) the same model is read from the Hub.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python demo/app.py, or a Space): make `demo` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradio as gr
import torch

import fv_plugin
from demo.batching import BatchLimits
from demo.callbacks import DemoApp
from demo.engine import VECTORS_DIR, Engine, available_vector_sets, load_side_effects
from demo.extractor import Extractor, ExtractSettings
from demo.ui import build_app

DEFAULT_MODEL = "smollm2-135m-instruct"


def make_app(model_name: str, settings: ExtractSettings | None = None, batching: BatchLimits | None = None) -> DemoApp:
    """Load ``model_name`` and its shipped vectors (if any) into a :class:`DemoApp`."""
    model, tokenizer = fv_plugin.load_model(model_name)
    sets = available_vector_sets()
    side_effects = load_side_effects(VECTORS_DIR / model_name)
    engine = Engine(
        model, tokenizer, model_name=model_name, vectors=sets.get(model_name, {}), batching=batching or BatchLimits()
    )
    engine.warm_up()
    extractor = Extractor(
        model,
        tokenizer,
        model_name=model_name,
        limits=engine.limits,
        settings=settings or ExtractSettings(),
        load_copy=lambda: fv_plugin.load_model(model_name),
    )
    return DemoApp(engine, extractor, cross_model=sets, side_effects=side_effects)


def launch(app: DemoApp, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> gr.Blocks:
    """Start the server (``block=False`` returns at once; stop it with ``.close()``)."""
    demo = build_app(app)
    demo.launch(
        server_name=host,
        server_port=port,
        max_file_size=app.engine.limits.max_upload_bytes,
        show_error=True,
        prevent_thread_lock=not block,
        quiet=not block,
    )
    return demo


def main(argv: list[str] | None = None) -> None:
    env = os.environ.get
    parser = argparse.ArgumentParser(description="Function vectors, live (Gradio demo)")
    parser.add_argument(
        "--model",
        default=env("FV_DEMO_MODEL", DEFAULT_MODEL),
        help="embedded short name, local folder or Hub id (env FV_DEMO_MODEL; default %(default)s)",
    )
    parser.add_argument("--host", default=env("GRADIO_SERVER_NAME", "127.0.0.1"), help="env GRADIO_SERVER_NAME")
    parser.add_argument(
        "--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")), help="env GRADIO_SERVER_PORT"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--max-batch", type=int, default=BatchLimits.max_jobs, help="requests per generate")
    parser.add_argument(
        "--batch-quiet",
        type=float,
        default=BatchLimits.quiet_s,
        help="seconds without a new request end a batch's wait",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    batching = BatchLimits(max_jobs=args.max_batch, quiet_s=args.batch_quiet)
    launch(make_app(args.model, batching=batching), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
