"""Streaming vs non-streaming on 127.0.0.1: time to first token (TTFT) and total time, N concurrent clients.

    .venv/bin/python benchmarks/bench_stream.py --fake-step-ms 20          # model double: 20 ms per decode step
    .venv/bin/python benchmarks/bench_stream.py --smollm2                  # real SmolLM2, synthetic probe

One server (a child process, its own GIL) serves both runs, one after the other: every client sends chat
completions back to back for --duration seconds, first with stream=false, then with stream=true. TTFT is the
time to the first chunk carrying answer text (non-streaming: the whole response, TTFT = total). The probe of
--smollm2 is a logistic probe fit on random vectors at layer 12 (its values do not matter for timing).
Traffic goes only to 127.0.0.1; the load is bounded (clients <= 64, duration <= 300 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_server import serve_on_free_port  # same loopback server set-up as the server benchmark

MAX_CLIENTS, MAX_DURATION_S = 64, 300


class SteppingFakeModel:
    """The ProbedModel contract: a batch decodes max_new_tokens steps of `step_s` each (one sleep per step for
    the whole batch, as a real batched decode), streaming one word per step to every row."""

    model_name = "FAKE-stepping-model"
    max_context_tokens = 2048

    def __init__(self, step_s: float, max_batch_size: int):
        self.step_s, self.max_batch_size = step_s, max_batch_size

    def count_tokens(self, prompt) -> int:
        return (
            len(" ".join(m["content"] for m in prompt).split())
            if isinstance(prompt, list)
            else len(prompt.split())
        )

    def generate(
        self,
        prompts,
        *,
        max_new_tokens=16,
        temperature=0.0,
        top_p=1.0,
        stop=None,
        on_text=None,
        cancelled=None,
        domains=None,
    ):
        from probes.runtime.wrapper import ProbedGeneration

        words = [f"w{k} " for k in range(max_new_tokens)]
        for k in range(max_new_tokens):
            time.sleep(self.step_s)
            if on_text is not None:
                for i in range(len(prompts)):
                    on_text(i, words[k])
        return [
            ProbedGeneration(
                text="".join(words),
                p_correct=0.8,
                score=1.4,
                layer=12,
                position="answer_mean",
                abstained=False,
                threshold=None,
                finish_reason="length",
                prompt_tokens=self.count_tokens(p),
                completion_tokens=max_new_tokens,
            )
            for p in prompts
        ]


def _synthetic_smollm2(tmp: str, max_batch_size: int):
    from extract.models import ModelSpec, load_model
    from probes.artifact import ProbeArtifact
    from probes.estimators import PROBES
    from probes.runtime.wrapper import ProbedModel

    loaded = load_model(ModelSpec(name="smollm2-135m-instruct", device="cpu"))
    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, loaded.fingerprint.hidden_size)).astype(np.float32)
    probe = PROBES["logistic"](Cs=(0.01,), cv=3).fit(X, (X[:, 0] > 0).astype(int))
    art = ProbeArtifact.create(
        probe,
        None,
        12,
        "answer_mean",
        loaded.fingerprint,
        training_data_hash="synthetic",
        split_sizes={"train": 64},
    )
    return ProbedModel(loaded, art, threshold=None, max_batch_size=max_batch_size)


def _serve_in_child(args: argparse.Namespace, db_path: str, port_pipe) -> None:
    from probes.serving.app import create_app
    from probes.serving.settings import ServeSettings

    model = (
        SteppingFakeModel(args.fake_step_ms / 1000, args.max_batch_size)
        if not args.smollm2
        else _synthetic_smollm2(str(Path(db_path).parent), args.max_batch_size)
    )
    settings = ServeSettings(
        db_path=db_path,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        max_queue_size=4 * MAX_CLIENTS,
    )
    serve_on_free_port(create_app(model, settings), port_pipe)


async def _load(port: int, clients: int, duration_s: float, max_tokens: int, stream: bool) -> dict:
    import httpx

    ttft, total, errors = [], [], 0

    async def one(http: httpx.AsyncClient, body: dict) -> tuple[float, float] | None:
        start = time.perf_counter()
        if not stream:
            reply = await http.post("/v1/chat/completions", json=body)
            if reply.status_code != 200 or "confidence" not in reply.json()["choices"][0]:
                return None
            done = time.perf_counter() - start
            return done, done
        first, confident = None, False
        async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as reply:
            if reply.status_code != 200:
                return None
            async for line in reply.aiter_lines():
                if not line.startswith("data:") or line.endswith("[DONE]"):
                    continue
                choice = (json.loads(line[5:]).get("choices") or [{}])[0]
                if first is None and (choice.get("delta") or {}).get("content"):
                    first = time.perf_counter() - start
                confident |= "confidence" in choice
        return (
            first if first is not None else time.perf_counter() - start
        ), time.perf_counter() - start if confident else None

    async def client(http, k: int, end: float) -> None:
        nonlocal errors
        i = 0
        while time.perf_counter() < end:
            body = {
                "messages": [{"role": "user", "content": f"What is the capital of country {k}-{i}?"}],
                "max_tokens": max_tokens,
            }
            try:
                got = await one(http, body)
            except httpx.HTTPError:
                got = None
            if got is None or got[1] is None:
                errors += 1
            else:
                ttft.append(got[0])
                total.append(got[1])
            i += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http, k, start + duration_s) for k in range(clients)))
        elapsed = time.perf_counter() - start
    t, tot = np.array(ttft) * 1000, np.array(total) * 1000
    return {
        "mode": "stream" if stream else "non-stream",
        "requests": len(tot),
        "errors": errors,
        "rps": len(tot) / elapsed,
        "ttft_p50": float(np.percentile(t, 50)),
        "ttft_p99": float(np.percentile(t, 99)),
        "total_p50": float(np.percentile(tot, 50)),
        "total_p99": float(np.percentile(tot, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fake-step-ms", type=float, default=20.0, help="model double: ms per decode step")
    parser.add_argument(
        "--smollm2", action="store_true", help="real SmolLM2-135M-Instruct (CPU), synthetic probe"
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per mode")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    args = parser.parse_args()
    if not 1 <= args.clients <= MAX_CLIENTS or not 1 <= args.duration <= MAX_DURATION_S:
        parser.error(f"--clients in 1..{MAX_CLIENTS}, --duration in 1..{MAX_DURATION_S}")
    print(
        "MODEL:",
        "SmolLM2-135M-Instruct on CPU, synthetic probe at layer 12 / answer_mean"
        if args.smollm2
        else f"FAKE double, {args.fake_step_ms:g} ms per decode step (one sleep per step for the whole batch)",
    )
    print(f"{args.clients} clients x {args.duration:g} s per mode, max_tokens={args.max_tokens}, 127.0.0.1\n")
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    with tempfile.TemporaryDirectory() as tmp:
        child = ctx.Process(
            target=_serve_in_child, args=(args, str(Path(tmp) / "f.sqlite"), send), daemon=True
        )
        child.start()
        try:
            if not receive.poll(600):
                raise SystemExit("the server did not start")
            port = receive.recv()
            import httpx

            deadline = time.monotonic() + 600
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or not child.is_alive():
                    raise SystemExit("the server did not become healthy")
                time.sleep(0.2)
            httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                timeout=300,
                json={"messages": [{"role": "user", "content": "warm up"}], "max_tokens": args.max_tokens},
            )
            runs = [
                asyncio.run(_load(port, args.clients, args.duration, args.max_tokens, stream))
                for stream in (False, True)
            ]
        finally:
            child.terminate()
            child.join(30)
    print(
        "| mode | requests | errors | requests/s | TTFT p50 (ms) | TTFT p99 (ms) | total p50 (ms) | total p99 (ms) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(
            f"| {r['mode']} | {r['requests']} | {r['errors']} | {r['rps']:.1f} | {r['ttft_p50']:.0f} | "
            f"{r['ttft_p99']:.0f} | {r['total_p50']:.0f} | {r['total_p99']:.0f} |"
        )
    plain, streamed = runs
    print(
        f"\nstreaming: TTFT p50 {streamed['ttft_p50'] / plain['total_p50']:.2f}x of the non-streaming response "
        f"time; total p50 {streamed['total_p50'] / plain['total_p50']:.2f}x"
    )


if __name__ == "__main__":
    main()
