"""Drive the demo in a real browser (Debian's chromium through Playwright) and save a screenshot.

Regenerate the README's screenshot (starts the app on the embedded default model on a free port):

    python demo/screenshot.py docs/screenshot.png
"""

from __future__ import annotations

import argparse
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CHROMIUM = "/usr/bin/chromium"
# Done: the status line says so and the chart image has loaded.
FINISHED = """() => {
    const note = document.querySelector('#steer-note');
    const chart = document.querySelector('#probs-chart img');
    return !!note && note.innerText.includes('Done in') && !!chart && chart.complete && chart.naturalWidth > 0;
}"""

CHART_SIZE = "() => { const i = document.querySelector('#probs-chart img'); return [i.naturalWidth, i.naturalHeight]; }"


@dataclass(frozen=True)
class BrowserRun:
    """What the page showed after pressing Steer: the three continuations, the note under them, what the gate
    decided, the size of the probability chart as loaded (pixels), and the screenshot."""

    unsteered: str
    steered: str
    icl: str
    note: str
    gate: str
    chart_size: tuple[int, int]
    screenshot: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def steer_in_browser(
    url: str,
    out: Path,
    *,
    prompt: str = "Q: hot\nA:",
    gate: bool = True,
    timeout_s: float = 120.0,
    executable: str = CHROMIUM,
) -> BrowserRun:
    """Open ``url``, type ``prompt``, set the gate checkbox to ``gate``, press Steer, wait until the request is
    done, save a screenshot at ``out``."""
    from playwright.sync_api import sync_playwright

    timeout_ms = timeout_s * 1000
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, timeout=timeout_ms)
            box = page.locator("#prompt textarea")
            box.wait_for(timeout=timeout_ms)
            box.fill(prompt)
            page.locator("#gate input[type=checkbox]").set_checked(gate)
            page.locator("#steer-button").click()
            page.wait_for_function(FINISHED, timeout=timeout_ms)
            page.wait_for_timeout(500)  # let the last update settle before the screenshot
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            size = page.evaluate(CHART_SIZE)
            return BrowserRun(
                unsteered=page.locator("#unsteered textarea").input_value(),
                steered=page.locator("#steered textarea").input_value(),
                icl=page.locator("#icl textarea").input_value(),
                note=page.locator("#steer-note").inner_text(),
                gate=page.locator("#gate-status").inner_text(),
                chart_size=(int(size[0]), int(size[1])),
                screenshot=out,
            )
        finally:
            browser.close()


def main() -> None:
    from demo.app import DEFAULT_MODEL, launch, make_app

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("docs/screenshot.png"))
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompt", default="Q: hot\nA:")
    args = parser.parse_args()
    port = free_port()
    demo = launch(make_app(args.model), port=port, block=False)
    try:
        run = steer_in_browser(f"http://127.0.0.1:{port}/", args.out, prompt=args.prompt)
    finally:
        demo.close()
    print(f"unsteered: {run.unsteered!r}\nsteered:   {run.steered!r}\nICL:       {run.icl!r}\nsaved {run.screenshot}")


if __name__ == "__main__":
    main()
