"""Per-row state a steering keeps across the forwards of one call: the gate's decision per row (``gate=True``,
:mod:`fv_plugin.gating`) and where each row's answer ended (``positions="answer"``).

Both are decided from what one forward carries and kept in the call's :class:`~fv_plugin.runtime.CallState`, so
they stay right under the KV cache (one new token per forward), without it (the whole sequence again) and with
padding.
"""

from __future__ import annotations

from typing import Any

import torch

from fv_plugin.positions import ForwardInfo, answer_ended

# The steering (runtime.ActiveSteering) and the call (runtime.CallState) are typed Any: runtime imports this module.

__all__ = ["decide_gate", "gate_rows", "track_answer"]


def gate_rows(steering: Any, call: Any, device: torch.device) -> torch.Tensor:
    decided = call.gates.get(id(steering))
    if decided is None:
        raise RuntimeError(
            "fv_plugin: gate=True decides at each prompt's last token, but this forward continues a prompt whose "
            "forward pass ran outside the steering block; run the whole generate() call inside it"
        )
    return decided.to(device)


def decide_gate(steering: Any, hidden: torch.Tensor, call: Any, layer: int) -> None:
    """At the gate's layer: decide for the rows whose final prompt token is in this forward."""
    info, prompt, gate = call.forward, call.prompt, steering.gate
    if info is None or prompt is None or gate is None or info.past >= prompt.length:
        return  # decoding: the decision is kept
    if hidden.dim() != 3 or hidden.shape[0] != info.batch or hidden.shape[1] != info.length:
        raise RuntimeError(
            f"fv_plugin: layer {layer} produced hidden states of shape {tuple(hidden.shape)}, not {info}"
        )
    local = prompt.last.to(hidden.device) - info.past
    inside = (local >= 0) & (local < info.length)
    rows = torch.arange(info.batch, device=hidden.device)
    passed = gate.passes(hidden[rows, local.clamp(0, info.length - 1)]).float()
    before = call.gates.get(id(steering))
    call.gates[id(steering)] = torch.where(inside, passed, before.to(passed) if before is not None else 0.0)


def track_answer(call: Any, info: ForwardInfo, ends: torch.Tensor) -> None:
    """positions="answer": which new tokens come at or after their row's first generated end token."""
    prompt = call.prompt
    if prompt is None:
        return
    before = None
    if info.past >= prompt.length:  # continuing after the prompt: carry the state of the tokens before
        if call.answer_state is None or call.answer_state[0] != info.past:
            raise RuntimeError(
                "fv_plugin: positions='answer' follows each row's generated tokens in order; this forward starts at "
                f"position {info.past} but the tokens seen so far end at "
                f"{None if call.answer_state is None else call.answer_state[0]}"
            )
        before = call.answer_state[1]
    call.ended = answer_ended(info, prompt, ends, before)
    last = call.ended[:, -1] if info.length else torch.zeros(info.batch, dtype=torch.bool)
    call.answer_state = (info.past + info.length, last)
