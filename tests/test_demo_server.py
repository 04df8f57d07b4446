"""The demo served on 127.0.0.1 with the embedded default model: its API through gradio_client (streamed),
several clients at once (batched into shared ``generate`` calls), and a real browser (Debian's chromium driven by
Playwright). The oracle is a serial run: the same request served alone through the app's own callback."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from demo.app import launch, make_app  # noqa: E402
from demo.callbacks import NONE, OWN_LAYER, DemoApp  # noqa: E402
from demo.extractor import ExtractSettings  # noqa: E402
from demo.generation import OWN  # noqa: E402
from demo.screenshot import CHROMIUM, free_port, steer_in_browser  # noqa: E402

pytestmark = pytest.mark.slow
NEW_TOKENS = 4
TIMEOUT_S = 180


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[DemoApp, str]]:
    # small extraction samples: the tests check the plumbing, the app's defaults are measured in the README
    app = make_app("smollm2-135m-instruct", ExtractSettings(n_mean=4, n_aie=1, n_shots=4, layer_stride=6))
    port = free_port()
    demo = launch(app, port=port, block=False)
    try:
        yield app, f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def connect(url: str) -> Any:
    return gradio_client.Client(url, verbose=False, httpx_kwargs={"timeout": TIMEOUT_S}, analytics_enabled=False)


def ui_args(
    prompt: str,
    vector: str,
    strength: float = 1.0,
    second: str = NONE,
    weight2: float = 0.0,
    positions: str = "last_prompt",
    new: int = NEW_TOKENS,
    gate: bool = False,  # off: every request is steered, so a leak between users would show
) -> list:
    return [prompt, vector, 1.0, second, weight2, NONE, 0.0, OWN_LAYER, strength, positions, new, gate]


def direct(app: DemoApp, args: list) -> tuple[str, str, str]:
    """Oracle: the request served alone, through the app's own callback (its last update)."""
    *_, last = app.steer(*args)
    return last[0], last[1], last[2]


def test_api_streams_the_three_continuations_and_the_chart(served: tuple[DemoApp, str]) -> None:
    app, url = served
    client = connect(url)
    args = ui_args("Q: hot\nA:", "antonym", new=6, gate=True)
    job = client.submit(*args, api_name="/steer")
    unsteered, steered, icl, chart, note, gate = job.result(timeout=TIMEOUT_S)
    assert (unsteered, steered, icl) == direct(app, args)
    assert "*antonym*: condition passed — steered" in gate  # the shipped antonym vector carries a condition
    assert steered != unsteered and icl
    assert "10 demonstrations of *antonym*" in note and "Done in" in note
    assert Path(chart).read_bytes()[:4] in (b"RIFF", b"\x89PNG")  # the chart, as an image file
    updates = job.outputs()
    assert len({update[1] for update in updates}) >= 2  # the steered text arrived in pieces
    with pytest.raises(gradio_client.exceptions.AppError, match="Type a prompt first"):
        client.predict(*ui_args("  ", "antonym"), api_name="/steer")
    with pytest.raises(gradio_client.exceptions.AppError, match="not in the list of choices"):
        client.predict(*ui_args("Q: hot\nA:", "no-such-task"), api_name="/steer")


def test_extract_through_gradio_client_then_steer_with_the_new_vector(
    served: tuple[DemoApp, str], tmp_path: Path
) -> None:
    _, url = served
    client = connect(url)
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n{"input": "c"}\n')
    with pytest.raises(gradio_client.exceptions.AppError, match=r"pairs\.jsonl, line 2: missing 'output'"):
        client.predict("antonym", gradio_client.handle_file(str(bad)), "auto", api_name="/extract")
    summary, _, _, text, tokens, path, *_ = client.predict("antonym", None, "auto", api_name="/extract")
    (name,) = re.findall(r"\*(antonym \([\w_]+, yours\))\*", summary)  # the method auto chose
    assert "How `auto` chose" in summary and "On neutral text" in summary
    assert text is not None and len(tokens["data"]) == 10 and Path(path).stat().st_size > 0
    # the same session can now steer with its own vector, and its ICL column uses the task it came from
    plain, steered, _, _, note, gate = client.predict(*ui_args("Q: hot\nA:", name), api_name="/steer")
    assert plain != steered and "of *antonym*" in note
    assert gate.startswith("**Gate off**")


def test_concurrent_clients_get_their_own_steering(served: tuple[DemoApp, str]) -> None:
    app, url = served
    names = sorted(app.engine.vectors)
    assert len(names) >= 4, "demo/vectors/smollm2-135m-instruct should ship at least 4 vectors (demo/build_vectors.py)"
    requests = [ui_args("Q: small\nA:", name, strength=2.0) for name in names[:4]]
    requests += [
        ui_args("Q: small\nA:", names[0], strength=2.0, second=names[1], weight2=-1.0),
        ui_args("Q: France\nA:", names[1], positions="generated", new=6),
        ui_args("Q: run quickly\nA:", names[2], positions="all", new=2),
        ui_args("Q: mouse\nA:", names[3], strength=0.0),
    ]
    serial = [direct(app, args) for args in requests]
    assert len({steered for _, steered, _ in serial}) > 1  # different vectors give different outputs: leaks would show
    seen = len(app.engine.batcher.stats)

    def call(args: list) -> tuple[str, str, str]:
        client = connect(url)
        return tuple(client.submit(*args, api_name="/steer").result(timeout=TIMEOUT_S)[:3])  # type: ignore[return-value]

    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(call, requests))
    assert together == serial
    assert max(stat.jobs for stat in list(app.engine.batcher.stats)[seen:]) > 1  # requests shared a generate


def test_real_browser_steers(served: tuple[DemoApp, str], tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("FV_DEMO_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing (apt-get install -y chromium chromium-driver)")
        pytest.skip(f"{CHROMIUM} is not installed")
    app, url = served
    run = steer_in_browser(url, tmp_path / "demo.png", prompt="Q: hot\nA:", timeout_s=TIMEOUT_S)
    assert run.steered and run.icl and run.steered != run.unsteered
    # what the page shows is what the app computes for the page's default settings
    expected = direct(app, ["Q: hot\nA:", "antonym", 1.0, NONE, 1.0, NONE, -1.0, OWN_LAYER, 1.0, OWN, 8])
    assert (run.unsteered, run.steered, run.icl) == expected
    assert "10 demonstrations of antonym" in run.note and "Done in" in run.note
    assert "Gate on" in run.gate and "antonym: condition passed — steered" in run.gate
    assert min(run.chart_size) > 200  # the probability chart is shown
    assert run.screenshot.stat().st_size > 10_000
    # a prompt that is no antonym query: the gate (on by default) leaves it plain; unticked, the vector steers it
    neutral = "The weather in the mountains is"
    gated = steer_in_browser(url, tmp_path / "gated.png", prompt=neutral, timeout_s=TIMEOUT_S)
    assert "antonym: condition not passed — not steered" in gated.gate and gated.steered == gated.unsteered
    assert not app.engine.gate(neutral, ((app.engine.vectors["antonym"], 1.0),))[0]  # what the engine decides
    ungated = steer_in_browser(url, tmp_path / "ungated.png", prompt=neutral, gate=False, timeout_s=TIMEOUT_S)
    assert "Gate off" in ungated.gate and ungated.steered != ungated.unsteered
    args = [neutral, "antonym", 1.0, NONE, 1.0, NONE, -1.0, OWN_LAYER, 1.0, OWN, 8, False]
    assert (ungated.unsteered, ungated.steered) == direct(app, args)[:2]
    keep = os.environ.get("FV_DEMO_SCREENSHOT_DIR")
    if keep:
        shutil.copy(run.screenshot, Path(keep) / "demo.png")
