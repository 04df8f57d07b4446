"""The page: one small builder per tab around :class:`demo.callbacks.DemoApp`'s callbacks."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

import fv_plugin
from demo.callbacks import NONE, OWN_LAYER, DemoApp, shows_errors
from demo.engine import N_DEMOS, POSITIONS, Limits
from demo.extractor import METHODS
from demo.generation import OWN

QUEUE_SIZE = 32  # requests waiting, over all events
CONCURRENCY = 4  # extract and compare requests running at once
EXAMPLES = [
    ["Q: hot\nA:", "antonym"],
    ["Q: France\nA:", "country-capital"],
    ["Q: run\nA:", "present-past"],
    ["Q: mouse\nA:", "singular-plural"],
    ["Q: apple\nA:", "capitalize"],
]
# The Extract tab's figures of a new vector, in the order demo.effects.extract_figures returns them.
EXTRACT_FIGURES = (
    "Where it came from: AIE per head",
    "Which layer: validation accuracy",
    "What else it changes: neutral text",
)
INTRO = f"""# Function vectors, live
A **function vector** is one vector, taken from a model's activations on a few examples of a task, that makes the
same model do the task without examples (Todd et al., *Function Vectors in Large Language Models*, ICLR 2024).
Type a zero-shot prompt, pick a vector and press **Steer**. You see the plain model, the same model with the vector
added to its residual stream, and the plain model shown {N_DEMOS} examples of the task first (in-context
learning). The chart compares their next-token probabilities: the vector moves the plain model toward what the
examples do. Model: **{{model}}**."""


@dataclass(frozen=True)
class VectorChoice:
    """One vector dropdown and its weight slider."""

    vector: gr.Dropdown
    weight: gr.Slider


@dataclass(frozen=True)
class SteerOutputs:
    """What a Steer request fills in: three continuations, the chart, a note (the ICL column, the status) and what
    the gate decided."""

    unsteered: gr.Textbox
    steered: gr.Textbox
    icl: gr.Textbox
    chart: gr.Image
    note: gr.Markdown
    gate: gr.Markdown

    def all(self) -> list[gr.components.Component]:
        return [self.unsteered, self.steered, self.icl, self.chart, self.note, self.gate]


def build_app(app: DemoApp) -> gr.Blocks:
    """The Blocks UI around ``app``'s callbacks."""
    with gr.Blocks(title="Function vectors, live", analytics_enabled=False) as demo:
        gr.Markdown(INTRO.format(model=app.engine.model_name))
        own = gr.State({})
        with gr.Tab("Steer"):
            choices = steer_tab(app, own)
        with gr.Tab("Extract"):
            extract_tab(app, own, [choice.vector for choice in choices])
        with gr.Tab("Compare"):
            compare_tab(app, own)
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=CONCURRENCY)
    return demo


def vector_choices(names: list[str], limits: Limits) -> list[VectorChoice]:
    """The first vector (shown), then two more in an accordion."""
    first = "antonym" if "antonym" in names else (names[0] if names else None)
    bound = limits.max_weight

    def weight(value: float) -> gr.Slider:
        return gr.Slider(-bound, bound, value=value, step=0.1, label="Weight")

    choices = [VectorChoice(gr.Dropdown(names, value=first, label="Vector", elem_id="vector1"), weight(1.0))]
    with gr.Accordion("Add more vectors (weights may be negative)", open=False):
        for label, value in (("Second vector", 1.0), ("Third vector", -1.0)):
            choices.append(VectorChoice(gr.Dropdown([NONE, *names], value=NONE, label=label), weight(value)))
    return choices


def steer_outputs() -> SteerOutputs:
    with gr.Row():
        unsteered = gr.Textbox(label="Unsteered", lines=4, elem_id="unsteered")
        steered = gr.Textbox(label="Steered (with the vector)", lines=4, elem_id="steered")
        icl = gr.Textbox(label=f"With {N_DEMOS} examples (ICL), no vector", lines=4, elem_id="icl")
    note = gr.Markdown(elem_id="steer-note")
    gate = gr.Markdown(elem_id="gate-status")
    chart = gr.Image(
        label="Why it works: probabilities of the first new token",
        type="numpy",
        interactive=False,
        elem_id="probs-chart",
        buttons=[],
    )
    return SteerOutputs(unsteered, steered, icl, chart, note, gate)


def steer_tab(app: DemoApp, own: gr.State) -> list[VectorChoice]:
    """The Steer tab; returns its vector choices (the Extract tab adds new vectors to them)."""
    limits = app.engine.limits
    names = app.vector_names()
    with gr.Row():
        with gr.Column(scale=1):
            choices = vector_choices(names, limits)
            strength = gr.Slider(0, limits.max_strength, value=1.0, step=0.1, label="Strength")
            layers = [OWN_LAYER, *(str(i) for i in range(app.engine.num_layers))]
            layer = gr.Dropdown(layers, value=OWN_LAYER, label="Layer (the vector is added after it)")
            positions = gr.Radio(
                list(POSITIONS),
                value=OWN,
                label="Positions",
                info="own: each vector's own (where auto chose to steer it; generated for vectors without one); "
                "last_prompt: the prompt's final token; generated: that and every new token (the paper's "
                "setting); all: every token; answer: generated, until the answer's line ends",
            )
            new_tokens = gr.Slider(1, limits.max_new_tokens, value=8, step=1, label="New tokens")
            gate = gr.Checkbox(
                value=True,
                label="Gate: steer only prompts that pass each vector's condition",
                info="A vector's condition, learned with it, says which prompts are queries of its task; a vector "
                "without one steers ungated (the page says so).",
                elem_id="gate",
            )
        with gr.Column(scale=2):
            prompt = gr.Textbox(
                value="Q: hot\nA:", lines=3, max_length=limits.max_prompt_chars, label="Prompt", elem_id="prompt"
            )
            run = gr.Button("Steer", variant="primary", elem_id="steer-button")
            outputs = steer_outputs()
            examples = [row for row in EXAMPLES if row[1] in names]
            if examples:
                gr.Examples(examples, inputs=[prompt, choices[0].vector])
    picks = [part for choice in choices for part in (choice.vector, choice.weight)]
    run.click(
        shows_errors(app.steer),
        inputs=[prompt, *picks, layer, strength, positions, new_tokens, gate, own],
        outputs=outputs.all(),
        api_name="steer",
        concurrency_limit=2 * app.engine.batcher.limits.max_jobs,  # one batch running, the next one gathering
        concurrency_id="steer",
        show_progress="minimal",
    )
    return choices


def extract_tab(app: DemoApp, own: gr.State, vector_dropdowns: list[gr.Dropdown]) -> None:
    settings, limits = app.extractor.settings, app.engine.limits
    gr.Markdown(
        "Extract a vector from examples. `auto` tries every method (the hidden-state difference, the paper's head "
        "vectors) at several layers and strengths on zero-shot validation queries and keeps the best; `heads` is "
        "the paper's: mean head activations over ICL prompts, each head's average indirect effect (AIE) on "
        f"shuffled-label prompts, the top heads. Small samples and grids ({settings.n_mean} prompts for the "
        f"means, {settings.n_aie} for the AIE) keep it quick; the library's defaults are larger. Then what else "
        "the vector changes: perplexity and looping on neutral text."
    )
    with gr.Row():
        task = gr.Dropdown(fv_plugin.builtin_tasks(), value="antonym", label="Built-in task")
        upload = gr.File(
            label=f"…or a task file (.json/.jsonl/.csv of input/output pairs, ≤ {limits.max_upload_bytes:,} bytes)",
            file_types=[".json", ".jsonl", ".csv"],
            type="filepath",
        )
        method = gr.Radio(list(METHODS), value="auto", label="Method")
    go = gr.Button("Extract", variant="primary")
    summary = gr.Markdown()
    with gr.Row():
        figures = [gr.Plot(label=label, show_label=False) for label in EXTRACT_FIGURES]
    with gr.Row():
        tokens = gr.Dataframe(
            headers=["token", "logit", "probability"], label="Top tokens of the vector (final norm + unembedding)"
        )
        download = gr.File(label="Download the vector (.safetensors)")
    go.click(
        shows_errors(app.extract),
        inputs=[task, upload, method, own],
        outputs=[summary, *figures, tokens, download, own, *vector_dropdowns],
        api_name="extract",
        concurrency_limit=1,
        concurrency_id="extract",
    )


def compare_tab(app: DemoApp, own: gr.State) -> None:
    compare = gr.Button("Compare the available vectors")
    similarity = gr.Plot(label="Similarity of the task vectors", show_label=False)
    cross_text = gr.Markdown()
    cross = gr.Plot(label="Across models", show_label=False)
    effects_text = gr.Markdown()
    with gr.Row():
        zero = gr.Plot(label="Each vector on each task, zero-shot", show_label=False)
        icl = gr.Plot(label="Each vector on each task, 10-shot", show_label=False)
    compare.click(
        shows_errors(app.compare),
        inputs=[own],
        outputs=[similarity, cross, cross_text, zero, icl, effects_text],
        api_name="compare",
    )
