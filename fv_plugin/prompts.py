"""Prompts: N-shot ICL, zero-shot and shuffled-label prompts, and their tokens with the answer's first token.

A prompt's text ends right before the answer; the answer keeps the separator that precedes it in the template
(``" cold"`` for ``"Q: {x}\\nA: {y}\\n\\n"``), so its first token is the one the model should predict next.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fv_plugin.tasks import Pair, Task

if TYPE_CHECKING:  # torch is imported where prompts become tensors, so the settings that name a template stay light
    import torch

__all__ = [
    "DEFAULT_TEMPLATE",
    "EncodedPrompts",
    "Prompt",
    "PromptTemplate",
    "by_length",
    "encode_prompts",
    "make_prompts",
    "prompt_tokenizer",
]

DEFAULT_TEMPLATE = "Q: {x}\nA: {y}\n\n"


@dataclass(frozen=True)
class PromptTemplate:
    """A demonstration template with ``{x}`` (input) and ``{y}`` (output), e.g. ``"Q: {x}\\nA: {y}\\n\\n"``."""

    template: str = DEFAULT_TEMPLATE

    def __post_init__(self) -> None:
        text = self.template
        if text.count("{x}") != 1 or text.count("{y}") != 1 or text.index("{x}") > text.index("{y}"):
            raise ValueError(f"a template needs one '{{x}}' followed by one '{{y}}', got {text!r}")

    @property
    def _query_part(self) -> tuple[str, str]:
        head = self.template[: self.template.index("{y}")]
        stripped = head.rstrip(" ")
        return stripped, head[len(stripped) :]  # (query text, separator that starts the answer)

    def demo(self, pair: Pair, output: str | None = None) -> str:
        return self.template.replace("{x}", pair.input).replace("{y}", pair.output if output is None else output)

    def query(self, pair: Pair) -> str:
        return self._query_part[0].replace("{x}", pair.input)

    def answer(self, text: str) -> str:
        return self._query_part[1] + text


@dataclass(frozen=True)
class Prompt:
    """One prompt: ``text`` ends where the answer starts; ``answers`` carry the template's separator."""

    text: str
    answers: tuple[str, ...]
    query: Pair
    demos: tuple[Pair, ...] = ()
    shuffled: bool = False

    @property
    def answer(self) -> str:
        return self.answers[0]


def _prompt(template: PromptTemplate, query: Pair, demos: Sequence[Pair], outputs: Sequence[str] | None) -> Prompt:
    labels = list(outputs) if outputs is not None else [d.output for d in demos]
    text = "".join(template.demo(d, y) for d, y in zip(demos, labels, strict=True)) + template.query(query)
    return Prompt(
        text=text,
        answers=tuple(template.answer(a) for a in query.answers),
        query=query,
        demos=tuple(demos),
        shuffled=outputs is not None,
    )


def make_prompts(
    task: Task,
    *,
    n: int | None = None,
    n_shots: int = 10,
    split: str = "test",
    shuffle_labels: bool = False,
    template: str | PromptTemplate = DEFAULT_TEMPLATE,
    seed: int = 0,
) -> list[Prompt]:
    """Prompts whose queries come from ``split`` and whose demonstrations come from ``train``.

    Args:
        task: the task.
        n: number of prompts (queries are cycled through, reshuffled each round); default: one per query.
        n_shots: demonstrations per prompt (0 gives zero-shot prompts).
        split: ``"train"``, ``"valid"`` or ``"test"``.
        shuffle_labels: permute the demonstrations' outputs among themselves (the AIE's corrupted prompts).
        template: demonstration template.
        seed: seeds a local generator; nothing global is touched.
    """
    if split not in ("train", "valid", "test"):
        raise ValueError(f"split must be 'train', 'valid' or 'test', got {split!r}")
    if n_shots < 0:
        raise ValueError(f"n_shots must be >= 0, got {n_shots}")
    tmpl = template if isinstance(template, PromptTemplate) else PromptTemplate(template)
    queries = list(getattr(task, split))
    if not queries:
        raise ValueError(f"task {task.name!r} has no {split} pairs")
    pool = list(task.train)
    if n_shots and len(pool) < n_shots + 1:
        raise ValueError(f"task {task.name!r} has {len(pool)} training pairs, too few for {n_shots}-shot prompts")
    rng = random.Random(seed)
    count = len(queries) if n is None else n
    order: list[Pair] = []
    while len(order) < count:
        round_ = queries[:]
        rng.shuffle(round_)
        order.extend(round_)
    prompts = []
    for query in order[:count]:
        demos = rng.sample([p for p in pool if p.input != query.input], n_shots) if n_shots else []
        outputs = None
        if shuffle_labels and n_shots:
            outputs = [d.output for d in demos]
            rng.shuffle(outputs)
        prompts.append(_prompt(tmpl, query, demos, outputs))
    return prompts


@dataclass(frozen=True)
class EncodedPrompts:
    """Left-padded tokens of prompts (so the last position is every row's final prompt token).

    Attributes:
        input_ids, attention_mask: ``[batch, seq]``.
        answer_ids: first token of each prompt's main answer, ``[batch]``.
        answer_tokens: all tokens of each accepted answer, per prompt.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    answer_ids: torch.Tensor
    answer_tokens: tuple[tuple[tuple[int, ...], ...], ...]


def _answer_tokens(tokenizer: Any, prompt_ids: list[int], text: str, answer: str) -> tuple[int, ...]:
    full = tokenizer(text + answer, add_special_tokens=True)["input_ids"]
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        return tuple(full[len(prompt_ids) :])
    alone = tokenizer(answer, add_special_tokens=False)["input_ids"]  # the answer merged across the boundary
    if not alone:
        raise ValueError(f"answer {answer!r} tokenizes to nothing")
    return tuple(alone)


# what a prepended BOS token adds to each per-token list of an encoding
_BOS_ENTRIES: dict[str, Any] = {
    "attention_mask": 1,
    "offset_mapping": (0, 0),
    "token_type_ids": 0,
    "special_tokens_mask": 1,
}


class _BosFirst:
    """A tokenizer whose encodings (with special tokens) start with its BOS token; see :func:`prompt_tokenizer`."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.bos_first = True

    def __getattr__(self, name: str) -> Any:  # only called for names the wrapper lacks
        return getattr(self.__dict__["tokenizer"], name)

    def __call__(self, text: str | Sequence[str], **options: Any) -> Any:
        inner = self.tokenizer
        if not options.get("add_special_tokens", True):
            return inner(text, **options)
        layout = {k: options.pop(k) for k in ("return_tensors", "padding", "padding_side") if k in options}
        rows = inner([text] if isinstance(text, str) else list(text), **options)
        bos = int(inner.bos_token_id)
        for i, ids in enumerate(rows["input_ids"]):
            if ids[:1] != [bos]:
                rows["input_ids"][i] = [bos, *ids]
                for key, first in _BOS_ENTRIES.items():
                    if key in rows:
                        rows[key][i] = [first, *rows[key][i]]
        if layout.get("return_tensors") is not None or layout.get("padding"):
            side = {"padding_side": layout["padding_side"]} if "padding_side" in layout else {}
            features = {k: v for k, v in rows.items() if k in ("input_ids", "attention_mask")}
            return inner.pad(features, padding=True, return_tensors=layout.get("return_tensors"), **side)
        return rows if not isinstance(text, str) else {k: v[0] for k, v in rows.items()}


def prompt_tokenizer(tokenizer: Any, *, prepend_bos: bool) -> Any:
    """``tokenizer``, or with ``prepend_bos`` a wrapper whose encodings with special tokens start with the model's
    BOS token (as the paper's code starts every prompt; SmolLM2's tokenizer adds none itself).

    Every prompt fv_plugin tokenizes goes through the tokenizer this returns: extraction and evaluation wrap theirs
    with the setting of :attr:`ExtractionConfig.prepend_bos` (a vector keeps it: ``fv.prepend_bos``), so prompts
    you steer should be tokenized the same way. A tokenizer that already starts with BOS gets none added twice;
    encodings without special tokens (answers, chat templates) are left alone.

    Example:
        >>> tok = prompt_tokenizer(tokenizer, prepend_bos=fv.prepend_bos)  # doctest: +SKIP
        >>> ids = tok("Q: hot\nA:")["input_ids"]  # doctest: +SKIP
    """
    if not isinstance(prepend_bos, bool):
        raise TypeError(f"prepend_bos must be True or False, got {prepend_bos!r}")
    inner = tokenizer.tokenizer if isinstance(tokenizer, _BosFirst) else tokenizer
    if not prepend_bos:
        return inner
    if getattr(inner, "bos_token_id", None) is None:
        raise ValueError(
            f"prepend_bos=True, but the tokenizer ({type(inner).__name__}) has no BOS token; "
            "set prepend_bos=False (ExtractionConfig / EvalConfig) for this model"
        )
    return _BosFirst(inner)


def by_length(tokenizer: Any, prompts: Sequence[Prompt]) -> list[int]:
    """Indices of ``prompts`` from the fewest tokens to the most: batches of neighbours pad little."""
    lengths = [len(tokenizer(p.text)["input_ids"]) for p in prompts]
    return sorted(range(len(prompts)), key=lambda i: lengths[i])


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt], *, chat: bool = False) -> EncodedPrompts:
    """Tokenize prompts (left padding) and find their answers' tokens.

    Args:
        chat: wrap each prompt as a user message with the tokenizer's chat template (instruct models).
    """
    import torch

    if not prompts:
        raise ValueError("no prompts to encode")
    texts = [p.text for p in prompts]
    if chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("chat=True needs a tokenizer with a chat template")
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            for t in texts
        ]
    ids = [tokenizer(t, add_special_tokens=not chat)["input_ids"] for t in texts]
    answers = tuple(
        tuple(_answer_tokens(tokenizer, row, text, a) for a in p.answers)
        for row, text, p in zip(ids, texts, prompts, strict=True)
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), width), int(pad), dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    first = torch.tensor([a[0][0] for a in answers], dtype=torch.long)
    return EncodedPrompts(input_ids=input_ids, attention_mask=mask, answer_ids=first, answer_tokens=answers)
