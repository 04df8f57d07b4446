"""Benchmarks, run as commands: ``fv bench overhead|extract|quality|scaling|choice|side-effects|quant|vllm`` (or
``python -m fv_plugin.benchmarks ...``). Apart from the library: nothing in fv_plugin imports them, and each is
imported only when its command runs.

- ``overhead`` (:mod:`.overhead`): tokens/s of plain vs attached-idle vs steered generation, batch 1 and 8.
- ``extract`` (:mod:`.extraction`): one extraction vs the plain forwards of its prompts; fast vs naive AIE.
- ``quality`` (:mod:`.quality`): test accuracy of every method's vector and the baselines, per task.
- ``scaling`` (:mod:`.scaling`): extraction cost over the plain forwards as layers x heads grow.
- ``choice`` (:mod:`.choice`): what ``auto`` chooses per task; test accuracy by first token and exact match.
- ``side-effects`` (:mod:`.side_effects`): each vector's own-task accuracy and what else it changes, ungated,
  gated and with ``positions="answer"``.
- ``condition`` (:mod:`.condition`): a condition's cost against the plain forwards, and its error rates.
- ``quant`` (:mod:`.quant`): quantized vs float32 vectors (cosine, accuracy, memory), each in its own process.
- ``vllm`` (:mod:`.vllm`): steered vs plain throughput of concurrent requests on vLLM.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

# command -> (module, help); modules with add_arguments/run share this parser, the others parse their own.
_COMMANDS = {
    "overhead": ("overhead", "tokens/s of plain vs attached-idle vs steered generation (batch 1 and 8)"),
    "extract": ("extraction", "time one extraction vs the plain forwards of its prompts, and fast vs naive AIE"),
    "quality": ("quality", "test accuracy of every method's vector and the baselines, per task"),
    "scaling": ("scaling", "extraction cost over the plain forwards as layers x heads grow"),
    "choice": ("choice", "what auto chooses per task, and its test accuracy by first token and exact match"),
    "side-effects": ("side_effects", "own-task accuracy and side effects of vectors: ungated, gated, answer positions"),
    "condition": ("condition", "what learning saved vectors' conditions costs, and their validation error rates"),
}
_OWN_PARSERS = {
    "quant": ("quant", "quantized vs float32 vectors: cosine, accuracy, memory (see fv bench quant -h)"),
    "vllm": ("vllm", "steered vs plain throughput of concurrent vLLM requests (see fv bench vllm -h)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    rest = list(sys.argv[1:] if argv is None else argv)
    if rest[:1] and rest[0] in _OWN_PARSERS:
        module = importlib.import_module(f"fv_plugin.benchmarks.{_OWN_PARSERS[rest[0]][0]}")
        return int(module.main(rest[1:]))
    parser = argparse.ArgumentParser(prog="fv bench", description="fv_plugin's benchmarks")
    sub = parser.add_subparsers(dest="bench", required=True)
    chosen = rest[0] if rest[:1] and rest[0] in _COMMANDS else None
    for name, (module_name, text) in _COMMANDS.items():
        command = sub.add_parser(name, help=text)
        if name == chosen:  # only the command that runs is imported (with torch): `fv bench --help` stays light
            importlib.import_module(f"fv_plugin.benchmarks.{module_name}").add_arguments(command)
    for name, (_, text) in _OWN_PARSERS.items():
        sub.add_parser(name, help=text)
    args = parser.parse_args(rest)
    importlib.import_module(f"fv_plugin.benchmarks.{_COMMANDS[args.bench][0]}").run(args)
    return 0
