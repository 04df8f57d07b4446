"""Function vectors, live: a Gradio app that steers a small model with vectors extracted from examples.

Run from the repository root:

    python demo/app.py                      # the embedded default model, http://127.0.0.1:7860
    python demo/app.py --model gemma-3-270m # or FV_DEMO_MODEL=gemma-3-270m

On a Hugging Face Space (``app_file: demo/app.py``) the same model is read from the Hub.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

if __package__ in (None, ""):  # run as a script (python demo/app.py, or a Space): make `demo` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradio as gr
import torch

import fv_plugin
import fv_plugin.viz
from demo.engine import METHODS, POSITIONS, DemoError, Engine, ExtractSettings, available_vector_sets

logger = logging.getLogger("fv_demo")

DEFAULT_MODEL = "smollm2-135m-instruct"
NONE = "(none)"
OWN_LAYER = "each vector's own layer"
QUEUE_SIZE = 32
CONCURRENCY = 4
EXAMPLES = [
    ["Q: hot\nA:", "antonym"],
    ["Q: France\nA:", "country-capital"],
    ["Q: run\nA:", "present-past"],
    ["Q: mouse\nA:", "singular-plural"],
    ["Q: apple\nA:", "capitalize"],
]
INTRO = """# Function vectors, live
A **function vector** is one vector, taken from a model's activations on a few examples of a task, that makes the
same model do the task without examples. Type a zero-shot prompt, pick a vector and press **Steer**: the left box
is the plain model, the right box is the same call with the vector added to the residual stream
(Todd et al., *Function Vectors in Large Language Models*, ICLR 2024). Model: **{model}**."""

F = TypeVar("F", bound=Callable[..., Any])


def shows_errors(fn: F) -> F:
    """Turn every failure into a message in the page instead of a dead request."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except DemoError as exc:
            raise gr.Error(str(exc)) from exc
        except (ValueError, TypeError) as exc:
            raise gr.Error(f"That did not work: {exc}") from exc
        except Exception as exc:
            logger.exception("request failed")
            raise gr.Error(f"Something went wrong ({type(exc).__name__}); please try again.") from exc

    return wrapper  # type: ignore[return-value]


class DemoApp:
    """The UI's callbacks, bound to one :class:`Engine` (every user shares it; each user's vectors are State)."""

    def __init__(self, engine: Engine, cross_model: dict[str, dict[str, fv_plugin.FunctionVector]] | None = None):
        self.engine = engine
        self.cross_model = cross_model or {}

    def vector_names(self, user_vectors: dict[str, fv_plugin.FunctionVector] | None = None) -> list[str]:
        return sorted({*self.engine.vectors, *(user_vectors or {})})

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
        user_vectors: dict[str, fv_plugin.FunctionVector] | None = None,
    ) -> tuple[str, str]:
        """(unsteered, steered) continuations of ``prompt``."""
        choices = [(v, w) for v, w in ((vector1, weight1), (vector2, weight2), (vector3, weight3)) if v and v != NONE]
        pairs = self.engine.resolve(choices, user_vectors)
        at = None if layer in (None, "", OWN_LAYER) else int(layer)
        result = self.engine.steer_pair(
            prompt,
            pairs,
            strength=float(strength),
            layer=at,
            positions=positions,
            max_new_tokens=int(max_new_tokens),
        )
        return result.unsteered, result.steered

    def extract(
        self,
        builtin: str | None,
        upload: str | None,
        method: str,
        user_vectors: dict[str, fv_plugin.FunctionVector] | None,
        progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008 - gradio's documented idiom
    ) -> tuple[Any, ...]:
        """Extract a vector; returns the summary, the figures, the top tokens, the file and the updated vectors."""
        if upload:
            task = self.engine.check_task_file(upload)
        elif builtin:
            task = fv_plugin.load_task(builtin)
        else:
            raise DemoError("Pick a built-in task or upload a task file.")
        progress(0, desc="extracting")
        result = self.engine.extract(task, method=method, progress=True)
        fv = result.fv
        name = f"{task.name} ({fv.method}, yours)"
        mine = {**(user_vectors or {}), name: fv}
        summary = (
            f"**{task.name}**: {fv.method} vector at layer {fv.layer}, extracted in {result.seconds:.1f} s.  \n"
            f"Zero-shot first-token accuracy on {result.n_test} test queries: **{result.before:.2f} → "
            f"{result.after:.2f}** with the vector ({self.engine.settings.n_shots}-shot prompts: {result.icl:.2f}).  \n"
            f"It is now in the Steer tab as *{name}*."
        )
        heatmap = fv_plugin.viz.plot_aie(fv) if fv_plugin.aie_matrix(fv) is not None else None
        curve = fv_plugin.viz.plot_layer_curve(fv) if fv.layer_sweep is not None else None
        scores = fv_plugin.top_tokens(self.engine.model, self.engine.tokenizer, fv, k=10)
        tokens = [[repr(t.token), round(t.logit, 2), round(t.prob, 4)] for t in scores]
        folder = Path(tempfile.mkdtemp(prefix="fv-"))
        path = fv.save(folder / f"{task.name}-{fv.method}.safetensors")
        names = self.vector_names(mine)
        updates = [gr.update(choices=names), gr.update(choices=[NONE, *names]), gr.update(choices=[NONE, *names])]
        return (summary, heatmap, curve, tokens, str(path), mine, *updates)

    def compare(self, user_vectors: dict[str, fv_plugin.FunctionVector] | None) -> tuple[Any, Any, str]:
        """The similarity matrix of every available vector, and the cross-model view when there is one."""
        pool = {**self.engine.vectors, **(user_vectors or {})}
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


def build_app(app: DemoApp) -> gr.Blocks:
    """The Blocks UI around ``app``'s callbacks."""
    engine = app.engine
    names = app.vector_names()
    first = "antonym" if "antonym" in names else (names[0] if names else None)
    layers = [OWN_LAYER, *(str(i) for i in range(engine.num_layers))]
    limits = engine.limits
    with gr.Blocks(title="Function vectors, live", analytics_enabled=False) as demo:
        gr.Markdown(INTRO.format(model=engine.model_name))
        user_vectors = gr.State({})
        with gr.Tab("Steer"):
            with gr.Row():
                with gr.Column(scale=1):
                    vector1 = gr.Dropdown(names, value=first, label="Vector", elem_id="vector1")
                    weight1 = gr.Slider(-limits.max_weight, limits.max_weight, value=1.0, step=0.1, label="Weight")
                    with gr.Accordion("Add more vectors (weights may be negative)", open=False):
                        vector2 = gr.Dropdown([NONE, *names], value=NONE, label="Second vector")
                        weight2 = gr.Slider(-limits.max_weight, limits.max_weight, value=1.0, step=0.1, label="Weight")
                        vector3 = gr.Dropdown([NONE, *names], value=NONE, label="Third vector")
                        weight3 = gr.Slider(-limits.max_weight, limits.max_weight, value=-1.0, step=0.1, label="Weight")
                    strength = gr.Slider(0, limits.max_strength, value=1.0, step=0.1, label="Strength")
                    layer = gr.Dropdown(layers, value=OWN_LAYER, label="Layer (the vector is added after it)")
                    positions = gr.Radio(
                        list(POSITIONS),
                        value="last_prompt",
                        label="Positions",
                        info="last_prompt: the prompt's final token (as the vectors were chosen); generated: that and "
                        "every new token (the paper's setting); all: every token",
                    )
                    new_tokens = gr.Slider(1, limits.max_new_tokens, value=8, step=1, label="New tokens")
                with gr.Column(scale=2):
                    prompt = gr.Textbox(
                        value="Q: hot\nA:",
                        lines=3,
                        max_length=limits.max_prompt_chars,
                        label="Prompt",
                        elem_id="prompt",
                    )
                    run = gr.Button("Steer", variant="primary", elem_id="steer-button")
                    with gr.Row():
                        unsteered = gr.Textbox(label="Unsteered", lines=4, elem_id="unsteered")
                        steered = gr.Textbox(label="Steered", lines=4, elem_id="steered")
                    examples = [row for row in EXAMPLES if row[1] in names]
                    if examples:
                        gr.Examples(examples, inputs=[prompt, vector1])
            run.click(
                shows_errors(app.steer),
                inputs=[
                    prompt,
                    vector1,
                    weight1,
                    vector2,
                    weight2,
                    vector3,
                    weight3,
                    layer,
                    strength,
                    positions,
                    new_tokens,
                    user_vectors,
                ],
                outputs=[unsteered, steered],
                api_name="steer",
            )
        with gr.Tab("Extract"):
            gr.Markdown(
                "Extract a vector from examples: mean head activations over ICL prompts, each head's average "
                "indirect effect (AIE) on shuffled-label prompts, the top heads, then a layer sweep. Small samples "
                f"({engine.settings.n_mean} prompts for the means, {engine.settings.n_aie} for the AIE) keep it "
                "quick; the library's defaults are larger."
            )
            with gr.Row():
                task = gr.Dropdown(fv_plugin.builtin_tasks(), value="antonym", label="Built-in task")
                upload = gr.File(
                    label=f"…or a task file (.json/.jsonl/.csv of input/output pairs, ≤ {limits.max_upload_bytes:,} "
                    "bytes)",
                    file_types=[".json", ".jsonl", ".csv"],
                    type="filepath",
                )
                method = gr.Radio(list(METHODS), value="heads", label="Method")
            go = gr.Button("Extract", variant="primary")
            summary = gr.Markdown()
            with gr.Row():
                heatmap = gr.Plot(label="Where it came from: AIE per head", show_label=False)
                curve = gr.Plot(label="Which layer: validation accuracy", show_label=False)
            with gr.Row():
                tokens = gr.Dataframe(
                    headers=["token", "logit", "probability"],
                    label="Top tokens of the vector (final norm + unembedding)",
                )
                download = gr.File(label="Download the vector (.safetensors)")
            go.click(
                shows_errors(app.extract),
                inputs=[task, upload, method, user_vectors],
                outputs=[summary, heatmap, curve, tokens, download, user_vectors, vector1, vector2, vector3],
                api_name="extract",
                concurrency_limit=1,
                concurrency_id="extract",
            )
        with gr.Tab("Compare"):
            compare = gr.Button("Compare the available vectors")
            similarity = gr.Plot(label="Similarity of the task vectors", show_label=False)
            cross_text = gr.Markdown()
            cross = gr.Plot(label="Across models", show_label=False)
            compare.click(
                shows_errors(app.compare),
                inputs=[user_vectors],
                outputs=[similarity, cross, cross_text],
                api_name="compare",
            )
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=CONCURRENCY)
    return demo


def make_app(model_name: str, settings: ExtractSettings | None = None) -> DemoApp:
    """Load ``model_name`` and its shipped vectors (if any) into a :class:`DemoApp`."""
    model, tokenizer = fv_plugin.load_model(model_name)
    sets = available_vector_sets()
    engine = Engine(
        model,
        tokenizer,
        model_name=model_name,
        vectors=sets.get(model_name, {}),
        settings=settings or ExtractSettings(),
        load_copy=lambda: fv_plugin.load_model(model_name),
    )
    return DemoApp(engine, cross_model=sets)


def launch(app: DemoApp, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> gr.Blocks:
    """Start the server (``block=False`` returns at once; stop it with ``.close()``)."""
    demo = build_app(app)
    demo.launch(
        server_name=host,
        server_port=port,
        max_file_size=app.engine.limits.max_upload_bytes,
        show_error=True,
        prevent_thread_lock=not block,
        quiet=not block,
    )
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Function vectors, live (Gradio demo)")
    parser.add_argument(
        "--model",
        default=os.environ.get("FV_DEMO_MODEL", DEFAULT_MODEL),
        help="embedded short name, local folder or Hub id (env FV_DEMO_MODEL; default %(default)s)",
    )
    parser.add_argument(
        "--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), help="address (env GRADIO_SERVER_NAME)"
    )
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")), help="env GRADIO_SERVER_PORT"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    launch(make_app(args.model), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
