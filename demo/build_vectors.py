"""Build the demo's precomputed function vectors: one per built-in task, for each embedded model.

Each is ``extract_function_vector(model, tokenizer, load_task(task), n_mean=32)``: the library's defaults
(``method="auto"``, which is ``"difference"`` for both embedded models; 10-shot prompts; layer chosen by the
validation sweep over every layer) except 32 ICL prompts for the mean instead of 100, to keep the build short on a
CPU. Saved as ``demo/vectors/<model>/<task>.safetensors``. The shipped files were made with these commands (on a
shared 2-core CPU under other jobs' load, 2 to 26 minutes per task, so not every built-in task was built):

    nice -n 10 python demo/build_vectors.py --model smollm2-135m-instruct --tasks antonym country-capital \
        english-french capitalize present-past singular-plural
    nice -n 10 python demo/build_vectors.py --model gemma-3-270m --tasks antonym country-capital capitalize

Without ``--tasks`` it builds every built-in task.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fv_plugin

VECTORS_DIR = Path(__file__).resolve().parent / "vectors"


def build(model_name: str, tasks: list[str], out_dir: Path, n_mean: int) -> None:
    model, tokenizer = fv_plugin.load_model(model_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in tasks:
        start = time.perf_counter()
        fv = fv_plugin.extract_function_vector(model, tokenizer, fv_plugin.load_task(name), n_mean=n_mean)
        # Name the model by its short name, not by the local folder it was loaded from.
        fv = dataclasses.replace(fv, model_name=model_name)
        path = fv.save(out_dir / f"{name}.safetensors")
        print(f"{name}: layer {fv.layer}, method {fv.method}, {time.perf_counter() - start:.1f} s -> {path.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded model short name")
    parser.add_argument("--n-mean", type=int, default=32, help="ICL prompts averaged (library default: 100)")
    parser.add_argument("--tasks", nargs="*", default=None, help="task names (default: every built-in task)")
    args = parser.parse_args()
    tasks = args.tasks or fv_plugin.builtin_tasks()
    build(args.model, tasks, VECTORS_DIR / args.model, args.n_mean)


if __name__ == "__main__":
    main()
