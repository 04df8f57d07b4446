"""The demo served on 127.0.0.1 with the embedded default model: its API through gradio_client, several clients
at once, and a real browser (Debian's chromium driven by Playwright)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from demo.app import NONE, OWN_LAYER, DemoApp, launch, make_app  # noqa: E402
from demo.engine import ExtractSettings  # noqa: E402
from demo.screenshot import CHROMIUM, free_port, steer_in_browser  # noqa: E402

pytestmark = pytest.mark.slow
NEW_TOKENS = 4
TIMEOUT_S = 120


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


def ui_args(prompt: str, vector: str, strength: float = 1.0, second: str = NONE, weight2: float = 0.0) -> list:
    return [prompt, vector, 1.0, second, weight2, NONE, 0.0, OWN_LAYER, strength, "last_prompt", NEW_TOKENS]


def direct(app: DemoApp, args: list) -> tuple[str, str]:
    return app.steer(*args)


def test_api_through_gradio_client(served: tuple[DemoApp, str]) -> None:
    app, url = served
    client = connect(url)
    args = ui_args("Q: hot\nA:", "antonym")
    got = client.predict(*args, api_name="/steer")
    assert tuple(got) == direct(app, args)
    assert got[0] != got[1]
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
        client.predict("antonym", gradio_client.handle_file(str(bad)), "difference", api_name="/extract")
    summary, _, curve, tokens, path, *_ = client.predict("antonym", None, "difference", api_name="/extract")
    assert "antonym (difference, yours)" in summary and curve is not None and len(tokens["data"]) == 10
    assert Path(path).stat().st_size > 0
    # the same session can now steer with its own vector (the dropdown accepts the new choice)
    plain, steered = client.predict(*ui_args("Q: hot\nA:", "antonym (difference, yours)"), api_name="/steer")
    assert plain != steered


def test_concurrent_clients_get_their_own_steering(served: tuple[DemoApp, str]) -> None:
    app, url = served
    names = sorted(app.engine.vectors)
    assert len(names) >= 4, "demo/vectors/smollm2-135m-instruct should ship at least 4 vectors (demo/build_vectors.py)"
    requests = [ui_args("Q: small\nA:", name, strength=2.0) for name in names[:4]]
    requests.append(ui_args("Q: small\nA:", names[0], strength=2.0, second=names[1], weight2=-1.0))
    serial = [direct(app, args) for args in requests]
    assert len({steered for _, steered in serial}) > 1  # different vectors give different outputs: leaks would show

    def call(args: list) -> tuple[str, str]:
        client = connect(url)
        return tuple(client.submit(*args, api_name="/steer").result(timeout=TIMEOUT_S))

    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(call, requests))
    assert together == serial


def test_real_browser_steers(served: tuple[DemoApp, str], tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("FV_DEMO_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing (apt-get install -y chromium chromium-driver)")
        pytest.skip(f"{CHROMIUM} is not installed")
    app, url = served
    run = steer_in_browser(url, tmp_path / "demo.png", prompt="Q: hot\nA:", timeout_s=TIMEOUT_S)
    assert run.steered and run.steered != run.unsteered
    # what the page shows is what the app computes for the page's default settings
    expected = app.steer("Q: hot\nA:", "antonym", 1.0, NONE, 1.0, NONE, -1.0, OWN_LAYER, 1.0, "last_prompt", 8)
    assert (run.unsteered, run.steered) == expected
    assert run.screenshot.stat().st_size > 10_000
    keep = os.environ.get("FV_DEMO_SCREENSHOT_DIR")
    if keep:
        shutil.copy(run.screenshot, Path(keep) / "demo.png")
