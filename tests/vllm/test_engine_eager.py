"""One eager engine, one rank, prefix caching on, a small token budget (long prompts are prefilled in chunks):
mixed batches against fv_plugin.steer on Hugging Face, named vectors, the prefix cache, and bad requests."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from engine_cases import (
    Case,
    check_batch,
    gated,
    hf_tokens,
    make_engine,
    mixed_batch,
    random_vector,
    require_vllm,
    token_ids,
)

from fv_plugin import FunctionVector
from fv_plugin.vllm import steering

require_vllm()
pytestmark = pytest.mark.vllm
BUDGET = 64  # tokens per engine step: the "long" prompt needs two


@pytest.fixture(scope="module")
def llm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("vectors")
    random_vector(10, 1, 0.6).save(folder / "ten.safetensors")
    random_vector(20, 2, 0.5).save(folder / "twenty.safetensors")
    patch = pytest.MonkeyPatch()
    patch.setenv("FV_PLUGIN_VECTORS", str(folder))  # read when the engine starts
    request.addfinalizer(patch.undo)
    return make_engine(request, enforce_eager=True, max_num_batched_tokens=BUDGET, max_num_seqs=16, block_size=32)


def generate(llm: Any, prompt: str, args: dict[str, Any] | None) -> Any:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=10, extra_args=args)
    return llm.generate([TokensPrompt(prompt_token_ids=list(token_ids(prompt)))], [params], use_tqdm=False)[0]


def test_a_mixed_batch_matches_hugging_face(llm: Any) -> None:
    assert len(token_ids("long")) > BUDGET  # its prefill is split, its last prompt token in a later chunk
    check_batch(llm)


def test_the_same_batch_in_another_order_still_matches(llm: Any) -> None:
    check_batch(llm, mixed_batch()[::-1])


def test_named_vectors_match_the_same_vectors_inline(llm: Any) -> None:
    ten, twenty = random_vector(10, 1, 0.6), random_vector(20, 2, 0.5)
    out = generate(llm, "big", steering("ten", ("twenty", -0.5), strength=1.5, positions="all"))
    assert list(out.outputs[0].token_ids) == hf_tokens(
        Case("big", (ten, (twenty, -0.5)), dict(strength=1.5, positions="all"))
    )


def test_the_prefix_cache_never_serves_other_steering(llm: Any) -> None:
    case = Case("long", (random_vector(12, 7, 0.8),), dict(strength=1.0, positions="all"))
    args = steering(*case.vectors, **case.options)
    plain = [generate(llm, "long", None) for _ in range(2)]
    assert plain[1].num_cached_tokens > 0  # the cache is on and serves the repeated plain prompt
    steered = [generate(llm, "long", args) for _ in range(2)]
    assert steered[0].num_cached_tokens == 0  # the plain prompt's cache is not reused under steering
    assert steered[1].num_cached_tokens > 0  # the same steering shares its own cache
    expected = hf_tokens(case)
    assert [list(out.outputs[0].token_ids) for out in steered] == [expected, expected]
    assert list(plain[0].outputs[0].token_ids) == hf_tokens(Case("long")) != expected


BAD = (
    "unknown name",
    "hidden size",
    "layer",
    "nan strength",
    "positions",
    "typo",
    "model type",
    "layers",
    "not base64",
    "gate without condition",
    "gate at every position",
)


def bad_request(name: str) -> tuple[dict[str, Any], str]:
    """Request arguments that must be refused, and what the refusal says."""
    good = steering(random_vector(10, 1, 0.6))
    return {
        "unknown name": (steering("nope"), "no vector named 'nope'"),
        "hidden size": (steering(FunctionVector(vector=torch.ones(64), layer=3)), "hidden size is 576"),
        "layer": (steering(FunctionVector(vector=torch.ones(576), layer=30)), "layer 30 is out of range"),
        "nan strength": ({**good, "fv_strength": float("nan")}, "fv_strength must be finite"),
        "positions": ({**good, "fv_positions": "everywhere"}, "positions must be one of"),
        "typo": ({**good, "fv_strenght": 2.0}, "unknown steering argument"),
        "model type": (steering(FunctionVector(vector=torch.ones(576), layer=3, model_type="gpt2")), "gpt2"),
        "layers": (steering(*(random_vector(layer, 1) for layer in (1, 2, 3, 4, 5))), "at most 4"),
        "not base64": ({**good, "fv_vectors": ["???"]}, "not base64"),
        "gate without condition": ({**good, "fv_gate": True}, "gate=True needs a condition on every vector"),
        "gate at every position": (
            {**steering(gated(random_vector(10, 1, 0.6), "hot"), gate=True), "fv_positions": "all"},
            "positions='all' cannot be served exactly",
        ),
    }[name]


@pytest.mark.parametrize("name", BAD)
def test_a_bad_request_fails_alone(llm: Any, name: str) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    args, message = bad_request(name)
    prompts = [TokensPrompt(prompt_token_ids=list(token_ids(p))) for p in ("hot", "big")]
    params = [
        SamplingParams(temperature=0, max_tokens=10),
        SamplingParams(temperature=0, max_tokens=10, extra_args=args),
    ]
    with pytest.raises(Exception, match=message) as caught:
        llm.generate(prompts, params, use_tqdm=False)
    assert "fv_plugin steering" in str(caught.value)
    case = Case("hot", (random_vector(10, 1, 0.6),), dict(strength=1.0))
    assert list(generate(llm, "hot", steering(*case.vectors, **case.options)).outputs[0].token_ids) == hf_tokens(case)
