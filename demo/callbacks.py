"""The demo's callbacks: what each button of the page does, bound to one shared engine and extractor.

:mod:`demo.ui` lays the page out around a :class:`DemoApp`; :mod:`demo.app` loads the model and starts the
server.
"""

from __future__ import annotations

import functools
import inspect
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr
import numpy as np
import torch

import fv_plugin
import fv_plugin.viz
from demo.effects import effects_table, extract_figures, side_effects_note, text_sentence
from demo.engine import (
    DemoError,
    Engine,
    ShippedEffects,
    SteerRequest,
    SteerView,
    TokenProbs,
    builtin_task,
)
from demo.extractor import Extractor
from fv_plugin.report import selection_table
from fv_plugin.side_effects import TextEffects

logger = logging.getLogger("fv_demo")

NONE = "(none)"
OWN_LAYER = "each vector's own layer"

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class OwnVector:
    """A vector a user extracted in this session, the task it came from (its ICL demonstrations), and what it
    does to neutral text."""

    fv: fv_plugin.FunctionVector
    task: fv_plugin.Task
    text: TextEffects | None = None


Own = Mapping[str, OwnVector]


def page_error(exc: Exception) -> gr.Error:
    """The message a failure shows in the page (internal details only in the log)."""
    if isinstance(exc, DemoError):
        return gr.Error(str(exc))
    if isinstance(exc, (ValueError, TypeError)):
        return gr.Error(f"That did not work: {exc}")
    logger.error("request failed", exc_info=exc)
    return gr.Error(f"Something went wrong ({type(exc).__name__}); please try again.")


def shows_errors(fn: F) -> F:
    """Turn every failure into a message in the page instead of a dead request (generators stay generators,
    so that Gradio still streams them)."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def streaming(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as exc:
                raise page_error(exc) from exc

        return streaming  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:
            raise page_error(exc) from exc

    return wrapper  # type: ignore[return-value]


def render(probs: TokenProbs) -> np.ndarray:
    """The probability chart as an RGB image (drawn once per request; the page gets it as a PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = fv_plugin.viz.plot_token_probs(probs.tokens, probs.series, title="the first new token")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def gate_text(names: list[str], view: SteerView) -> str:
    """What the gate decided for each of the request's vectors (``names``, in order), for the page."""
    if view.gate is None:
        return "**Gate off**: every chosen vector steers the prompt."
    lines = ["**Gate on** (each vector steers only prompts that pass its learned condition):"]
    for name, passed in zip(names, view.gate, strict=True):
        if passed is None:
            lines.append(f"- *{name}*: no condition — steered ungated")
        elif passed:
            lines.append(f"- *{name}*: condition passed — steered")
        else:
            lines.append(f"- *{name}*: condition not passed — not steered (its steered column is the plain model's)")
    return "\n".join(lines)


def status(view: SteerView, start: float) -> str:
    """Where the request is: generating, or done (in how long, and with how many others in its batch)."""
    if not view.done:
        return "Generating…"
    others = view.shared - 1
    company = f", shared with {others} other request{'s' * (others != 1)}" if others else ""
    return f"Done in {time.perf_counter() - start:.1f} s: one `generate` call{company}."


class DemoApp:
    """The UI's callbacks, bound to one :class:`Engine` (every user shares it; each user's own vectors are
    State) and one :class:`Extractor`."""

    def __init__(
        self,
        engine: Engine,
        extractor: Extractor,
        cross_model: dict[str, dict[str, fv_plugin.FunctionVector]] | None = None,
        side_effects: ShippedEffects | None = None,
    ) -> None:
        self.engine = engine
        self.extractor = extractor
        self.cross_model = cross_model or {}
        self.side_effects = side_effects

    def vector_names(self, own: Own | None = None) -> list[str]:
        return sorted({*self.engine.vectors, *(own or {})})

    def task_for(self, name: str, own: Own | None) -> fv_plugin.Task | None:
        """The task whose demonstrations fill the ICL column for vector ``name`` (``None``: unknown)."""
        if own and name in own:
            return own[name].task
        fv = self.engine.vectors.get(name)
        return builtin_task(fv.task) if fv is not None and fv.task else None

    def request(
        self,
        prompt: str,
        choices: list[tuple[str, float]],
        layer: str,
        strength: float,
        positions: str,
        max_new_tokens: float,
        own: Own | None,
        gate: bool = True,
    ) -> SteerRequest:
        """The UI's values as a :class:`SteerRequest` (vectors by name, from the shared set and the user's own)."""
        chosen = [(v, w) for v, w in choices if v and v != NONE]
        pairs = self.engine.resolve(chosen, {name: mine.fv for name, mine in (own or {}).items()})
        return SteerRequest(
            prompt=prompt,
            pairs=pairs,
            strength=float(strength),
            layer=None if layer in (None, "", OWN_LAYER) else int(layer),
            positions=positions,
            max_new_tokens=int(max_new_tokens),
            task=self.task_for(chosen[0][0], own) if chosen else None,
            gate=bool(gate),
        )

    def steer(
        self,
        prompt: str,
        vector1: str,
        weight1: float,
        vector2: str,
        weight2: float,
        vector3: str,
        weight3: float,
        layer: str,
        strength: float,
        positions: str,
        max_new_tokens: float,
        gate: bool = True,
        own: Own | None = None,
    ) -> Iterator[tuple[str, str, str, Any, str, str]]:
        """Streams (unsteered, steered, ICL, probability chart, note, gate) as the tokens arrive; ``gate``: steer
        with each vector only if the prompt passes its condition (the last item says what was decided)."""
        choices = [(vector1, weight1), (vector2, weight2), (vector3, weight3)]
        request = self.request(prompt, choices, layer, strength, positions, max_new_tokens, own, gate)
        names = [v for v, _ in choices if v and v != NONE]
        image, start = None, time.perf_counter()
        for view in self.engine.steer_stream(request):
            chart: Any = gr.skip()
            if image is None and view.probs is not None:
                image = chart = render(view.probs)
            elif view.done:
                chart = image  # the last update carries the chart again, for API users
            note = f"{view.note}  \n{status(view, start)}"
            yield view.unsteered, view.steered, view.icl or "", chart, note, gate_text(names, view)

    def extract(
        self,
        builtin: str | None,
        upload: str | None,
        method: str,
        own: Own | None,
        progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008 - gradio's documented idiom
    ) -> tuple[Any, ...]:
        """Extract a vector; returns the summary, the figures, the top tokens, the file, the user's vectors and
        the updated vector choices."""
        if upload:
            task = self.extractor.check_task_file(upload)
        elif builtin:
            task = fv_plugin.load_task(builtin)
        else:
            raise DemoError("Pick a built-in task or upload a task file.")
        progress(0, desc="extracting")
        result = self.extractor.extract(task, method=method, progress=True)
        fv = result.fv
        name = f"{task.name} ({fv.method}, yours)"
        mine = {**(own or {}), name: OwnVector(fv, task, result.text)}
        summary = (
            f"**{task.name}**: {fv.method} vector at layer {fv.layer}, extracted in {result.seconds:.1f} s.  \n"
            f"Zero-shot first-token accuracy on {result.n_test} test queries: **{result.before:.2f} → "
            f"{result.after:.2f}** with the vector ({self.extractor.settings.n_shots}-shot prompts: "
            f"{result.icl:.2f}).  \n{text_sentence(result.text)}  \nIt is now in the Steer tab as *{name}*."
        )
        if fv.selection is not None:
            summary += "\n\n**How `auto` chose** (validation):\n\n" + selection_table(fv.selection, top=4)
        scores = fv_plugin.top_tokens(self.engine.model, self.engine.tokenizer, fv, k=10)
        tokens = [[repr(t.token), round(t.logit, 2), round(t.prob, 4)] for t in scores]
        path = fv.save(Path(tempfile.mkdtemp(prefix="fv-")) / f"{task.name}-{fv.method}.safetensors")
        names = self.vector_names(mine)
        updates = [gr.update(choices=names), gr.update(choices=[NONE, *names]), gr.update(choices=[NONE, *names])]
        return (summary, *extract_figures(fv, result.text), tokens, str(path), mine, *updates)

    def compare(self, own: Own | None) -> tuple[Any, Any, str, Any, Any, str]:
        """The similarity matrix of every available vector, the cross-model view when there is one, and what the
        shipped vectors (and the user's) change besides their task: specificity plots and neutral-text table."""
        figure, cross, text = self.geometry(own)
        spec = self.side_effects.specificity if self.side_effects is not None else None
        zero = fv_plugin.viz.plot_specificity(spec, "zero_shot") if spec is not None else None
        icl = fv_plugin.viz.plot_specificity(spec, "icl") if spec is not None else None
        effects = dict(self.side_effects.text) if self.side_effects is not None else {}
        effects |= {name: mine.text for name, mine in (own or {}).items() if mine.text is not None}
        note = "Side effects: none measured for these vectors (demo/build_vectors.py measures them)."
        if spec is not None or effects:
            note = side_effects_note(spec) + "\n\n" + effects_table(effects)
        return figure, cross, text, zero, icl, note

    def geometry(self, own: Own | None) -> tuple[Any, Any, str]:
        """The similarity matrix of every available vector, and the cross-model view when there is one."""
        pool = {**self.engine.vectors, **{name: mine.fv for name, mine in (own or {}).items()}}
        if not pool:
            raise DemoError("There are no vectors to compare yet: extract one first.")
        names = sorted(pool)
        figure = fv_plugin.viz.plot_similarity(
            [pool[n] for n in names], names, title=f"cosine similarity ({self.engine.model_name})"
        )
        cross, text = None, "Cross-model view: needs the precomputed vectors of two models."
        if len(self.cross_model) >= 2:
            cross, text = self.cross_view()
        return figure, cross, text

    def cross_view(self) -> tuple[Any, str]:
        (name_a, set_a), (name_b, set_b) = list(self.cross_model.items())[:2]
        tasks = sorted(set(set_a) & set(set_b))
        if len(tasks) < 3:
            return None, "Cross-model view: the two models' precomputed vectors share fewer than three tasks."
        sim_a = fv_plugin.similarity_matrix([set_a[t] for t in tasks])
        sim_b = fv_plugin.similarity_matrix([set_b[t] for t in tasks])
        rows, cols = torch.triu_indices(len(tasks), len(tasks), offset=1)
        a, b = sim_a[rows, cols], sim_b[rows, cols]
        corr = float(((a - a.mean()) * (b - b.mean())).sum() / ((a - a.mean()).norm() * (b - b.mean()).norm()))
        both = sim_a.triu(1) + sim_b.tril(-1) + sim_a.diag().diag()
        fig = fv_plugin.viz.plot_similarity(both, tasks, title=f"upper right: {name_a}; lower left: {name_b}")
        text = (
            f"The two models have different hidden sizes, so their vectors cannot be compared directly; their "
            f"*task geometry* can. Pearson correlation of the {len(a)} task-pair similarities between "
            f"{name_a} and {name_b}: **{corr:.2f}**."
        )
        return fig, text
