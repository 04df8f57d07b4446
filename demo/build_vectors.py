"""Build the demo's precomputed function vectors and what they change besides their task, for one embedded model.

Each vector is ``extract_function_vector(model, tokenizer, load_task(task), n_mean=32)``: the library's defaults
(``method="auto"``: method, layer and strength chosen on zero-shot validation queries; 10-shot prompts) except 32
ICL prompts for the means instead of 100, to keep the build short on a CPU. Saved as
``demo/vectors/<model>/<task>.safetensors``, with ``side_effects.json`` beside them: every vector on every task's
zero-shot and 10-shot test prompts (:func:`fv_plugin.side_effects.specificity`) and each vector on the neutral
paragraphs (:func:`fv_plugin.side_effects.text_effects`), which the Compare tab shows. The shipped files were made
with (a shared 2-core CPU; the command prints each task's time):

    python demo/build_vectors.py --model smollm2-135m-instruct --tasks antonym country-capital \
        english-french capitalize present-past singular-plural --threads 2

Gemma 3's three vectors (antonym, country-capital, capitalize) were built by the same :func:`build` with
``--model gemma-3-270m --tasks antonym country-capital capitalize``, without the side-effects step (its folder
has no ``side_effects.json``).

Without ``--tasks`` it builds every built-in task. ``--side-effects-only`` recomputes the JSON for the vectors
already in the folder. Vectors built now carry their condition (``fv.condition``, for ``gate=True``; extraction
learns it by default); ``--conditions-only`` learns it for the vectors already in the folder without rebuilding
them (``fv_plugin.learn_condition``: a few hundred short prompts run up to the layer below the vector). The
shipped vectors' conditions were learned by their extraction.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fv_plugin
from fv_plugin.side_effects import specificity, text_effects

VECTORS_DIR = Path(__file__).resolve().parent / "vectors"
SIDE_EFFECTS = "side_effects.json"
TEXT_STRENGTHS = (0.5, 1.0, 2.0, 4.0)


def build(model: Any, tokenizer: Any, model_name: str, tasks: list[str], out_dir: Path, n_mean: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in tasks:
        start = time.perf_counter()
        fv = fv_plugin.extract_function_vector(model, tokenizer, fv_plugin.load_task(name), n_mean=n_mean)
        # Name the model by its short name, not by the local folder it was loaded from.
        fv = dataclasses.replace(fv, model_name=model_name)
        path = fv.save(out_dir / f"{name}.safetensors")
        print(f"{name}: {fv.method}, layer {fv.layer}, {time.perf_counter() - start:.1f} s -> {path.name}", flush=True)


def add_conditions(model: Any, tokenizer: Any, folder: Path, tasks: list[str] | None) -> None:
    """Learn the condition of each vector in ``folder`` (of ``tasks``, default all) and save it in place."""
    for path in sorted(folder.glob("*.safetensors")):
        if tasks is not None and path.stem not in tasks:
            continue
        start = time.perf_counter()
        fv = fv_plugin.FunctionVector.load(path)
        config = fv.config or fv_plugin.ExtractionConfig()
        task = fv_plugin.load_task(path.stem)
        condition = fv_plugin.learn_condition(model, tokenizer, task, fv, template=config.template, seed=config.seed)
        dataclasses.replace(fv, condition=condition).save(path)
        print(f"{path.stem}: {time.perf_counter() - start:.1f} s\n{condition.describe()}", flush=True)


def measure_side_effects(model: Any, tokenizer: Any, folder: Path) -> dict[str, Any]:
    """Specificity of the folder's vectors on their tasks, and each vector's effects on neutral text."""
    vectors = {p.stem: fv_plugin.FunctionVector.load(p) for p in sorted(folder.glob("*.safetensors"))}
    tasks = [fv_plugin.load_task(name) for name in vectors if name in fv_plugin.builtin_tasks()]
    start = time.perf_counter()
    spec = specificity(model, tokenizer, tasks, vectors) if len(tasks) > 1 else None
    text = {name: text_effects(model, tokenizer, [fv], TEXT_STRENGTHS).to_dict() for name, fv in vectors.items()}
    print(f"side effects of {len(vectors)} vectors: {time.perf_counter() - start:.1f} s", flush=True)
    return {"specificity": spec.to_dict() if spec is not None else None, "text_effects": text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded model short name")
    parser.add_argument("--n-mean", type=int, default=32, help="ICL prompts averaged (library default: 100)")
    parser.add_argument("--tasks", nargs="*", default=None, help="task names (default: every built-in task)")
    parser.add_argument("--side-effects-only", action="store_true", help="only recompute side_effects.json")
    parser.add_argument("--conditions-only", action="store_true", help="only learn the saved vectors' conditions")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = fv_plugin.load_model(args.model)
    folder = VECTORS_DIR / args.model
    if args.conditions_only:
        add_conditions(model, tokenizer, folder, args.tasks)
        return
    if not args.side_effects_only:
        build(model, tokenizer, args.model, args.tasks or fv_plugin.builtin_tasks(), folder, args.n_mean)
    data = measure_side_effects(model, tokenizer, folder)
    (folder / SIDE_EFFECTS).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
