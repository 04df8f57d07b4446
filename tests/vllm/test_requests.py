"""Request arguments without an engine: what steering() writes, how the server parses, checks and resolves it."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import pytest
import torch

from fv_plugin import FunctionVector
from fv_plugin.vllm import steering
from fv_plugin.vllm.frontend import Frontend, load_vector_folder, served_arch
from fv_plugin.vllm.requests import RESOLVED_KEY, ResolvedSteering, parse_request, resolve
from fv_plugin.vllm.settings import PluginSettings

ARCH = served_arch(hidden_size=8, num_layers=6, num_heads=2, model_type="llama")


def vec(layer: int, seed: int, model_type: str | None = "llama") -> FunctionVector:
    values = torch.randn(8, generator=torch.Generator().manual_seed(seed))
    return FunctionVector(vector=values, layer=layer, model_type=model_type)


def no_names(name: str) -> FunctionVector:
    raise ValueError(f"no vector named {name!r}")


def over_json(args: dict[str, Any]) -> dict[str, Any]:
    """What the OpenAI-compatible server receives in vllm_xargs."""
    loaded = json.loads(json.dumps(args))
    for key, value in loaded.items():  # vllm_xargs: str | int | float | list[str | int | float]
        items = value if isinstance(value, list) else [value]
        assert all(isinstance(item, (str, int, float)) for item in items), key
    return loaded


def test_steering_is_flat_json_and_parses_back_to_the_same_pairs() -> None:
    a, b = vec(1, 0), vec(4, 1, model_type=None)
    args = over_json(steering(a, (b, -0.5), strength=2.0, positions="all", normalize="relative"))
    request = parse_request(args, no_names)
    assert request is not None
    assert (request.strength, request.positions, request.normalize) == (2.0, "all", "relative")
    assert [(fv.layer, fv.model_type, w) for fv, w in request.pairs] == [(1, "llama", 1.0), (4, None, -0.5)]
    for (fv, _), original in zip(request.pairs, (a, b), strict=True):
        assert torch.equal(fv.vector, original.vector)


def test_names_are_looked_up_by_the_server() -> None:
    named = {"antonym": vec(2, 3)}
    frontend = Frontend(arch=ARCH, settings=PluginSettings(), named=named)
    request = parse_request(over_json(steering("antonym", ("antonym", 2.0))), frontend.lookup)
    assert request is not None and [w for _, w in request.pairs] == [1.0, 2.0]
    with pytest.raises(ValueError, match=r"no vector named 'other'.*known: antonym"):
        parse_request(steering("other"), frontend.lookup)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: steering(vec(1, 0), strength=float("nan")), ValueError, "finite"),
        (lambda: steering(vec(1, 0), strength=torch.tensor([1.0, 2.0])), ValueError, "one strength"),
        (lambda: steering(vec(1, 0), positions="everywhere"), ValueError, "positions must be one of"),
        (lambda: steering(vec(1, 0), normalize="l2"), ValueError, "normalize must be one of"),
        (lambda: steering(torch.ones(8)), TypeError, "FunctionVector"),
        (lambda: steering((vec(1, 0), float("inf"))), ValueError, "finite"),
    ],
)
def test_steering_refuses_what_steer_refuses(call: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()


class WordTokenizer:
    """A tokenizer stand-in: id ``i`` decodes to ``WORDS[i]``."""

    WORDS = ("a", "b\n", "c", "\n\n", "d", "</s>")
    eos_token_id = 5

    def __len__(self) -> int:
        return len(self.WORDS)

    def batch_decode(self, ids: list[list[int]], skip_special_tokens: bool = False) -> list[str]:
        return ["".join(self.WORDS[i] for i in row) for row in ids]


def test_answer_positions_carry_the_served_tokenizers_end_ids() -> None:
    from fv_plugin.vllm.frontend import answer_ends_reader
    from fv_plugin.vllm.tables import RequestPlan

    frontend = Frontend(arch=ARCH, settings=PluginSettings(), answer_ends=answer_ends_reader(WordTokenizer(), 4))
    args, salt = frontend.resolved_args(over_json(steering(vec(1, 0), positions="answer")), 3)
    plan = RequestPlan.from_resolved(ResolvedSteering.from_args(args[RESOLVED_KEY]))
    assert plan.positions == "answer" and plan.answer_ends == (1, 3, 4, 5)  # newlines, eos, generation-config eos
    generated, _ = frontend.resolved_args(over_json(steering(vec(1, 0))), 3)
    assert ResolvedSteering.from_args(generated[RESOLVED_KEY]).answer_ends == b""  # other modes carry none
    assert salt != frontend.resolved_args(over_json(steering(vec(1, 0))), 3)[1]
    without = Frontend(arch=ARCH, settings=PluginSettings())
    with pytest.raises(ValueError, match="positions='answer' needs the served model's tokenizer"):
        without.resolved_args(steering(vec(1, 0), positions="answer"), 3)


def head_vec(heads: tuple[tuple[int, int], ...], seed: int, mode: str = "add") -> FunctionVector:
    values = torch.randn(len(heads), 4, generator=torch.Generator().manual_seed(seed))
    method = "head_difference" if mode == "add" else "head_patch"
    base = vec(min(layer for layer, _ in heads), seed)
    return dataclasses.replace(base, heads=heads, head_values=values, head_mode=mode, method=method)


def test_head_level_vectors_travel_as_head_entries() -> None:
    diff, patch = head_vec(((1, 0), (3, 1)), 0, "add"), head_vec(((3, 1), (2, 0)), 1, "replace")
    args = over_json(steering(vec(2, 5), (diff, 2.0), (patch, 0.5), strength=1.5))
    assert args["fv_layers"] == [2] and args["fv_head_heads"] == [1, 0, 3, 1, 3, 1, 2, 0]
    request = parse_request(args, no_names)
    assert request is not None
    result = resolve(request, ARCH, max_layers=2, head_dim=4)
    assert result is not None and result.layers == (2,) and ResolvedSteering.from_args(result.to_args()) == result
    entries = {(e.layer, e.head): e for e in result.heads}
    assert sorted(entries) == [(1, 0), (2, 0), (3, 1)]
    one = entries[(1, 0)]
    assert (one.replace, one.weight) == (False, 2.0)
    assert np.array_equal(np.frombuffer(one.value, dtype="<f4"), diff.head_values[0].numpy())
    # (3, 1): add 2.0 * 1.5 * d, then move half... of the way to p: folded into one replacement, applied in order
    folded = entries[(3, 1)]
    d, p, slot = diff.head_values[1].double(), patch.head_values[0].double(), torch.randn(4).double()
    expected = slot + 1.5 * 2.0 * d
    expected = expected + 1.5 * 0.5 * (p - expected)
    value = torch.from_numpy(np.frombuffer(folded.value, dtype="<f4").copy()).double()
    assert folded.replace
    torch.testing.assert_close(slot + 1.5 * folded.weight * (value - slot), expected, rtol=1e-5, atol=1e-5)
    named = parse_request(over_json(steering(("diff", 2.0))), lambda name: diff)
    assert named is not None
    by_name = resolve(named, ARCH, max_layers=2, head_dim=4)
    assert by_name is not None and by_name.heads == tuple(
        e for e in resolve(parse_request(steering((diff, 2.0)), no_names), ARCH, max_layers=2, head_dim=4).heads
    )


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: resolved_heads(head_vec(((1, 2),), 0)), r"head \(1, 2\) of the function vector does not exist"),
        (lambda: resolved_heads(head_vec(((1, 0),), 0), head_dim=8), "have size 4 but this model's heads have size 8"),
        (lambda: resolved_heads(head_vec(((1, 0), (2, 0), (3, 0)), 0), max_heads=2), "FV_PLUGIN_VLLM_MAX_HEADS"),
        (lambda: steering(head_vec(((1, 0),), 0), normalize="relative"), "normalize='relative'"),
        (lambda: parse_request({**steering(head_vec(((1, 0),), 0)), "fv_head_modes": ["swap"]}, no_names), "swap"),
        (
            lambda: parse_request({**steering(head_vec(((1, 0),), 0)), "fv_head_heads": [1]}, no_names),
            "one \\[layer, head\\] pair",
        ),
    ],
)
def test_bad_head_level_vectors_say_what_is_wrong(build: Any, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def resolved_heads(fv: FunctionVector, head_dim: int = 4, max_heads: int = 40) -> ResolvedSteering | None:
    request = parse_request(steering(fv), no_names)
    assert request is not None
    return resolve(request, ARCH, max_layers=2, head_dim=head_dim, max_heads=max_heads)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({RESOLVED_KEY: {}}, "set by the server"),
        ({"fv_strenght": 1.0}, "unknown steering argument"),
        ({"fv_format": 2}, "fv_format 2"),
        ({"fv_layers": [1, 2]}, "fv_layers has 2 values"),
        ({"fv_layers": [1.0]}, "fv_layers must hold int"),
        ({"fv_weights": "1"}, "fv_weights must be a list"),
        ({"fv_vectors": ["not base64!"]}, "not base64"),
        ({"fv_vectors": ["AAA="]}, "whole number of float32"),
        ({"fv_strength": "2"}, "fv_strength must be a number"),
        ({"fv_name_weights": [1.0]}, "without fv_names"),
    ],
)
def test_malformed_arguments_say_what_is_wrong(change: dict[str, Any], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        parse_request({**steering(vec(1, 0)), **change}, no_names)


def test_plain_requests_have_no_steering() -> None:
    assert parse_request(None, no_names) is None
    assert parse_request({"other_plugin": 1}, no_names) is None


@pytest.mark.parametrize(
    ("fv", "message"),
    [
        (FunctionVector(vector=torch.ones(4), layer=1), "size 4 but the model's hidden size is 8"),
        (FunctionVector(vector=torch.ones(8), layer=6), "layer 6 is out of range: the model has 6 layers"),
        (FunctionVector(vector=torch.ones(8), layer=1, model_type="gpt2"), "made on a 'gpt2' model"),
    ],
)
def test_resolve_checks_vectors_against_the_served_model(fv: FunctionVector, message: str) -> None:
    request = parse_request(steering(fv), no_names)
    assert request is not None
    with pytest.raises(ValueError, match=message):
        resolve(request, ARCH, max_layers=4)


def resolved(*vectors: Any, **options: Any) -> ResolvedSteering | None:
    request = parse_request(over_json(steering(*vectors, **options)), no_names)
    assert request is not None
    return resolve(request, ARCH, max_layers=2)


def merged(result: ResolvedSteering | None, layer: int) -> torch.Tensor:
    assert result is not None
    data = result.vectors[result.layers.index(layer)]
    return torch.from_numpy(np.frombuffer(data, dtype="<f4").copy())


def test_vectors_at_one_layer_merge_with_their_weights() -> None:
    a, b, c = vec(2, 0), vec(2, 1), vec(5, 2)
    absolute = resolved(a, (b, -0.5), (c, 3.0), strength=2.0)
    assert absolute is not None and absolute.layers == (2, 5) and not absolute.relative
    torch.testing.assert_close(merged(absolute, 2), a.vector - 0.5 * b.vector)
    torch.testing.assert_close(merged(absolute, 5), 3.0 * c.vector)
    relative = resolved(a, (b, -0.5), normalize="relative", positions="all")
    assert relative is not None and relative.relative and relative.positions == "all"
    torch.testing.assert_close(merged(relative, 2), a.vector / a.vector.norm() - 0.5 * b.vector / b.vector.norm())


def test_a_vector_over_several_layers_travels_as_one_entry_per_layer() -> None:
    a, b = vec(2, 0), vec(5, 1)
    layered = FunctionVector.from_layers({2: a.vector, 5: b.vector}, model_type="llama")
    args = over_json(steering((layered, 2.0), normalize="relative"))
    assert args["fv_layers"] == [2, 5] and args["fv_weights"] == [2.0, 2.0]
    inline = parse_request(args, no_names)
    named = parse_request(over_json(steering(("layered", 2.0), normalize="relative")), lambda name: layered)
    for request in (inline, named):  # sent inline, or loaded by the server from FV_PLUGIN_VECTORS
        assert request is not None
        result = resolve(request, ARCH, max_layers=2)
        assert result is not None and result.layers == (2, 5)
        torch.testing.assert_close(merged(result, 2), 2.0 * a.vector / a.vector.norm())
        torch.testing.assert_close(merged(result, 5), 2.0 * b.vector / b.vector.norm())
        assert all(w == 2.0 for _, w in request.pairs)


def test_nothing_to_add_is_a_plain_request() -> None:
    assert resolved(vec(2, 0), strength=0.0) is None
    assert resolved((vec(2, 0), 0.0)) is None
    assert resolved() is None


def test_more_layers_than_the_server_allows_are_refused() -> None:
    with pytest.raises(ValueError, match="at most 2 per request; start the server with a larger"):
        resolved(vec(1, 0), vec(2, 1), vec(3, 2))


def test_resolved_steering_survives_the_trip_to_the_workers() -> None:
    result = resolved(vec(1, 0), (vec(3, 1), -1.0), strength=0.5, positions="last_prompt")
    assert result is not None
    assert ResolvedSteering.from_args(result.to_args()) == result


def test_salts_differ_exactly_when_cached_tokens_could_differ() -> None:
    base = resolved(vec(1, 0), strength=1.0)
    assert base is not None
    assert base.salt(10) == base.salt(10) and base.salt(10).startswith("fv_plugin:")
    assert base.salt(10) != base.salt(11)  # "generated" steers the last prompt token
    others = [
        resolved(vec(1, 0), strength=2.0),
        resolved(vec(1, 1)),
        resolved(vec(2, 0)),
        resolved(vec(1, 0), normalize="relative"),
    ]
    assert len({base.salt(10), *(other.salt(10) for other in others if other is not None)}) == 5
    everywhere = resolved(vec(1, 0), positions="all")
    assert everywhere is not None and everywhere.salt(10) == everywhere.salt(11)
    assert base.salt(10, "user").startswith("user|")


def test_the_frontend_rewrites_arguments_and_salts() -> None:
    frontend = Frontend(arch=ARCH, settings=PluginSettings(), named={})
    args, salt = frontend.resolved_args({**steering(vec(1, 0)), "other_plugin": 3}, prompt_length=7)
    assert set(args) == {"other_plugin", RESOLVED_KEY} and salt.startswith("fv_plugin:")
    assert frontend.resolved_args({"other_plugin": 3}, 7) == ({"other_plugin": 3}, "")
    off = Frontend(arch=ARCH, settings=PluginSettings(enabled=False), named={})
    with pytest.raises(ValueError, match="turned off"):
        off.resolved_args(steering(vec(1, 0)), 7)


def test_settings_and_the_vector_folder(tmp_path: Any) -> None:
    settings = PluginSettings.from_env({"FV_PLUGIN_VLLM": "off", "FV_PLUGIN_VLLM_MAX_LAYERS": "2"})
    assert (settings.enabled, settings.max_layers, settings.vectors_folder) == (False, 2, None)
    with pytest.raises(ValueError, match="positive integer"):
        PluginSettings.from_env({"FV_PLUGIN_VLLM_MAX_LAYERS": "many"})
    vec(1, 0).save(tmp_path / "alpha.safetensors")
    assert set(load_vector_folder(tmp_path)) == {"alpha"}
    (tmp_path / "broken.safetensors").write_bytes(b"not a vector")
    with pytest.raises(ValueError, match=r"broken\.safetensors"):
        load_vector_folder(tmp_path)
    with pytest.raises(ValueError, match="not a folder"):
        load_vector_folder(tmp_path / "missing")


def test_the_vllm_bench_makes_valid_head_level_requests() -> None:
    from types import SimpleNamespace

    from fv_plugin.benchmarks.vllm import _head_vectors

    text = SimpleNamespace(num_attention_heads=2, num_hidden_layers=6)
    config = SimpleNamespace(hf_text_config=text, get_head_size=lambda: 4, get_hidden_size=lambda: 8)
    for mode in ("head_difference", "head_patch"):
        vectors = _head_vectors(3, config, 4, mode, seed=0)
        assert len(vectors) == 3 and all(fv.method == mode for fv in vectors)
        for fv in vectors:  # heads at layers 4 and 5 only (the last layer caps the range), each once
            assert {layer for layer, _ in fv.heads or ()} <= {4, 5} and len(set(fv.heads or ())) == len(fv.heads or ())
            assert resolved_heads(dataclasses.replace(fv, model_type="llama")) is not None


def cond(layer: int, seed: int, threshold: float = 0.1) -> Any:
    from fv_plugin.condition import Condition

    return Condition(
        layer=layer, direction=torch.randn(8, generator=torch.Generator().manual_seed(seed)), threshold=threshold
    )


def test_gated_vectors_travel_with_their_conditions_and_gate_apart() -> None:
    c1, c2 = cond(1, 10), cond(0, 11, -0.2)
    a, b = dataclasses.replace(vec(2, 0), condition=c1), dataclasses.replace(vec(2, 1), condition=c2)
    same = dataclasses.replace(vec(4, 2), condition=c1)
    diff = dataclasses.replace(head_vec(((3, 1),), 3), condition=c2)
    args = over_json(steering(a, (b, -0.5), same, diff, gate=True))
    assert args["fv_gate"] and args["fv_vector_conditions"] == [0, 1, 0] and args["fv_head_conditions"] == [1]
    request = parse_request(args, no_names)
    assert request is not None and request.gate
    result = resolve(request, ARCH, max_layers=4, head_dim=4)
    assert result is not None and ResolvedSteering.from_args(result.to_args()) == result
    assert result.layers == (2, 4, 2) and result.gates == (0, 0, 1)  # layer 2 once per condition
    assert [(c.layer, c.threshold) for c in result.conditions] == [(1, c1.threshold), (0, c2.threshold)]
    assert np.array_equal(np.frombuffer(result.conditions[0].direction, dtype="<f4"), c1.direction.numpy())
    assert [e.gate for e in result.heads] == [1]
    ungated = resolve(parse_request(steering(a, (b, -0.5)), no_names), ARCH, max_layers=4)  # type: ignore[arg-type]
    assert ungated is not None and ungated.layers == (2,) and not ungated.conditions
    assert result.salt(5) != ungated.salt(5)
    named = parse_request(steering("a", gate=True), lambda name: a)
    assert named is not None and resolve(named, ARCH, max_layers=4).conditions == result.conditions[:1]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: steering(vec(2, 0), gate=True), "gate=True needs a condition on every vector, but the vector for"),
        (lambda: parse_request({**steering(vec(2, 0)), "fv_gate": True}, no_names), r"but fv_vectors\[0\] \(layer 2\)"),
        (lambda: parse_request(steering("x", gate=True), lambda name: vec(2, 0)), "the server's vector 'x' has none"),
        (lambda: steering(dataclasses.replace(vec(2, 0), condition=cond(1, 1)), positions="all", gate=True), "'all'"),
        (lambda: parse_request({**steering(vec(2, 0)), "fv_condition_layers": [1]}, no_names), "without fv_gate"),
        (
            lambda: parse_request(
                {
                    **steering(dataclasses.replace(vec(2, 0), condition=cond(1, 1)), gate=True),
                    "fv_condition_layers": [3],
                },
                no_names,
            ),
            "needs a layer below 2",
        ),
    ],
)
def test_a_bad_gate_is_refused_with_the_reason(build: Any, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_differently_gated_head_vectors_on_one_head_and_pipeline_stages_are_refused() -> None:
    one = dataclasses.replace(head_vec(((3, 1),), 3), condition=cond(1, 1))
    two = dataclasses.replace(head_vec(((3, 1),), 4), condition=cond(1, 2))
    request = parse_request(steering(one, two, gate=True), no_names)
    assert request is not None
    with pytest.raises(ValueError, match=r"different conditions act on head \(3, 1\)"):
        resolve(request, ARCH, max_layers=4, head_dim=4)
    staged = Frontend(arch=ARCH, settings=PluginSettings(), pipeline_stages=2)
    with pytest.raises(ValueError, match="pipeline parallelism"):
        staged.resolved_args(steering(dataclasses.replace(vec(2, 0), condition=cond(1, 1)), gate=True), 4)


def test_the_vllm_bench_gates_the_share_it_is_asked_for() -> None:
    from fv_plugin.benchmarks.vllm import _with_conditions

    vectors = [vec(2, seed) for seed in range(8)]
    marked = _with_conditions(vectors, 0.5)
    assert [gate for _, gate in marked] == [False, True] * 4
    for fv, gate in marked:
        assert (fv.condition is not None) == gate
        if gate:
            assert parse_request(over_json(steering(fv, gate=True)), no_names) is not None
    assert not any(gate for _, gate in _with_conditions(vectors, 0.0))


def test_a_vector_travels_with_its_own_positions_unless_told() -> None:
    last = dataclasses.replace(vec(1, 0), positions="last_prompt")
    args = over_json(steering(last))
    assert args["fv_positions"] == "last_prompt" and over_json(steering(vec(1, 0)))["fv_positions"] == "generated"
    told = parse_request(over_json(steering(last, positions="generated")), no_names)
    parsed = parse_request(args, no_names)
    assert parsed is not None and told is not None
    assert (parsed.positions, told.positions) == ("last_prompt", "generated")
    frontend = Frontend(arch=ARCH, settings=PluginSettings(), named={"last": last, "plain": vec(2, 1)})
    sent = over_json(steering("last"))  # a named vector's positions are in the server's file
    by_name = parse_request(sent, frontend.lookup)
    assert "fv_positions" not in sent and by_name is not None and by_name.positions == "last_prompt"
    both = parse_request(steering("last", "plain", positions="generated"), frontend.lookup)
    assert both is not None and both.positions == "generated"


def columns_of(resolved: ResolvedSteering | None) -> dict[tuple[int, str], np.ndarray]:
    assert resolved is not None
    modes = resolved.column_positions
    return {
        (layer, mode): np.frombuffer(data, dtype="<f4")
        for layer, data, mode in zip(resolved.layers, resolved.vectors, modes, strict=True)
    }


def test_vectors_with_different_positions_each_keep_their_own() -> None:
    last, same_layer, other = dataclasses.replace(vec(1, 0), positions="last_prompt"), vec(1, 1), vec(3, 2)
    args = over_json(steering(last, (same_layer, -0.5), other, strength=2.0))
    assert "fv_positions" not in args and args["fv_vector_positions"] == ["last_prompt", "generated", "generated"]
    request = parse_request(args, no_names)
    assert request is not None and request.positions is None
    resolved = resolve(request, ARCH, max_layers=3)
    assert resolved is not None and resolved.positions == "own"
    columns = columns_of(ResolvedSteering.from_args(resolved.to_args()))
    assert set(columns) == {(1, "last_prompt"), (1, "generated"), (3, "generated")}
    np.testing.assert_allclose(columns[(1, "last_prompt")], last.vector.numpy())
    np.testing.assert_allclose(columns[(1, "generated")], -0.5 * same_layer.vector.numpy(), rtol=1e-6)
    told = resolve(parse_request(steering(last, same_layer, positions="last_prompt"), no_names), ARCH, max_layers=3)
    assert set(columns_of(told)) == {(1, "last_prompt")}  # one mode for all: one column per layer
    with pytest.raises(ValueError, match="per condition and positions mode"):
        resolve(request, ARCH, max_layers=2)
    pair = [resolve(parse_request(steering(v, other), no_names), ARCH, max_layers=3) for v in (last, vec(1, 0))]
    assert len({found.salt(5) for found in pair if found is not None}) == 2  # other positions: another salt


def test_named_and_head_level_vectors_keep_their_own_positions() -> None:
    last_heads = dataclasses.replace(head_vec(((1, 0),), 0), positions="last_prompt")
    frontend = Frontend(arch=ARCH, settings=PluginSettings(), named={"plain": vec(2, 1)})
    args = over_json(steering(last_heads, "plain", dataclasses.replace(vec(4, 2), positions="last_prompt")))
    assert (args["fv_head_positions"], args["fv_vector_positions"]) == (["last_prompt"], ["last_prompt"])
    resolved = resolve(parse_request(args, frontend.lookup), ARCH, max_layers=3, head_dim=4)
    assert set(columns_of(resolved)) == {(2, "generated"), (4, "last_prompt")}
    assert resolved is not None and [entry.positions for entry in resolved.heads] == ["last_prompt"]
    clash = steering(last_heads, head_vec(((1, 0),), 1))
    with pytest.raises(ValueError, match=r"positions \(last_prompt and generated, their own\) act on head \(1, 0\)"):
        resolve(parse_request(clash, no_names), ARCH, max_layers=3, head_dim=4)


def test_a_vector_steered_at_every_token_keeps_its_positions_but_cannot_be_gated() -> None:
    every = dataclasses.replace(vec(1, 0), positions="all")
    args = over_json(steering(every, vec(2, 1)))
    assert args["fv_vector_positions"] == ["all", "generated"]
    assert set(columns_of(resolve(parse_request(args, no_names), ARCH, max_layers=3))) == {(1, "all"), (2, "generated")}
    gated = dataclasses.replace(every, condition=cond(0, 1))
    with pytest.raises(ValueError, match="on vLLM \\(whether given or a vector's own\\)"):
        steering(gated, gate=True)
    sent = steering(gated, gate=True, positions="generated")  # as a client that sends its own positions would
    sent.pop("fv_positions")
    with pytest.raises(ValueError, match="cannot be served exactly on vLLM"):
        parse_request({**sent, "fv_vector_positions": ["all"]}, no_names)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"fv_vector_positions": ["answer"]}, r"fv_vector_positions\[0\] must be one of"),
        ({"fv_vector_positions": ["generated", "generated"]}, "one positions mode per vector entry"),
        ({"fv_positions": "generated"}, "send one of them"),
    ],
)
def test_own_positions_that_cannot_be_served_are_refused(change: dict[str, Any], match: str) -> None:
    args = {**steering(dataclasses.replace(vec(1, 0), positions="last_prompt"), "x"), **change}
    args.pop("fv_names"), args.pop("fv_name_weights", None)
    with pytest.raises(ValueError, match=match):
        parse_request(args, no_names)
