"""Proxy overhead on 127.0.0.1: requests/s and p50/p99 through `probecal serve serve.upstream=...` vs straight to
the upstream, same load, same machine.

    .venv/bin/python benchmarks/bench_proxy.py --upstream-ms 200 --score-ms 5

The upstream is a STUB OpenAI engine (a child process) that sleeps --upstream-ms per request and answers a fixed
sentence (not SmolLM2: on this shared 2-core CPU a real upstream's own noise would swamp a few-ms overhead). The
proxy is probecal serve in a second child process, forwarding to it and scoring each answer with a model double
whose `score` sleeps --score-ms per batch (a real probe forward on a GPU at the probe's layer; measure yours
with benchmarks/bench_score.py). Both runs: N clients posting chat completions back to back for --duration s.
Target: the proxy adds <= 10% p50 latency.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_server import serve_on_free_port  # same loopback server set-up as the server benchmark
from fastapi import FastAPI, Request  # module level: the stub's annotations are resolved in these globals

MAX_CLIENTS, MAX_DURATION_S = 64, 300


def _stub_upstream(latency_s: float, port_pipe) -> None:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> dict:
        body = await request.json()
        await asyncio.sleep(latency_s)
        return {
            "id": "stub",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "logprobs": None,
                    "message": {"role": "assistant", "content": "The capital is Paris."},
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18},
        }

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    serve_on_free_port(app, port_pipe)


class SleepingScorer:
    """The ProbedModel contract for proxy mode: `score` sleeps a fixed time per batch."""

    model_name = "stub-model"
    max_context_tokens = 4096
    max_batch_size = 16

    def __init__(self, score_s: float):
        self.score_s = score_s

    def count_tokens(self, prompt) -> int:
        return (
            len(" ".join(m["content"] for m in prompt).split())
            if isinstance(prompt, list)
            else len(prompt.split())
        )

    def generate(self, *args, **kwargs):
        raise RuntimeError("proxy mode does not generate here")

    def score(self, prompts, completions, stop=None, domains=None):
        from probes.runtime.wrapper import ProbedScore

        time.sleep(self.score_s)
        return [
            ProbedScore(
                p_correct=0.8,
                score=1.4,
                layer=12,
                position="answer_mean",
                abstained=False,
                threshold=None,
                prompt_tokens=12,
                completion_tokens=6,
                answer_tokens=(0, 6),
                answer_text="The capital is Paris",
            )
            for _ in prompts
        ]


def _proxy(upstream_port: int, score_s: float, db_path: str, port_pipe) -> None:
    from probes.serving.app import create_app
    from probes.serving.settings import ServeSettings

    settings = ServeSettings(
        db_path=db_path,
        upstream=f"http://127.0.0.1:{upstream_port}/v1",
        max_queue_size=4 * MAX_CLIENTS,
        model_name="stub-model",
    )
    serve_on_free_port(create_app(SleepingScorer(score_s), settings), port_pipe)


async def _load(port: int, clients: int, duration_s: float) -> dict:
    import httpx

    latencies, errors = [], 0

    async def client(http, k: int, end: float) -> None:
        nonlocal errors
        i = 0
        while time.perf_counter() < end:
            body = {
                "model": "stub-model",
                "max_tokens": 16,
                "messages": [{"role": "user", "content": f"What is the capital of country {k}-{i}?"}],
            }
            start = time.perf_counter()
            try:
                ok = (await http.post("/v1/chat/completions", json=body)).status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - start)
            errors += not ok
            i += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60, limits=limits) as http:
        await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "warm up"}]})
        start = time.perf_counter()
        await asyncio.gather(*(client(http, k, start + duration_s) for k in range(clients)))
        elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {
        "requests": len(lat),
        "errors": errors,
        "rps": len(lat) / elapsed,
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
    }


def _wait(port: int) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"nothing healthy on port {port}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--upstream-ms", type=float, default=200.0, help="stub engine latency per request")
    parser.add_argument("--score-ms", type=float, default=5.0, help="the proxy's scoring double, per batch")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per run")
    args = parser.parse_args()
    if not 1 <= args.clients <= MAX_CLIENTS or not 1 <= args.duration <= MAX_DURATION_S:
        parser.error(f"--clients in 1..{MAX_CLIENTS}, --duration in 1..{MAX_DURATION_S}")
    print(
        f"UPSTREAM: STUB engine sleeping {args.upstream_ms:g} ms per request; proxy scoring: model double "
        f"sleeping {args.score_ms:g} ms per batch. {args.clients} clients x {args.duration:g} s per run, 127.0.0.1\n"
    )
    ctx = mp.get_context("spawn")
    children = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            receive, send = ctx.Pipe(duplex=False)
            children.append(
                ctx.Process(target=_stub_upstream, args=(args.upstream_ms / 1000, send), daemon=True)
            )
            children[-1].start()
            upstream_port = receive.recv()
            receive, send = ctx.Pipe(duplex=False)
            children.append(
                ctx.Process(
                    target=_proxy,
                    args=(upstream_port, args.score_ms / 1000, str(Path(tmp) / "f.sqlite"), send),
                    daemon=True,
                )
            )
            children[-1].start()
            proxy_port = receive.recv()
            _wait(upstream_port)
            _wait(proxy_port)
            direct = asyncio.run(_load(upstream_port, args.clients, args.duration))
            proxied = asyncio.run(_load(proxy_port, args.clients, args.duration))
        finally:
            for child in children:
                child.terminate()
                child.join(30)
    print("| path | requests | errors | requests/s | p50 (ms) | p99 (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in (("straight to the upstream", direct), ("through the probecal proxy", proxied)):
        print(
            f"| {name} | {r['requests']} | {r['errors']} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} |"
        )
    added = proxied["p50"] / direct["p50"] - 1
    print(
        f"\nproxy adds {100 * added:.1f}% p50 latency ({proxied['p50'] - direct['p50']:.1f} ms; target <= 10%); "
        f"requests/s ratio {proxied['rps'] / direct['rps']:.2f}"
    )


if __name__ == "__main__":
    main()
