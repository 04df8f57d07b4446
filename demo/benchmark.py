"""Benchmark the demo's batching: 8 concurrent clients against the same 8 requests served one by one.

    python demo/benchmark.py                 # 3 repeats on the embedded default model
    python demo/benchmark.py --threads 1 --repeats 5

Starts the app (``demo/app.py``) in a subprocess on a free port and drives it with ``gradio_client``, one client
per simulated user. Each repeat runs three arms in a rotating order, so that load from other programs hits every
arm alike: the 8 requests one by one (one client; its latencies are the "1 client" row), the 8 at once (8
clients), and 24 at once (the 8 requests three times, 24 clients). It prints a Markdown table: total time,
median (p50) and 95th-percentile (p95) latency per arm, the ratio of concurrent to one-by-one time per repeat,
and the batch sizes the server logged. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

from demo.app import DEFAULT_MODEL  # noqa: E402
from demo.callbacks import NONE, OWN_LAYER  # noqa: E402
from demo.screenshot import free_port  # noqa: E402

# (prompt, vector, positions): the shipped SmolLM2 vectors, each with a prompt of its task; 8 new tokens each
REQUESTS = [
    ("Q: hot\nA:", "antonym", "last_prompt"),
    ("Q: France\nA:", "country-capital", "last_prompt"),
    ("Q: run\nA:", "present-past", "generated"),
    ("Q: mouse\nA:", "singular-plural", "last_prompt"),
    ("Q: apple\nA:", "capitalize", "all"),
    ("Q: house\nA:", "english-french", "last_prompt"),
    ("Q: tall\nA:", "antonym", "generated"),
    ("Q: Japan\nA:", "country-capital", "last_prompt"),
]
BATCH_LINE = re.compile(r"batch: (\d+) requests")


@dataclass(frozen=True)
class Arm:
    """One timed run: how many clients at once, the wall time of the whole arm, each request's latency, and
    the sizes of the batches the server ran meanwhile."""

    name: str
    clients: int
    total_s: float
    latencies: tuple[float, ...]
    batches: tuple[int, ...]


def ui_args(prompt: str, vector: str, positions: str, new_tokens: int) -> list[Any]:
    return [prompt, vector, 1.0, NONE, 0.0, NONE, 0.0, OWN_LAYER, 1.0, positions, new_tokens]


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile with linear interpolation between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def start_server(args: argparse.Namespace, port: int, log: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, str(ROOT / "demo" / "app.py"), "--model", args.model, "--port", str(port)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.batch_quiet is not None:
        command += ["--batch-quiet", str(args.batch_quiet)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with log.open("wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the app exited with code {server.returncode}; see {log}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).close()
            return server
        except OSError:
            time.sleep(1)
    server.terminate()
    raise RuntimeError(f"the app did not answer within 600 s; see {log}")


class Driver:
    """Clients of one running app (made before timing starts) and the server log to read batch sizes from."""

    def __init__(self, url: str, clients: int, log: Path) -> None:
        from gradio_client import Client

        self.clients = [Client(url, verbose=False, analytics_enabled=False) for _ in range(clients)]
        self.log = log

    def one(self, client: Any, args: list[Any]) -> float:
        start = time.perf_counter()
        client.submit(*args, api_name="/steer").result(timeout=900)
        return time.perf_counter() - start

    def run(self, name: str, requests: list[list[Any]], clients: int) -> Arm:
        logged = len(self.log.read_text(errors="replace"))
        start = time.perf_counter()
        if clients == 1:
            latencies = [self.one(self.clients[0], args) for args in requests]
        else:
            with ThreadPoolExecutor(clients) as pool:
                latencies = list(pool.map(self.one, self.clients[:clients], requests))
        total = time.perf_counter() - start
        time.sleep(0.5)  # the server logs a batch just after its last tokens go out
        batches = tuple(int(n) for n in BATCH_LINE.findall(self.log.read_text(errors="replace")[logged:]))
        return Arm(name, clients, total, tuple(latencies), batches)


def table(arms: list[Arm], repeats: int) -> str:
    lines = [
        "| clients | requests per run | total s (median of runs) | p50 latency s | p95 latency s | batch sizes seen |",
        "|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(arm.name for arm in arms):
        runs = [arm for arm in arms if arm.name == name]
        latencies = [x for arm in runs for x in arm.latencies]
        totals = [arm.total_s for arm in runs]
        sizes = sorted({size for arm in runs for size in arm.batches})
        lines.append(
            f"| {name} | {len(runs[0].latencies)} | {percentile(totals, 50):.1f} | {percentile(latencies, 50):.2f} "
            f"| {percentile(latencies, 95):.2f} | {', '.join(map(str, sizes))} |"
        )
    serial = [arm.total_s for arm in arms if arm.name == "1 (one by one)"]
    together = [arm.total_s for arm in arms if arm.name == "8"]
    ratios = [t / s for t, s in zip(together, serial, strict=True)]
    lines.append(
        f"\n8 concurrent / the same 8 one by one (total time), per repeat: {', '.join(f'{r:.2f}' for r in ratios)}"
        f"; median **{percentile(ratios, 50):.2f}** over {repeats} repeats."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="the app's torch threads (default: torch's)")
    parser.add_argument("--batch-quiet", type=float, default=None, help="the app's batch gathering gap in seconds")
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    eight = [ui_args(p, v, pos, args.new_tokens) for p, v, pos in REQUESTS]
    arms_of_a_repeat = [("1 (one by one)", eight, 1), ("8", eight, 8), ("24", eight * 3, 24)]
    port, log = free_port(), Path(tempfile.mkdtemp(prefix="fv-bench-")) / "server.log"
    load = os.getloadavg()[0]
    server = start_server(args, port, log)
    try:
        driver = Driver(f"http://127.0.0.1:{port}/", 24, log)
        driver.run("warm-up", eight * 3, 24)  # every client once: a client's first request is slower
        arms = []
        for repeat in range(args.repeats):
            shift = repeat % len(arms_of_a_repeat)  # rotate the order of the arms
            for name, requests, clients in arms_of_a_repeat[shift:] + arms_of_a_repeat[:shift]:
                arms.append(driver.run(name, requests, clients))
                print(f"repeat {repeat + 1}: {name}: {arms[-1].total_s:.1f} s", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"`{' '.join(['python', 'demo/benchmark.py', *sys.argv[1:]])}`")
    print(
        f"\n{platform.machine()}, {os.cpu_count()} CPUs, app torch threads: {args.threads or 'default'}, "
        f"load average {load:.1f} before and {os.getloadavg()[0]:.1f} after; {args.new_tokens} new tokens per request\n"
    )
    print(table(arms, args.repeats))


if __name__ == "__main__":
    main()
