"""The reliability matrix of issue #21: hostile-but-fair inputs against every surface a user or an engine
can reach, each case with the class of outcome it must have.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python scripts/reliability_matrix.py [--surface NAME ...] [--workdir DIR]

Starts `probecal serve` (a real process) on a tiny random Llama and a tiny logistic probe (tests/tiny_models.py,
tests/factories.py), once on its own and once as a proxy in front of the misbehaving stub engine
(tests/openai_stub.py, a real second process on loopback), then runs each case and classifies what came
back. Classes: `answered` (a valid request answered in full), `clear 4xx / exit 2`, `clean 502/504`
(the expected ones), and the failures `own 500 / traceback`, `hang` (client timeout), `answer or label lost`,
`bad input accepted`. Prints a markdown table of counts per surface and every case whose class is not the
one expected; exits 1 if any case is a failure. Loopback only; not part of `make test` (a unit test runs
a slice: tests/unit/test_reliability_matrix.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ANSWERED, CLEAR, UPSTREAM = "answered", "clear 4xx / exit 2", "clean 502/504"
OWN500, HANG, LOST, ACCEPTED = "own 500 / traceback", "hang", "answer or label lost", "bad input accepted"
CLASSES = (ANSWERED, CLEAR, UPSTREAM, OWN500, HANG, LOST, ACCEPTED)
FAILURES = {OWN500, HANG, LOST, ACCEPTED}
CLIENT_TIMEOUT_S = 20.0  # the proxy's deadline is 3 s: anything slower than this is a hang
CLI_TIMEOUT_S = 180.0
PROBECAL = [sys.executable, "-m", "probes.cli"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
ENV.pop("PROBECAL_DEBUG", None)


@dataclass
class Case:
    surface: str
    name: str
    expect: str  # ANSWERED | CLEAR | UPSTREAM
    run: Callable[[], tuple[str, str]]  # -> (class, detail)
    got: str = ""
    detail: str = ""


@dataclass
class World:
    """What the cases run against: folders, artifacts and the base URLs of the running servers."""

    tmp: Path
    model_dir: Path
    probe: Path  # the served artifact (A)
    other: Path  # another artifact for the same model (B)
    other_model: Path  # an artifact made for another model
    damaged: Path
    own: str = ""
    proxy: str = ""
    dead: str = ""  # a proxy whose engine is down
    stub: str = ""
    processes: list = field(default_factory=list)


# --------------------------------------------------------------------------------------- classification


def _error_shape(reply: httpx.Response) -> bool:
    try:
        error = reply.json()["error"]
        return isinstance(error["message"], str) and bool(error["message"]) and isinstance(error["type"], str)
    except (ValueError, KeyError, TypeError):
        return False


def _complete(body: dict) -> bool:
    """A completion answered in full: choices, each with a confidence in [0, 1]."""
    choices = body.get("choices")
    return bool(choices) and all(
        0 <= ((c.get("confidence") or {}).get("p_correct") or -1) <= 1 for c in choices
    )


def classify(
    reply: httpx.Response, expect: str, check: Callable[[httpx.Response], bool] | None
) -> tuple[str, str]:
    status, text = reply.status_code, reply.text
    if "Traceback" in text or status == 500:
        return OWN500, f"{status} {text[:160]}"
    if status >= 400:
        if not _error_shape(reply):
            return OWN500, f"{status} without OpenAI's error shape: {text[:160]}"
        detail = f"{status} {reply.json()['error'].get('code')}: {reply.json()['error']['message'][:120]}"
        return (UPSTREAM if status in (502, 504) else CLEAR), detail
    if "text/event-stream" in reply.headers.get("content-type", ""):
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        if events and events[-1] != "[DONE]":
            try:
                error = json.loads(events[-1])["error"]
                code = str(error.get("code"))
                return (
                    UPSTREAM if code.startswith("upstream") else CLEAR
                ), f"SSE error {code}: {error['message'][:100]}"
            except (ValueError, KeyError, TypeError):
                return LOST, f"stream ended without [DONE] or an error event: {events[-1][:100]}"
        if not events:
            return LOST, "empty stream"
        if expect != ANSWERED:
            return ACCEPTED, "stream answered"
        confident = [e for e in events[:-1] if '"confidence"' in e]
        return (ANSWERED, f"{len(events)} events") if confident else (LOST, "stream without a confidence")
    if expect != ANSWERED:
        return ACCEPTED, f"{status} {text[:160]}"
    ok = check(reply) if check else True
    return (ANSWERED, f"{status}") if ok else (LOST, f"{status} incomplete: {text[:160]}")


def http_case(
    method: str,
    url: str,
    expect: str,
    *,
    json_body=None,
    content: bytes | None = None,
    headers: dict | None = None,
    check: Callable[[httpx.Response], bool] | None = None,
) -> Callable[[], tuple[str, str]]:
    def run() -> tuple[str, str]:
        try:
            reply = httpx.request(
                method,
                url,
                # json.dumps escapes a lone surrogate as \\ud83d, which httpx's json= cannot encode
                content=content if content is not None or json_body is None else json.dumps(json_body),
                headers={"content-type": "application/json", **(headers or {})},
                timeout=CLIENT_TIMEOUT_S,
            )
        except httpx.TimeoutException:
            return HANG, f"no answer within {CLIENT_TIMEOUT_S:g} s"
        except httpx.HTTPError as err:
            return OWN500, f"connection failed ({type(err).__name__}): the server died?"
        return classify(reply, expect, check)

    return run


def cli_case(
    args: list[str], expect: str, check: Callable[[], bool] | None = None
) -> Callable[[], tuple[str, str]]:
    """`probecal ARGS` as a process: exit 2 with one `error:` line is clear; a traceback an own failure."""

    def run() -> tuple[str, str]:
        try:
            done = subprocess.run(
                [*PROBECAL, *args], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=CLI_TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            return HANG, f"still running after {CLI_TIMEOUT_S:g} s"
        err = [line for line in done.stderr.splitlines() if line.strip()]
        last = err[-1] if err else ""
        if "Traceback" in done.stderr:
            return OWN500, "traceback: " + last[:160]
        if done.returncode == 2 and "error:" in last:
            if check is not None and not check():
                return LOST, "refused, but something was written or changed: " + last[:120]
            return CLEAR, last[:200]
        if done.returncode == 0:
            if expect != ANSWERED:
                return ACCEPTED, "exit 0: " + (done.stdout.strip().splitlines() or [""])[-1][:160]
            ok = check() if check else True
            return (ANSWERED, "exit 0") if ok else (LOST, "exit 0 but the result is missing")
        return OWN500, f"exit {done.returncode}: {last[:160]}"

    return run


# --------------------------------------------------------------------------------------- the world


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_world(tmp: Path) -> World:
    from extract.models import ModelSpec, load_model
    from probes.artifact import ProbeArtifact
    from tests.factories import fitted_artifact
    from tests.tiny_models import save_tiny_llama

    model_dir = save_tiny_llama(tmp / "model")
    fingerprint = load_model(ModelSpec(name="tiny-llama", path=str(model_dir), device="cpu")).fingerprint
    settings = {"generation": {"stop_strings": ["?"]}}
    world = World(tmp, model_dir, tmp / "probe", tmp / "other", tmp / "other_model", tmp / "damaged")
    fitted_artifact(fingerprint, 1, "answer_last", extract_settings=settings).save(world.probe)
    fitted_artifact(fingerprint, 2, "answer_last", seed=1, extract_settings=settings).save(world.other)
    elsewhere = replace(fingerprint, name="another-model", hidden_size=fingerprint.hidden_size + 8)
    fitted_artifact(elsewhere, 1, "answer_last", extract_settings=settings).save(world.other_model)
    ProbeArtifact.load(world.probe).save(world.damaged)
    meta = json.loads((world.damaged / "probe.json").read_text())
    meta["layer"] = 2  # an edited field: the digest no longer matches
    (world.damaged / "probe.json").write_text(json.dumps(meta))
    return world


def model_args(world: World) -> list[str]:
    return ["model=hf", f"model.path={world.model_dir}", "model.name=tiny-llama", "model.device=cpu"]


def start_servers(world: World) -> None:
    stub_port = free_port()
    world.stub = f"http://127.0.0.1:{stub_port}"
    world.processes.append(
        subprocess.Popen([sys.executable, str(ROOT / "tests" / "openai_stub.py"), str(stub_port)], env=ENV)
    )
    common = [*model_args(world), f"serve.probe_dir={world.probe}", "serve.max_request_bytes=100000"]
    proxy = ["serve.upstream_timeout_s=2", "serve.upstream_deadline_s=3", "serve.upstream_max_bytes=100000"]
    for name, extra in (
        ("own", []),
        ("proxy", [f"serve.upstream={world.stub}/v1", *proxy]),
        ("dead", [f"serve.upstream=http://127.0.0.1:{free_port()}/v1", *proxy]),
    ):
        port = free_port()
        args = [
            "serve",
            *common,
            *extra,
            f"serve.port={port}",
            f"serve.db_path={world.tmp / name / 'feedback.sqlite'}",
            f"hydra.run.dir={world.tmp / 'runs' / name}",
        ]
        log = open(world.tmp / f"{name}.log", "w")  # noqa: SIM115 (open while the server runs)
        world.processes.append(
            subprocess.Popen([*PROBECAL, *args], env=ENV, cwd=ROOT, stdout=log, stderr=log)
        )
        setattr(world, name, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 300
    for base in (world.stub, world.own, world.proxy, world.dead):
        path = "/calls" if base == world.stub else "/health"
        while True:
            try:
                httpx.get(base + path, timeout=2)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or any(p.poll() is not None for p in world.processes):
                    raise SystemExit(f"a server did not start; see the logs in {world.tmp}") from None
                time.sleep(0.3)


def stop_servers(world: World) -> None:
    for process in world.processes:
        process.terminate()
    for process in world.processes:
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


# --------------------------------------------------------------------------------------- the cases

LONG = "w " * 400  # beyond the tiny model's 256-token context


def chat(content: str = "what is the capital of france ?", **kw) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4, **kw}


def completion_cases(world: World) -> list[Case]:
    s, base = "own: completions", world.own
    chat_url, text_url = f"{base}/v1/chat/completions", f"{base}/v1/completions"
    ok = lambda r: _complete(r.json())  # noqa: E731
    cases = [
        Case(s, "chat", ANSWERED, http_case("POST", chat_url, ANSWERED, json_body=chat(), check=ok)),
        Case(s, "chat n=2", ANSWERED, http_case("POST", chat_url, ANSWERED, json_body=chat(n=2), check=ok)),
        Case(s, "chat stream", ANSWERED, http_case("POST", chat_url, ANSWERED, json_body=chat(stream=True))),
        Case(
            s,
            "completion",
            ANSWERED,
            http_case(
                "POST", text_url, ANSWERED, json_body={"prompt": "what is 2 + 2 ?", "max_tokens": 4}, check=ok
            ),
        ),
        Case(
            s,
            "completion stream",
            ANSWERED,
            http_case(
                "POST", text_url, ANSWERED, json_body={"prompt": "hi ?", "max_tokens": 4, "stream": True}
            ),
        ),
        Case(
            s,
            "chat domain tag",
            ANSWERED,
            http_case("POST", chat_url, ANSWERED, json_body=chat(metadata={"domain": "geo"}), check=ok),
        ),
    ]
    bad_chat = {
        "no messages": {},
        "messages a string": {"messages": "hi"},
        "messages empty": {"messages": []},
        "unknown role": {"messages": [{"role": "wizard", "content": "x"}]},
        "content a number": {"messages": [{"role": "user", "content": 5}]},
        "content missing": {"messages": [{"role": "user"}]},
        "n=0": chat(n=0),
        "n=100": chat(n=100),
        "max_tokens=-1": chat(max_tokens=-1),
        "max_tokens=10^9": chat(max_tokens=10**9),
        "max_tokens a string": chat(max_tokens="ten"),
        "temperature a string": chat(temperature="hot"),
        "temperature=-1": chat(temperature=-1),
        "top_p=2": chat(top_p=2),
        "stop a number": chat(stop=123),
        "stop of 50 strings": chat(stop=["a"] * 50),
        "model of another name": chat(model="other-model"),
        "stream a string": chat(stream="yes"),
        "domain a number": chat(domain=5),
        "domain of 200 chars": chat(domain="x" * 200),
        "metadata a string": chat(metadata="geo"),
        "metadata value a number": chat(metadata={"domain": 1}),
        "engine option top_k (own server)": chat(top_k=5),
        "prompt beyond the context": chat(LONG),
        "content with a lone surrogate": chat("paris \ud83d"),
        "stop with a lone surrogate": chat(stop="\udc00"),
        "stream prompt beyond the context": chat(LONG, stream=True),
    }
    cases += [
        Case(s, f"chat: {k}", CLEAR, http_case("POST", chat_url, CLEAR, json_body=v))
        for k, v in bad_chat.items()
    ]
    bad_text = {
        "no prompt": {"max_tokens": 4},
        "prompt a number": {"prompt": 5},
        "prompt null": {"prompt": None},
        "prompt a dict": {"prompt": {"a": 1}},
        "prompt beyond the context": {"prompt": LONG},
        "max_tokens=0": {"prompt": "x", "max_tokens": 0},
        "prompt with a lone surrogate": {"prompt": "\ud83d", "max_tokens": 4},
        "stream prompt with a lone surrogate": {"prompt": "\ud83d", "max_tokens": 4, "stream": True},
        "logprobs": {"prompt": "x", "max_tokens": 4, "logprobs": 2},
        "echo": {"prompt": "x", "max_tokens": 4, "echo": True},
    }
    cases += [
        Case(s, f"completion: {k}", CLEAR, http_case("POST", text_url, CLEAR, json_body=v))
        for k, v in bad_text.items()
    ]
    raw = {
        "body not JSON": b"{not json",
        "body a list": b"[1, 2]",
        "body empty": b"",
        "body of 200 KB (> serve.max_request_bytes)": json.dumps(chat("w " * 100_000)).encode(),
    }
    cases += [
        Case(s, f"chat: {k}", CLEAR, http_case("POST", chat_url, CLEAR, content=v)) for k, v in raw.items()
    ]
    cases.append(
        Case(s, "unknown route", CLEAR, http_case("POST", f"{base}/v1/nothing", CLEAR, json_body={}))
    )
    cases.append(Case(s, "GET on a POST route", CLEAR, http_case("GET", chat_url, CLEAR)))
    return cases


def proxy_cases(world: World) -> list[Case]:
    s = "proxy: bad engines"
    cases = []
    non_streamed = {
        "badjson": UPSTREAM, "choices_str": UPSTREAM, "choices_null": UPSTREAM, "choices_missing": UPSTREAM,
        "body_list": UPSTREAM, "e503": UPSTREAM, "redirect": UPSTREAM, "crash": UPSTREAM, "huge": UPSTREAM,
        "slowbody": UPSTREAM, "text_int": UPSTREAM, "surrogate": UPSTREAM, "int_code": CLEAR, "fail400": CLEAR,
        "number": ANSWERED,
        "newline": ANSWERED, "ok": ANSWERED,
    }  # fmt: skip
    streamed = {
        "plainjson": UPSTREAM, "badindex": UPSTREAM, "nodone": UPSTREAM, "endless": UPSTREAM, "e503": UPSTREAM,
        "redirect": UPSTREAM, "crash": UPSTREAM, "slowbody": UPSTREAM, "surrogate": UPSTREAM, "fail400": CLEAR,
        "number": ANSWERED,
        "ok": ANSWERED,
    }  # fmt: skip
    for endpoint in ("chat", "completions"):
        url = f"{world.proxy}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}"
        for stream, modes in ((False, non_streamed), (True, streamed)):
            for mode, expect in modes.items():
                prompt = "q " + {"fail400": "fail400", "crash": "crash", "ok": "hello"}.get(
                    mode, f"mode={mode}"
                )
                body = chat(prompt) if endpoint == "chat" else {"prompt": prompt, "max_tokens": 4}
                if stream:
                    body["stream"] = True
                check = (lambda r: _complete(r.json())) if expect == ANSWERED and not stream else None
                name = f"{endpoint}{' stream' if stream else ''}: {mode}"
                cases.append(
                    Case(s, name, expect, http_case("POST", url, expect, json_body=body, check=check))
                )
    for endpoint in ("chat/completions", "completions"):
        body = chat() if endpoint == "chat/completions" else {"prompt": "hi", "max_tokens": 4}
        url = f"{world.dead}/v1/{endpoint}"
        cases.append(
            Case("proxy: engine down", endpoint, UPSTREAM, http_case("POST", url, UPSTREAM, json_body=body))
        )
    health = http_case(
        "GET", f"{world.dead}/health", ANSWERED, check=lambda r: r.json()["status"] == "degraded"
    )
    cases.append(Case("proxy: engine down", "/health says degraded", ANSWERED, health))
    return cases


def batched(
    world: World, surface: str, url: str, bad_body: dict, good_body: dict, expect_bad: str, label: str
) -> list[Case]:
    """One bad request sent together with 5 valid ones: the bad one alone fails, each neighbour is answered."""
    results: dict[int, tuple[str, str]] = {}

    def run_all() -> None:
        if results:
            return
        bodies = [good_body] * 3 + [bad_body] + [good_body] * 2
        expects = [ANSWERED] * 3 + [expect_bad] + [ANSWERED] * 2
        check = (
            (lambda r: 0 <= r.json().get("p_correct", -1) <= 1)
            if url.endswith("/score")
            else (lambda r: _complete(r.json()))
        )
        runs = [
            http_case("POST", url, e, json_body=b, check=check) for b, e in zip(bodies, expects, strict=True)
        ]
        with ThreadPoolExecutor(len(runs)) as pool:
            for i, outcome in enumerate(pool.map(lambda f: f(), runs)):
                results[i] = outcome

    def nth(i: int) -> Callable[[], tuple[str, str]]:
        return lambda: (run_all(), results[i])[1]

    return [
        Case(
            surface,
            f"{label}: {'the bad one' if i == 3 else f'neighbour {i}'}",
            expect_bad if i == 3 else ANSWERED,
            nth(i),
        )
        for i in range(6)
    ]


def score_cases(world: World) -> list[Case]:
    s, url = "/v1/score", f"{world.own}/v1/score"
    ok = lambda r: 0 <= r.json().get("p_correct", -1) <= 1  # noqa: E731
    good = {"prompt": "what is the capital of france ?", "completion": "paris"}
    cases = [
        Case(s, "text", ANSWERED, http_case("POST", url, ANSWERED, json_body=good, check=ok)),
        Case(
            s,
            "token ids",
            ANSWERED,
            http_case("POST", url, ANSWERED, json_body={"prompt": [5, 6, 7], "completion": [8, 9]}, check=ok),
        ),
        Case(
            s,
            "messages",
            ANSWERED,
            http_case(
                "POST",
                url,
                ANSWERED,
                json_body={"messages": chat()["messages"], "completion": "paris"},
                check=ok,
            ),
        ),
        Case(
            s,
            "with a domain",
            ANSWERED,
            http_case("POST", url, ANSWERED, json_body={**good, "domain": "geo"}, check=ok),
        ),
    ]
    bad = {
        "completion id = vocab size (99)": {"prompt": [5], "completion": [99]},
        "completion id 10^6": {"prompt": [5], "completion": [10**6]},
        "completion id -1": {"prompt": [5], "completion": [-1]},
        "completion id 2^70": {"prompt": [5], "completion": [2**70]},
        "completion id 1.5": {"prompt": [5], "completion": [1.5]},
        "completion id a string": {"prompt": [5], "completion": ["a"]},
        "completion id null": {"prompt": [5], "completion": [None]},
        "completion id true": {"prompt": [5], "completion": [True]},
        "completion nested list": {"prompt": [5], "completion": [[1]]},
        "prompt id 99": {"prompt": [99], "completion": [5]},
        "prompt id -7": {"prompt": [-7], "completion": "a"},
        "prompt ids empty": {"prompt": [], "completion": "a"},
        "no completion": {"prompt": "q"},
        "completion null": {"prompt": "q", "completion": None},
        "completion a number": {"prompt": "q", "completion": 5},
        "completion a dict": {"prompt": "q", "completion": {"a": 1}},
        "no prompt nor messages": {"completion": "a"},
        "prompt and messages": {"prompt": "q", "messages": chat()["messages"], "completion": "a"},
        "completion beyond the context": {"prompt": "q", "completion": LONG},
        "completion with a lone surrogate": {"prompt": "q", "completion": "paris \udc00"},
        "prompt with a lone surrogate": {"prompt": "q \ud83d", "completion": "paris"},
        "prompt beyond the context": {"prompt": LONG, "completion": "a"},
        "stop a number": {**good, "stop": 5},
        "domain with a space": {**good, "domain": "a b"},
        "model of another name": {**good, "model": "other-model"},
    }
    cases += [Case(s, k, CLEAR, http_case("POST", url, CLEAR, json_body=v)) for k, v in bad.items()]
    for bad_ids in ([99999], [-1], [2**70]):
        cases += batched(
            world, s, url, {"prompt": [5], "completion": bad_ids}, good, CLEAR, f"batched with {bad_ids}"
        )
    chat_url = f"{world.proxy}/v1/chat/completions"
    for mode, expect in (("number", ANSWERED), ("text_int", UPSTREAM), ("surrogate", UPSTREAM)):
        cases += batched(
            world,
            "proxy: bad engines",
            chat_url,
            chat(f"q mode={mode}"),
            chat("q hello"),
            expect,
            f"batched with mode={mode}",
        )
    return cases


def reload_cases(world: World) -> list[Case]:
    from probes.serving.api_router import FORWARDING_HEADERS

    s, url = "/admin/reload", f"{world.own}/admin/reload"
    (world.tmp / "empty").mkdir(exist_ok=True)
    (world.tmp / "a_file").write_text("x")
    bad = {
        "no such folder": {"probe_dir": str(world.tmp / "nothing")},
        "a file": {"probe_dir": str(world.tmp / "a_file")},
        "an empty folder": {"probe_dir": str(world.tmp / "empty")},
        "an edited artifact (digest)": {"probe_dir": str(world.damaged)},
        "an artifact of another model": {"probe_dir": str(world.other_model)},
        "empty path": {"probe_dir": ""},
        "path a number": {"probe_dir": 5},
        "path null": {"probe_dir": None},
        "no path": {},
        "relative ../../": {"probe_dir": "../../../../../etc"},
        "a NUL byte": {"probe_dir": "a\u0000b"},
        "the model folder": {"probe_dir": str(world.model_dir)},
    }
    cases = [Case(s, k, CLEAR, http_case("POST", url, CLEAR, json_body=v)) for k, v in bad.items()]
    good = {"probe_dir": str(world.other)}
    for header in (*FORWARDING_HEADERS, "x-forwarded-for", "x-forwarded-host"):
        cases.append(
            Case(
                s,
                f"forwarded: {header}",
                CLEAR,
                http_case("POST", url, CLEAR, json_body=good, headers={header: "203.0.113.7"}),
            )
        )
    cases.append(
        Case(
            s,
            "bearer token when none is set, with Via",
            CLEAR,
            http_case(
                "POST",
                url,
                CLEAR,
                json_body=good,
                headers={"authorization": "Bearer x" * 3, "via": "1.1 nginx"},
            ),
        )
    )
    cases.append(
        Case(s, "another artifact of the model", ANSWERED, http_case("POST", url, ANSWERED, json_body=good))
    )
    cases.append(
        Case(
            s,
            "back to the first",
            ANSWERED,
            http_case("POST", url, ANSWERED, json_body={"probe_dir": str(world.probe)}),
        )
    )
    return cases


def labelled(world: World, response_id: str) -> int | None:
    with sqlite3.connect(f"file:{world.tmp / 'own' / 'feedback.sqlite'}?mode=ro", uri=True) as db:
        row = db.execute(
            "SELECT correct FROM feedback WHERE response_id=? ORDER BY seq DESC", (response_id,)
        ).fetchone()
    return None if row is None else row[0]


def feedback_cases(world: World) -> list[Case]:
    s, url = "/v1/feedback", f"{world.own}/v1/feedback"
    ids: list[str] = []

    def response_id() -> str:
        if not ids:
            ids.append(
                httpx.post(f"{world.own}/v1/chat/completions", json=chat(), timeout=CLIENT_TIMEOUT_S).json()[
                    "id"
                ]
            )
        return ids[0]

    def label(correct: bool) -> Callable[[], tuple[str, str]]:
        def run() -> tuple[str, str]:
            got = http_case("POST", url, ANSWERED, json_body={"id": response_id(), "correct": correct})()
            if got[0] == ANSWERED and labelled(world, response_id()) != int(correct):
                return LOST, f"200, but the database holds {labelled(world, response_id())!r}"
            return got

        return run

    def bad(body: Callable[[], dict]) -> Callable[[], tuple[str, str]]:
        return lambda: http_case("POST", url, CLEAR, json_body=body())()

    cases = [
        Case(s, "label true", ANSWERED, label(True)),
        Case(s, "label false (last wins)", ANSWERED, label(False)),
    ]
    bodies = {
        "unknown id": lambda: {"id": "chatcmpl-nope", "correct": True},
        "id a number": lambda: {"id": 5, "correct": True},
        "id null": lambda: {"id": None, "correct": True},
        "id of 10,000 chars": lambda: {"id": "x" * 10_000, "correct": True},
        "correct 'yes'": lambda: {"id": response_id(), "correct": "yes"},
        "correct 2": lambda: {"id": response_id(), "correct": 2},
        "correct missing": lambda: {"id": response_id()},
        "index 5 of a 1-choice answer": lambda: {"id": response_id(), "correct": True, "index": 5},
        "index -1": lambda: {"id": response_id(), "correct": True, "index": -1},
        "an unknown field": lambda: {"id": response_id(), "correct": True, "labeller": "me"},
        "empty body": lambda: {},
    }
    cases += [Case(s, k, CLEAR, bad(v)) for k, v in bodies.items()]
    cases.append(Case(s, "body not JSON", CLEAR, http_case("POST", url, CLEAR, content=b"{")))
    return cases


def write_errors(metrics: str) -> float:
    found = re.search(r"^probecal_feedback_write_errors_total (\S+)$", metrics, re.M)
    return float(found.group(1)) if found else 0.0


def read_only_cases(world: World) -> list[Case]:
    """The own server's feedback database made immutable while serving (chattr +i, as a full or read-only
    disk would): answers still reach the client, the failed writes are counted and /health says degraded."""
    s, base = "feedback DB read-only", world.own
    db = world.tmp / "own" / "feedback.sqlite"

    served: list[str] = []

    def freeze() -> tuple[str, str]:
        reply = httpx.post(f"{base}/v1/chat/completions", json=chat(), timeout=CLIENT_TIMEOUT_S)
        served.append(reply.json()["id"])
        for path in (*db.parent.glob("feedback.sqlite*"), db.parent):
            if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
                raise SystemExit("the read_only surface needs chattr +i (root); leave it out with --surface")
        return ANSWERED, "chattr +i"

    ok = lambda r: _complete(r.json())  # noqa: E731
    return [
        Case(s, "freeze the database", ANSWERED, freeze),
        Case(
            s,
            "chat still answered",
            ANSWERED,
            http_case("POST", f"{base}/v1/chat/completions", ANSWERED, json_body=chat(), check=ok),
        ),
        Case(
            s,
            "completion still answered",
            ANSWERED,
            http_case(
                "POST",
                f"{base}/v1/completions",
                ANSWERED,
                json_body={"prompt": "hi ?", "max_tokens": 4},
                check=ok,
            ),
        ),
        Case(
            s,
            "stream still ends with [DONE]",
            ANSWERED,
            http_case("POST", f"{base}/v1/chat/completions", ANSWERED, json_body=chat(stream=True)),
        ),
        Case(
            s,
            "score still answered",
            ANSWERED,
            http_case("POST", f"{base}/v1/score", ANSWERED, json_body={"prompt": "q", "completion": "a"}),
        ),
        Case(
            s,
            "feedback on a served answer: 503, retry later",
            CLEAR,
            lambda: http_case(
                "POST", f"{base}/v1/feedback", CLEAR, json_body={"id": served[0], "correct": True}
            )(),
        ),
        Case(
            s,
            "/health says degraded",
            ANSWERED,
            http_case("GET", f"{base}/health", ANSWERED, check=lambda r: r.json()["status"] == "degraded"),
        ),
        Case(
            s,
            "/metrics counts the failed writes",
            ANSWERED,
            http_case(
                "GET",
                f"{base}/metrics",
                ANSWERED,
                check=lambda r: write_errors(r.text) >= 4,
            ),
        ),
        Case(
            s,
            "start-up on the read-only database",
            CLEAR,
            cli_case(
                [
                    "serve",
                    *model_args(world),
                    f"serve.probe_dir={world.probe}",
                    f"serve.db_path={db}",
                    f"serve.port={free_port()}",
                    f"hydra.run.dir={world.tmp / 'runs' / 'ro'}",
                ],
                CLEAR,
            ),
        ),
    ]


def thaw(world: World) -> None:
    db = world.tmp / "own" / "feedback.sqlite"
    for path in (db.parent, *db.parent.glob("feedback.sqlite*")):
        subprocess.run(["chattr", "-i", str(path)], check=False)


def digest(folder: Path) -> str:
    return json.loads((folder / "probe.json").read_text())["digest"]


def recalibrate_cases(world: World) -> list[Case]:
    import numpy as np

    s = "probecal recalibrate"
    rng = np.random.default_rng(0)
    rows = world.tmp / "rows"
    rows.mkdir(exist_ok=True)

    def write(name: str, records: list, raw: str | None = None) -> Path:
        path = rows / name
        path.write_text(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in records))
        return path

    scores = rng.normal(0, 2, 200)
    correct = (rng.random(200) < 1 / (1 + np.exp(-scores))).astype(int)
    good = write(
        "good.jsonl",
        [
            {"id": f"r{i}", "score": float(x), "correct": int(c), "domain": "geo"}
            for i, (x, c) in enumerate(zip(scores, correct, strict=True))
        ],
    )
    reversed_rows = write(
        "reversed.jsonl",
        [{"id": f"r{i}", "score": float(x), "correct": int(x < 0)} for i, x in enumerate(scores)],
    )
    parent = digest(world.probe)
    three = write("three.jsonl", [{"score": x, "correct": int(x > 0)} for x in (1.0, -1.0, 0.5)])
    bad_line = write("badline.jsonl", [], raw=good.read_text() + "{oops\n")
    nan_rows = write("nan.jsonl", [], raw='{"score": NaN, "correct": 1}\n' * 50)
    counter = iter(range(10_000))

    def args(*extra: str, output: Path | None = None) -> list[str]:
        run = world.tmp / "runs" / f"recal{next(counter)}"
        out = output or run / "probe"
        return [
            "recalibrate",
            f"recalibrate.probe_dir={world.probe}",
            *model_args(world),
            f"recalibrate.output_dir={out}",
            f"hydra.run.dir={run}",
            *extra,
        ]

    untouched = lambda: digest(world.probe) == parent  # noqa: E731
    written = world.tmp / "child"
    (world.tmp / "occupied").mkdir(exist_ok=True)
    (world.tmp / "occupied" / "keep.txt").write_text("mine")
    bad = {
        "heldout_fraction=1": args(f"recalibrate.rows={good}", "recalibrate.heldout_fraction=1"),
        "heldout_fraction=0": args(f"recalibrate.rows={good}", "recalibrate.heldout_fraction=0"),
        "heldout_fraction=-0.5": args(f"recalibrate.rows={good}", "recalibrate.heldout_fraction=-0.5"),
        "heldout_fraction=2": args(f"recalibrate.rows={good}", "recalibrate.heldout_fraction=2"),
        "heldout_fraction=abc": args(f"recalibrate.rows={good}", "recalibrate.heldout_fraction=abc"),
        "output_dir = the parent": args(f"recalibrate.rows={good}", output=world.probe),
        "output_dir = an occupied folder": args(f"recalibrate.rows={good}", output=world.tmp / "occupied"),
        "feedback of another artifact": [
            "recalibrate",
            f"recalibrate.probe_dir={world.other}",
            *model_args(world),
            f"recalibrate.from_feedback={world.tmp / 'own' / 'feedback.sqlite'}",
            f"recalibrate.output_dir={world.tmp / 'runs' / 'fb' / 'probe'}",
            f"hydra.run.dir={world.tmp / 'runs' / 'fb'}",
        ],
        "feedback DB not SQLite": args(f"recalibrate.from_feedback={rows / 'good.jsonl'}"),
        "feedback DB missing": args(f"recalibrate.from_feedback={rows / 'none.sqlite'}"),
        "rows and feedback both": args(
            f"recalibrate.rows={good}", f"recalibrate.from_feedback={world.tmp / 'own' / 'feedback.sqlite'}"
        ),
        "rows file missing": args(f"recalibrate.rows={rows / 'none.jsonl'}"),
        "rows file .txt": args(f"recalibrate.rows={write('rows.txt', [{'score': 1, 'correct': 1}])}"),
        "rows file empty": args(f"recalibrate.rows={write('empty.jsonl', [], raw='')}"),
        "rows: a line not JSON": args(f"recalibrate.rows={bad_line}"),
        "rows: correct=2": args(f"recalibrate.rows={write('c2.jsonl', [{'score': 1.0, 'correct': 2}] * 50)}"),
        "rows: p_correct=1.5": args(
            f"recalibrate.rows={write('p15.jsonl', [{'p_correct': 1.5, 'correct': 1}] * 50)}"
        ),
        "rows: score NaN": args(f"recalibrate.rows={nan_rows}"),
        "rows: no correct": args(f"recalibrate.rows={write('nocorrect.jsonl', [{'score': 1.0}] * 50)}"),
        "rows: no score": args(f"recalibrate.rows={write('noscore.jsonl', [{'correct': 1}] * 50)}"),
        "rows: 3 rows": args(f"recalibrate.rows={three}"),
        "rows: one class only": args(
            f"recalibrate.rows={write('oneclass.jsonl', [{'score': float(x), 'correct': 1} for x in scores])}"
        ),
        "a calibrator reversing the probe": args(f"recalibrate.rows={reversed_rows}"),
        "kind=nosuch": args(f"recalibrate.rows={good}", "recalibrate.kind=nosuch"),
        "probe_dir missing": [
            "recalibrate",
            *model_args(world),
            f"recalibrate.rows={good}",
            f"hydra.run.dir={world.tmp / 'runs' / 'nop'}",
        ],
        "probe_dir nonexistent": [
            "recalibrate",
            f"recalibrate.probe_dir={world.tmp / 'nothing'}",
            *model_args(world),
            f"recalibrate.rows={good}",
            f"hydra.run.dir={world.tmp / 'runs' / 'nop2'}",
        ],
        "probe_dir edited (digest)": [
            "recalibrate",
            f"recalibrate.probe_dir={world.damaged}",
            *model_args(world),
            f"recalibrate.rows={good}",
            f"hydra.run.dir={world.tmp / 'runs' / 'nop3'}",
        ],
    }
    cases = [Case(s, k, CLEAR, cli_case(v, CLEAR, untouched)) for k, v in bad.items()]
    child_ok = lambda: (written / "probe.json").is_file() and untouched()  # noqa: E731
    cases.append(
        Case(
            s,
            "rows (200, valid)",
            ANSWERED,
            cli_case(args(f"recalibrate.rows={good}", output=written), ANSWERED, child_ok),
        )
    )
    return cases


def start_up_cases(world: World) -> list[Case]:
    s = "serve start-up + CLI config"

    def serve(*extra: str) -> list[str]:
        run = world.tmp / "runs" / f"start{len(extra)}{abs(hash(extra)) % 10**6}"
        return [
            "serve",
            *model_args(world),
            f"serve.probe_dir={world.probe}",
            f"serve.port={free_port()}",
            f"serve.db_path={run / 'f.sqlite'}",
            f"hydra.run.dir={run}",
            *extra,
        ]

    (world.tmp / "not_sqlite.db").write_text("hello")
    bad = {
        "db_path a folder": serve(f"serve.db_path={world.tmp}"),
        "db_path not SQLite": serve(f"serve.db_path={world.tmp / 'not_sqlite.db'}"),
        "port 70000": serve("serve.port=70000"),
        "probe_dir null": serve("serve.probe_dir=null"),
        "probe_dir nonexistent": serve(f"serve.probe_dir={world.tmp / 'nothing'}"),
        "probe of another model": serve(f"serve.probe_dir={world.other_model}"),
        "admin_token of 8 chars": serve("serve.admin_token=12345678"),
        "upstream not a URL": serve("serve.upstream=localhost:8001"),
        "upstream_deadline_s=0": serve("serve.upstream_deadline_s=0"),
        "max_batch_size=0": serve("serve.max_batch_size=0"),
        "-m probe=logistic,nosuch": ["train", "-m", "probe=logistic,nosuch"],
        "-m train.n_folds=3,a": ["train", "-m", "train.n_folds=3,a"],
        "unknown key": ["serve", "serve.prot=1"],
    }
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()

    def port_busy() -> tuple[str, str]:
        with busy:  # another server holds the port
            return cli_case(serve(f"serve.port={busy.getsockname()[1]}"), CLEAR)()

    return [Case(s, k, CLEAR, cli_case(v, CLEAR)) for k, v in bad.items()] + [
        Case(s, "port busy", CLEAR, port_busy)
    ]


SURFACES: dict[str, Callable[[World], list[Case]]] = {
    "completions": completion_cases,
    "proxy": proxy_cases,
    "score": score_cases,
    "reload": reload_cases,
    "feedback": feedback_cases,
    "read_only": read_only_cases,
    "recalibrate": recalibrate_cases,
    "start_up": start_up_cases,
}
NEEDS_SERVERS = {"completions", "proxy", "score", "reload", "feedback", "read_only"}


def run_matrix(world: World, surfaces: list[str], log: Callable[[str], None] = print) -> list[Case]:
    cases: list[Case] = []
    try:
        if NEEDS_SERVERS & set(surfaces):
            start_servers(world)
        for name in surfaces:
            if name == "recalibrate" and "read_only" in surfaces:
                thaw(world)
            for case in SURFACES[name](world):
                case.got, case.detail = case.run()
                mark = "ok " if case.got == case.expect else "BAD"
                log(f"{mark} {case.surface} | {case.name}: {case.got} ({case.detail})")
                cases.append(case)
    finally:
        thaw(world)
        stop_servers(world)
    return cases


def table(cases: list[Case]) -> str:
    surfaces = list(dict.fromkeys(c.surface for c in cases))
    lines = ["| surface | cases | " + " | ".join(CLASSES) + " |", "|---|---:|" + "---:|" * len(CLASSES)]
    for surface in [*surfaces, None]:
        chosen = [c for c in cases if surface is None or c.surface == surface]
        counts = Counter(c.got for c in chosen)
        label = "**all**" if surface is None else surface
        lines.append(f"| {label} | {len(chosen)} | " + " | ".join(str(counts[k]) for k in CLASSES) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--surface", action="append", choices=list(SURFACES), help="run only these (repeatable)"
    )
    parser.add_argument("--workdir", help="keep the servers' logs and artifacts here (default: a temp dir)")
    parser.add_argument("--quiet", action="store_true", help="print only the table and the non-clean cases")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="probecal-matrix-") as scratch:
        tmp = Path(args.workdir or scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        world = build_world(tmp)
        cases = run_matrix(world, args.surface or list(SURFACES), (lambda _: None) if args.quiet else print)
    print(f"\n{table(cases)}\n")
    unexpected = [c for c in cases if c.got != c.expect]
    for c in unexpected:
        print(f"- {c.surface} | {c.name}: expected {c.expect}, got {c.got}: {c.detail}")
    failures = sum(c.got in FAILURES for c in cases)
    print(f"\n{len(cases)} cases, {failures} failures, {len(unexpected)} not as expected, "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
