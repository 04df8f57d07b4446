"""Where the plugin meets vLLM's model runners: each step's batch, read before the model runs.

vLLM has two model runners. The v1 runner (``vllm.v1.worker.gpu_model_runner``, and its CPU subclass) keeps each
request's sampling parameters in ``runner.requests`` and its batch in ``runner.input_batch``; the plugin wraps its
``_model_forward``. "Model Runner V2" (``vllm.v1.worker.gpu.model_runner``, and ``vllm.v1.worker.cpu.model_runner``)
keeps neither: the plugin records each new request's sampling parameters when ``add_requests`` sees it, forgets
them in ``_remove_request``, and writes each step's tables right after ``prepare_inputs`` builds the batch, before
the forward (eager, piecewise or a full CUDA graph replay) runs.

Both hand the writer the same view of a step (:class:`StepBatch`), so the tables and hooks are the same.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

__all__ = ["V1_NEEDS", "V2_NEEDS", "StepBatch", "check_runner", "is_v2_runner", "wrap_runner"]

V1_NEEDS = ("_model_forward", "input_batch", "query_start_loc", "requests", "max_num_tokens", "max_num_reqs")
V2_NEEDS = ("prepare_inputs", "add_requests", "_remove_request", "req_states", "max_num_tokens", "max_num_reqs")


@dataclass(frozen=True)
class StepBatch:
    """One step's requests in batch order: request ``i`` owns tokens ``starts[i]:starts[i + 1]``, has
    ``computed[i]`` tokens computed before this step and a prompt of ``prompt_lengths[i]`` tokens; ``requests``
    maps a request id to an object with its ``sampling_params``; ``token_ids()`` reads the step's input token ids
    to the host (``None``: the step runs embeddings), for ``positions="answer"`` only."""

    req_ids: list[str]
    starts: np.ndarray
    computed: np.ndarray
    prompt_lengths: np.ndarray
    requests: Mapping[str, Any]
    token_ids: Callable[[], np.ndarray] | None = None


def is_v2_runner(runner: Any) -> bool:
    return hasattr(runner, "req_states") and not hasattr(runner, "_model_forward")


def check_runner(runner: Any) -> None:
    needs = V2_NEEDS if is_v2_runner(runner) else V1_NEEDS
    missing = [name for name in needs if not hasattr(runner, name)]
    if missing:
        raise RuntimeError(
            f"fv_plugin: vLLM's model runner {type(runner).__name__} lacks {missing}; the vLLM integration steers "
            "through the v1 and V2 GPU and CPU model runners of the tested vLLM versions. Set "
            "VLLM_USE_V2_MODEL_RUNNER to 0 or 1 to choose the other runner, or FV_PLUGIN_VLLM=0 to serve without "
            "steering."
        )


def host_ids(input_ids: Any, count: int) -> Callable[[], np.ndarray] | None:
    """A reader of the first ``count`` ids of a device tensor of input ids (``None`` for no tensor). Reading waits
    for the device: the step's ids may be written there by the previous step's sampler (async scheduling)."""
    if input_ids is None:
        return None
    return lambda: input_ids[:count].to("cpu").numpy().astype(np.int64)


def v1_batch(runner: Any, input_ids: Any = None) -> StepBatch:
    """The step's batch; ``input_ids``: the forward's ids, or, when it runs embeddings (multimodal models, prompt
    embeddings), the runner's own buffer of the step's ids, which holds every generated token's id."""
    if input_ids is None:
        input_ids = getattr(getattr(runner, "input_ids", None), "gpu", None)
    batch = runner.input_batch
    count = int(batch.num_reqs)
    starts = runner.query_start_loc.np[: count + 1]
    return StepBatch(
        req_ids=list(batch.req_ids[:count]),
        starts=starts,
        computed=batch.num_computed_tokens_cpu[:count],
        prompt_lengths=batch.num_prompt_tokens[:count],
        requests=runner.requests,
        token_ids=host_ids(input_ids, int(starts[count])),
    )


def _host(values: Any) -> Any:
    """A V2 per-request array: a CPU/GPU buffer pair (its ``.np``) in recent vLLM, a numpy array in earlier V2."""
    return getattr(values, "np", values)


def v2_batch(runner: Any, batch: Any, requests: Mapping[str, Any]) -> StepBatch:
    count = int(batch.num_reqs)
    rows = np.asarray(batch.idx_mapping_np[:count])
    starts = np.asarray(batch.query_start_loc_np[: count + 1])
    return StepBatch(
        req_ids=list(batch.req_ids[:count]),
        starts=starts,
        computed=np.asarray(batch.num_computed_tokens_np[:count]),
        prompt_lengths=np.asarray(_host(runner.req_states.prompt_len)[rows]),
        requests=requests,
        token_ids=host_ids(getattr(batch, "input_ids", None), int(starts[count])),
    )


def _wrap(runner: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    original = getattr(runner, name)
    setattr(runner, name, functools.wraps(original)(make(original)))


def wrap_runner(runner: Any, prepare: Callable[[StepBatch], None]) -> None:
    """Make ``runner`` call ``prepare`` with each step's batch before its model runs (once per runner)."""
    if getattr(runner, "fv_plugin_wrapped", False):
        return
    runner.fv_plugin_wrapped = True
    if not is_v2_runner(runner):

        def forward(original: Callable[..., Any]) -> Callable[..., Any]:
            def _model_forward(*args: Any, **kwargs: Any) -> Any:
                prepare(v1_batch(runner, kwargs.get("input_ids", args[0] if args else None)))
                return original(*args, **kwargs)

            return _model_forward

        _wrap(runner, "_model_forward", forward)
        return
    requests: dict[str, Any] = {}

    def add(original: Callable[..., Any]) -> Callable[..., Any]:
        def add_requests(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(scheduler_output, *args, **kwargs)  # it may remove a re-added request first
            for new in scheduler_output.scheduled_new_reqs:
                requests[new.req_id] = SimpleNamespace(sampling_params=new.sampling_params)
            return result

        return add_requests

    def remove(original: Callable[..., Any]) -> Callable[..., Any]:
        def _remove_request(req_id: str, *args: Any, **kwargs: Any) -> Any:
            requests.pop(req_id, None)
            return original(req_id, *args, **kwargs)

        return _remove_request

    def inputs(original: Callable[..., Any]) -> Callable[..., Any]:
        def prepare_inputs(*args: Any, **kwargs: Any) -> Any:
            batch = original(*args, **kwargs)
            prepare(v2_batch(runner, batch, requests))
            return batch

        return prepare_inputs

    _wrap(runner, "add_requests", add)
    _wrap(runner, "_remove_request", remove)
    _wrap(runner, "prepare_inputs", inputs)
