"""What ``gate=True`` keeps and what it removes, for saved vectors that carry a condition.

For each vector (a ``.safetensors`` file named after its built-in task), on the embedded model:

- the condition's pass rate on the task's *test* queries (never used to learn it), on those queries as chat
  messages, and on the neutral paragraphs (``fv_plugin.neutral_texts()``, not used to learn it either), raw and
  as chat messages;
- first-token accuracy of the test queries: plain, steered, and steered with ``gate=True``;
- the share of 24-token greedy continuations of the neutral paragraphs identical to the plain model's, steered
  and gated.

Run (about a minute per vector on a quiet 2-core CPU):

    python examples/gate_effects.py demo/vectors/smollm2-135m-instruct/*.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

import fv_plugin

NEW_TOKENS = 24


def _chat(tokenizer: Any, texts: list[str]) -> list[str]:
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in texts
    ]


def pass_rate(model: Any, tokenizer: Any, fv: fv_plugin.FunctionVector, texts: list[str]) -> float:
    """Share of ``texts`` whose last-token state passes ``fv.condition`` (computed directly from hidden states)."""
    condition = fv.condition
    assert condition is not None
    states = fv_plugin.last_token_hidden_states(model, tokenizer, texts, [condition.layer])[condition.layer]
    return float(condition.passes(states).float().mean())


@torch.no_grad()
def accuracy(model: Any, tokenizer: Any, prompts: list[fv_plugin.Prompt], vectors: list[Any], gate: bool) -> float:
    enc = fv_plugin.encode_prompts(tokenizer, prompts)
    with fv_plugin.steer(model, *vectors, gate=gate):
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits[:, -1]
    firsts = [{answer[0] for answer in answers} for answers in enc.answer_tokens]
    return sum(int(t) in ok for t, ok in zip(logits.argmax(-1).tolist(), firsts, strict=True)) / len(prompts)


@torch.no_grad()
def continuations(model: Any, tokenizer: Any, texts: list[str], vectors: list[Any], gate: bool) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, len(texts), 8):
        enc = tokenizer(texts[start : start + 8], return_tensors="pt", padding=True, padding_side="left")
        with fv_plugin.steer(model, *vectors, gate=gate):
            ids = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out += ids[:, enc["input_ids"].shape[1] :].tolist()
    return out


def report(model: Any, tokenizer: Any, path: Path) -> None:
    fv = fv_plugin.FunctionVector.load(path)
    if fv.condition is None:
        print(f"{path.stem}: no condition (rebuild it, or: python demo/build_vectors.py --conditions-only)")
        return
    task = fv_plugin.load_task(path.stem)
    test = fv_plugin.make_prompts(task, n_shots=0, split="test")
    neutral = [" ".join(p.split(". ")[:1]) for p in fv_plugin.neutral_texts()]  # first sentence of each
    rates = {
        "test queries": pass_rate(model, tokenizer, fv, [p.text for p in test]),
        "test queries as chat": pass_rate(model, tokenizer, fv, _chat(tokenizer, [p.text for p in test])),
        "neutral": pass_rate(model, tokenizer, fv, neutral),
        "neutral as chat": pass_rate(model, tokenizer, fv, _chat(tokenizer, neutral)),
    }
    acc = {name: accuracy(model, tokenizer, test, vecs, gate) for name, vecs, gate in _variants(fv)}
    plain = continuations(model, tokenizer, neutral, [], False)
    same = {
        name: sum(a == b for a, b in zip(continuations(model, tokenizer, neutral, [fv], gate), plain, strict=True))
        / len(plain)
        for name, gate in (("steered", False), ("gated", True))
    }
    print(f"{path.stem}: condition layer {fv.condition.layer}, vector {fv.method} from layer {fv.first_layer}")
    print("  condition passes: " + ", ".join(f"{k} {v:.2f}" for k, v in rates.items()))
    print(f"  test first-token accuracy ({len(test)} queries): " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    print(
        f"  neutral continuations identical to plain ({len(plain)}): "
        + ", ".join(f"{k} {v:.2f}" for k, v in same.items())
    )


def _variants(fv: fv_plugin.FunctionVector) -> list[tuple[str, list[Any], bool]]:
    return [("plain", [], False), ("steered", [fv], False), ("gated", [fv], True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("vectors", nargs="+", type=Path, help="vector files named <task>.safetensors")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    model, tokenizer = fv_plugin.load_model(args.model)
    for path in args.vectors:
        report(model, tokenizer, path)


if __name__ == "__main__":
    main()
