"""``positions="answer"`` in the vLLM worker, without an engine: the tracker's masks over any schedule of steps
against a direct reading of each request's whole token sequence, and the hooks it drives."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import pytest
import torch

from fv_plugin.vllm.answers import AnswerTracker
from fv_plugin.vllm.runners import StepBatch
from fv_plugin.vllm.tables import RequestPlan

ENDS = (7, 9)  # the ids that end an answer


def direct(tokens: list[int], prompt: int) -> np.ndarray:
    """Naive reference: position ``p`` is steered iff ``p >= prompt - 1`` and no generated token at or before ``p``
    ends the answer."""
    steered, ended = [], False
    for p, token in enumerate(tokens):
        ended = ended or (p >= prompt and token in ENDS)
        steered.append(p >= prompt - 1 and not ended)
    return np.array(steered)


def plan(positions: str = "answer") -> RequestPlan:
    return RequestPlan(keys=(), strength=1.0, positions=positions, relative=False, answer_ends=ENDS)


def step(tracker: AnswerTracker, runs: list[tuple[str, int, list[int], int]], plans: list[RequestPlan | None]) -> Any:
    """One step; ``runs``: (request, computed, token ids of its scheduled tokens, prompt length)."""
    reads: list[int] = []
    ids = np.array([t for _, _, tokens, _ in runs for t in tokens], dtype=np.int64)

    def token_ids() -> np.ndarray:
        reads.append(1)
        return ids

    batch = StepBatch(
        req_ids=[name for name, *_ in runs],
        starts=np.concatenate([[0], np.cumsum([len(tokens) for _, _, tokens, _ in runs])]),
        computed=np.array([computed for _, computed, _, _ in runs]),
        prompt_lengths=np.array([prompt for *_, prompt in runs]),
        requests={name: None for name, *_ in runs},
        token_ids=token_ids,
    )
    return tracker.masks(batch, plans), len(reads)


PROMPT = [1, 2, 7, 3, 9, 4]  # end ids inside the prompt do not end the answer
ANSWER = [5, 6, 8, 7, 5, 9, 6]  # the answer ends at its fourth token (position 9)


@pytest.mark.parametrize(
    "schedule",
    [
        [(0, 6)] + [(p, 1) for p in range(6, 13)],  # one prefill, then one token per decode step
        [(0, 2), (2, 3), (5, 1)] + [(p, 1) for p in range(6, 13)],  # chunked prefill
        [(0, 6), (6, 1), (7, 1), (0, 8)] + [(p, 1) for p in range(8, 13)],  # preempted, recomputed from scratch
        [(0, 6)] + [(p, 1) for p in range(6, 11)] + [(0, 11), (11, 1), (12, 1)],  # recomputed past the answer's end
        [(0, 6)] + [(p, 1) for p in range(6, 11)] + [(8, 3), (11, 2)],  # resumed on cached blocks past the end
        [(0, 6), (6, 1), (7, 3), (8, 2), (10, 3)],  # draft tokens, some rejected and run again
    ],
    ids=["decode", "chunked", "preempted", "recomputed-after-end", "cached-after-end", "drafts"],
)
def test_any_schedule_steers_the_tokens_a_direct_reading_does(schedule: list[tuple[int, int]]) -> None:
    tokens = PROMPT + ANSWER
    tracker, final = AnswerTracker(), np.zeros(len(tokens), dtype=bool)
    for first, count in schedule:
        masks, _ = step(tracker, [("r", first, tokens[first : first + count], len(PROMPT))], [plan()])
        final[first : first + count] = masks[0]  # a later run of a position replaces an earlier one
    expected = direct(tokens, len(PROMPT))
    assert expected.tolist() == [False] * 5 + [True] * 4 + [False] * 4  # last prompt token + 3 answer tokens
    assert np.array_equal(final, expected)


def test_a_rejected_draft_end_token_does_not_end_the_answer() -> None:
    tracker = AnswerTracker()
    step(tracker, [("r", 0, PROMPT, 6)], [plan()])
    masks, _ = step(tracker, [("r", 6, [5, 7, 5], 6)], [plan()])  # drafts: 7 ends the answer at position 7
    assert masks[0].tolist() == [True, False, False]
    masks, _ = step(tracker, [("r", 7, [6, 8], 6)], [plan()])  # 7 was rejected: positions 7, 8 are answer tokens
    assert masks[0].tolist() == [True, True]


def test_a_mixed_step_reads_the_token_ids_once_and_only_for_generated_answer_tokens() -> None:
    tracker = AnswerTracker()
    runs = [("a", 0, PROMPT, 6), ("plain", 0, [1, 2], 2), ("g", 6, [7], 6), ("b", 0, [1, 2, 3], 6)]
    masks, reads = step(tracker, runs, [plan(), None, plan("generated"), plan()])
    assert set(masks) == {0, 3} and reads == 0  # prompt tokens only: no read
    assert masks[0].tolist() == [False] * 5 + [True] and not masks[3].any()
    masks, reads = step(tracker, [("a", 6, [7], 6), ("b", 3, [4, 5, 6], 6), ("c", 7, [9], 6)], [plan()] * 3)
    assert reads == 1 and masks[0].tolist() == [False] and masks[1].tolist() == [False, False, True]


def test_a_request_whose_earlier_tokens_were_not_seen_is_not_steered(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        masks, _ = step(AnswerTracker(), [("r", 8, [5], 6)], [plan()])
    assert not masks[0].any() and "no longer steered" in caplog.text


def test_a_step_without_token_ids_stops_its_answers_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    tracker = AnswerTracker()
    step(tracker, [("r", 0, PROMPT, 6)], [plan()])
    batch = StepBatch(["r"], np.array([0, 1]), np.array([6]), np.array([6]), {"r": None}, token_ids=None)
    with caplog.at_level(logging.ERROR):
        assert not tracker.masks(batch, [plan()])[0].any()
    assert "runs embeddings" in caplog.text


def test_the_hooks_stop_adding_where_the_answer_ends() -> None:
    """Through a fake v1 runner: the wrapped forward reads the step's ids from its ``input_ids`` argument."""
    from test_tables import ToyModel, fake_runner, params, reference, resolved

    from fv_plugin.vllm.settings import PluginSettings
    from fv_plugin.vllm.worker import install_steering

    torch.manual_seed(3)
    model, a = ToyModel(), torch.randn(8)
    ends = np.array(ENDS, dtype="<i8").tobytes()
    answer = dataclasses.replace(resolved({1: a}, 2.0, "answer", False), answer_ends=ends)
    runner = fake_runner(model, {"r": params(answer)}, [("r", 0, 6, 6)])
    install_steering(runner, PluginSettings(max_layers=2))
    x = torch.randn(6, 8)
    runner._model_forward(input_ids=torch.tensor(PROMPT))
    torch.testing.assert_close(model(x)[-1], reference(model, x, {1: [(5, 2.0 * a, False)]}))
    x = torch.randn(1, 8)
    runner.query_start_loc.np = np.array([0, 1])
    for position, token, steered in [(6, 5, True), (7, 7, False), (8, 5, False)]:  # the answer ends at the 7
        runner.input_batch.num_computed_tokens_cpu = np.array([position])
        runner._model_forward(torch.tensor([token]))
        adds = {1: [(0, 2.0 * a, False)]} if steered else {}
        torch.testing.assert_close(model(x)[-1], reference(model, x, adds))


def test_a_forward_on_embeddings_reads_the_runners_own_ids() -> None:
    """vLLM's v1 runner passes ``inputs_embeds`` (and no ids) for multimodal models and prompt embeddings; its
    ``input_ids`` buffer still holds each generated token's id."""
    from types import SimpleNamespace

    from fv_plugin.vllm.runners import v1_batch

    runner = SimpleNamespace(
        input_ids=SimpleNamespace(gpu=torch.tensor([4, 7, 0, 0])),
        input_batch=SimpleNamespace(
            num_reqs=1, req_ids=["r"], num_computed_tokens_cpu=np.array([6]), num_prompt_tokens=np.array([6])
        ),
        query_start_loc=SimpleNamespace(np=np.array([0, 2])),
        requests={"r": None},
    )
    batch = v1_batch(runner, None)
    assert batch.token_ids is not None and batch.token_ids().tolist() == [4, 7]
    masks = AnswerTracker().masks(batch, [plan()])
    assert masks[0].tolist() == [True, False]
