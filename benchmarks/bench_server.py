"""Server load test on 127.0.0.1: N concurrent clients for T seconds, batched vs max_batch_size=1.

    .venv/bin/python benchmarks/bench_server.py --fake-latency-ms 50          # model double (runs anywhere)
    .venv/bin/python benchmarks/bench_server.py --probe-dir path/to/probe      # real ProbedModel (SmolLM2)

The server runs in a child process (its own GIL) on a free loopback port; the clients run here with
httpx, each sending chat completions back to back. Both runs use the same model, prompts and settings;
only serve.max_batch_size differs, so the requests/s ratio is what batching buys. Traffic goes only to
127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

MAX_CLIENTS, MAX_DURATION_S = 256, 600  # the load is bounded whatever the command line says


class SleepingFakeModel:
    """Test double for the ProbedModel contract: sleeps a fixed time per generate call (per batch).

    It measures the server (queueing, batching, HTTP, SQLite), not a model: with a real model the
    per-batch cost grows with the batch, so real batching gains are smaller than these.
    """

    model_name = "FAKE-sleeping-model"
    max_context_tokens = 2048

    def __init__(self, latency_s: float, max_batch_size: int):
        self.latency_s = latency_s
        self.max_batch_size = max_batch_size

    def count_tokens(self, prompt) -> int:
        text = prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)
        return len(text.split())

    def generate(self, prompts, *, max_new_tokens=64, temperature=0.0, top_p=1.0, stop=None):
        from probes.runtime.wrapper import ProbedGeneration

        time.sleep(self.latency_s)
        return [
            ProbedGeneration(
                text="Paris",
                p_correct=0.8,
                score=1.39,
                layer=15,
                position="prompt_last",
                abstained=False,
                threshold=0.5,
                finish_reason="stop",
                prompt_tokens=self.count_tokens(p),
                completion_tokens=1,
            )
            for p in prompts
        ]


def build_probed_model(args: argparse.Namespace):
    """The model under test: the sleeping double with --fake-latency-ms, else the real wrapper."""
    if args.fake_latency_ms is not None:
        return SleepingFakeModel(args.fake_latency_ms / 1000, args.max_batch_size)
    from extract.models import ModelSpec, load_model
    from probes.runtime.wrapper import ProbedModel

    if not args.probe_dir:
        raise SystemExit(
            "give --probe-dir (a saved probe artifact) or --fake-latency-ms for the model double"
        )
    loaded = load_model(ModelSpec(name=args.model, device=args.device))
    return ProbedModel.from_transformers(loaded.model, loaded.tokenizer, args.probe_dir)


def _serve_in_child(args: argparse.Namespace, max_batch_size: int, db_path: str, port_pipe) -> None:
    from probes.serving.app import create_app
    from probes.serving.settings import ServeSettings

    settings = ServeSettings(
        db_path=db_path,
        max_batch_size=max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        max_tokens_limit=max(256, args.max_tokens),
        max_queue_size=4 * MAX_CLIENTS,
    )
    serve_on_free_port(create_app(build_probed_model(args), settings), port_pipe)


def serve_on_free_port(app, port_pipe) -> None:
    """Run `app` with uvicorn on a free loopback port, sent through `port_pipe` first (in a child process)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted sockets inherit this; without it a pre-bound socket hits Nagle + delayed ACK (~40 ms/request)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    port_pipe.send(sock.getsockname()[1])
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])


async def _load(
    port: int, clients: int, duration_s: float, max_tokens: int
) -> tuple[list[float], int, float]:
    """Every client posts back to back until the deadline; returns (latencies s, errors, elapsed s)."""
    import httpx

    latencies: list[float] = []
    errors = 0

    async def client(http: httpx.AsyncClient, k: int, end: float) -> None:
        nonlocal errors
        i = 0
        while time.perf_counter() < end:
            body = {
                "messages": [{"role": "user", "content": f"What is the capital of country {k}-{i}?"}],
                "max_tokens": max_tokens,
            }
            start = time.perf_counter()
            try:
                reply = await http.post("/v1/chat/completions", json=body)
                ok = reply.status_code == 200 and "confidence" in reply.json()["choices"][0]
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - start)
            errors += not ok
            i += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120, limits=limits) as http:
        await http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "warm up"}], "max_tokens": max_tokens},
        )
        start = time.perf_counter()
        await asyncio.gather(*(client(http, k, start + duration_s) for k in range(clients)))
        elapsed = time.perf_counter() - start
    return latencies, errors, elapsed


def run_once(args: argparse.Namespace, max_batch_size: int) -> dict:
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    with tempfile.TemporaryDirectory() as tmp:
        child = ctx.Process(
            target=_serve_in_child,
            args=(args, max_batch_size, str(Path(tmp) / "f.sqlite"), send),
            daemon=True,
        )
        child.start()
        try:
            if not receive.poll(600):
                raise SystemExit("the server process did not start within 600 s")
            port = receive.recv()
            _wait_healthy(port, child)
            latencies, errors, elapsed = asyncio.run(
                _load(port, args.clients, args.duration, args.max_tokens)
            )
            mean_batch = _mean_batch_size(port)
        finally:
            child.terminate()
            child.join(30)
    lat_ms = np.array(latencies) * 1000
    return {
        "max_batch_size": max_batch_size,
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(lat_ms, 50)),
        "p99_ms": float(np.percentile(lat_ms, 99)),
        "mean_batch": mean_batch,
    }


def _mean_batch_size(port: int) -> float:
    """Mean requests per generate call, from the server's own batch-size histogram."""
    import httpx

    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    values = dict(
        line.rsplit(" ", 1) for line in metrics.splitlines() if line.startswith("probecal_batch_size_")
    )
    return float(values["probecal_batch_size_sum"]) / max(float(values["probecal_batch_size_count"]), 1.0)


def _wait_healthy(port: int, child) -> None:
    import httpx

    deadline = time.monotonic() + 600  # a real model may take a while to load
    while time.monotonic() < deadline:
        if not child.is_alive():
            raise SystemExit(f"the server process exited with code {child.exitcode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not become healthy within 600 s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--probe-dir", help="saved probe artifact for the real ProbedModel")
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="model short name (with --probe-dir)"
    )
    parser.add_argument("--device", default="auto", help="model device (with --probe-dir)")
    parser.add_argument(
        "--fake-latency-ms",
        type=float,
        default=None,
        help="use the sleeping model double instead of a real model (this many ms per batch)",
    )
    parser.add_argument("--clients", type=int, default=16, help=f"concurrent clients (1..{MAX_CLIENTS})")
    parser.add_argument("--duration", type=float, default=60.0, help=f"seconds per run (1..{MAX_DURATION_S})")
    parser.add_argument("--max-batch-size", type=int, default=16, help="batched run (the baseline uses 1)")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    if not 1 <= args.clients <= MAX_CLIENTS:
        parser.error(f"--clients must be in 1..{MAX_CLIENTS}")
    if not 1 <= args.duration <= MAX_DURATION_S:
        parser.error(f"--duration must be in 1..{MAX_DURATION_S} s")

    if args.fake_latency_ms is not None:
        print(
            f"MODEL: FAKE test double sleeping {args.fake_latency_ms:g} ms per batch -- these numbers measure "
            "the server and its batching, not a real model."
        )
    else:
        print(f"MODEL: {args.model} with the probe in {args.probe_dir}")
    print(
        f"{args.clients} clients x {args.duration:g} s per run, max_tokens={args.max_tokens}, "
        f"batch_wait_ms={args.batch_wait_ms:g}, 127.0.0.1\n"
    )
    runs = [run_once(args, args.max_batch_size), run_once(args, 1)]
    print(
        "| max_batch_size | requests | errors | requests/s | p50 latency (ms) | p99 latency (ms) | mean batch |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(
            f"| {r['max_batch_size']} | {r['requests']} | {r['errors']} | {r['rps']:.1f} | {r['p50_ms']:.1f} "
            f"| {r['p99_ms']:.1f} | {r['mean_batch']:.1f} |"
        )
    print(
        f"\nbatching speed-up (requests/s, batch {args.max_batch_size} vs 1): {runs[0]['rps'] / runs[1]['rps']:.2f}x"
    )


if __name__ == "__main__":
    main()
