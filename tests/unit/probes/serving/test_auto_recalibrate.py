"""serve.auto_recalibrate on the tiny Llama: while threads hammer /v1/score and chat completions, labels arrive
for one domain; a better child is refit in the background and swapped in, a worse one is refused, no request
fails, each attempt is one log line and a /metrics count. The labels are built so that each outcome happens:
phase 1 says the parent (p ~ 0.8) is far too confident (3 of 24 right); phase 2 labels the child's answers,
the older wrong and the newest right, so a refit on the older labels pushes p further down while the newest
(held back) labels say it should go up."""

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from extract.models import from_transformers
from probes.artifact import ProbeArtifact
from probes.calibration import ShrinkageCalibrator
from probes.estimators import LogisticProbe
from probes.runtime.wrapper import ProbedModel
from probes.serving.app import create_app
from probes.serving.feedback import FeedbackStore
from probes.serving.settings import ServeSettings
from tests.unit.probes.test_recalibration import platt

LAYER = 2
WORDS = ["paris", "tokyo", "berlin", "rome", "madrid", "cairo", "lima", "oslo"]


def parent_dir(loaded, directory):
    """An answer_last probe on the tiny Llama with a Platt map that says p ~ 0.8 for every answer."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, loaded.fingerprint.hidden_size))
    probe = LogisticProbe(C=1.0).fit(X, (X[:, 0] > 0).astype(int))
    settings = {"generation": {"stop_strings": ["?"]}, "prompt": {"instruction": "answer briefly"}}
    artifact = ProbeArtifact.create(
        probe, platt(0.05, 1.4), LAYER, "answer_last", loaded.fingerprint, extract_settings=settings
    )
    return artifact.save(directory)


def metric(client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_better_child_swapped_worse_refused_under_concurrent_requests(
    tiny_llama, word_tokenizer, tmp_path, caplog
):
    loaded = from_transformers(tiny_llama, word_tokenizer, name="tiny-llama")
    model = ProbedModel.from_transformers(
        loaded.model, loaded.tokenizer, parent_dir(loaded, tmp_path / "parent"), threshold=None
    )
    parent_digest = model.artifact_digest
    settings = ServeSettings(
        db_path=str(tmp_path / "feedback.sqlite"),
        batch_wait_ms=1.0,
        auto_recalibrate=True,
        auto_recalibrate_labels=20,
        auto_recalibrate_max_ece=0.1,
        auto_recalibrate_holdback=0.3,
        auto_recalibrate_dir=str(tmp_path / "children"),
    )
    caplog.set_level(logging.INFO, logger="probecal.serve")
    served: queue.Queue = queue.Queue()  # ids of the domain-tagged answers, as they are served
    statuses, stop = [], threading.Event()
    with TestClient(create_app(model, settings), raise_server_exceptions=False) as client:
        store = FeedbackStore(settings.db_path)

        def hammer(worker: int) -> None:
            k = 0
            while not stop.is_set():
                word = WORDS[(worker + k) % len(WORDS)]
                scored = client.post(
                    "/v1/score",
                    json={
                        "prompt": f"where is {word} ?",
                        "completion": f" {word}",
                        "metadata": {"domain": "geo"},
                    },
                )
                statuses.append(scored.status_code)
                if scored.status_code == 200:
                    served.put(scored.json()["id"])
                if k % 4 == 0:
                    chat = client.post(
                        "/v1/chat/completions",
                        json={"messages": [{"role": "user", "content": f"name {word}"}], "max_tokens": 2},
                    )
                    statuses.append(chat.status_code)
                k += 1

        def label(labels: list[bool], scored_by: str) -> None:
            """Label the next served geo answers scored by the artifact `scored_by`, in order."""
            for correct in labels:
                while True:
                    rid = served.get(timeout=30)
                    if store.get_response(rid)[0].artifact == scored_by:
                        break
                r = client.post("/v1/feedback", json={"id": rid, "correct": correct})
                statuses.append(r.status_code)

        with ThreadPoolExecutor(4) as pool:
            workers = [pool.submit(hammer, w) for w in range(4)]
            # phase 1: the parent says ~0.8, 3 of 24 are right -> a child with a negative geo offset
            label([True] * 3 + [False] * 21, parent_digest)
            wait_for(lambda: model.artifact_digest != parent_digest)
            child_digest = model.artifact_digest
            wait_for(lambda: server_auto(client).idle.is_set())
            assert metric(client, 'probecal_auto_recalibrations_total{outcome="swapped"}') == 1
            # phase 2: the child's answers, the older wrong and the newest right -> the refit is worse there
            label([False] * 8 + [True] * 12, child_digest)
            wait_for(lambda: metric(client, 'probecal_auto_recalibrations_total{outcome="refused"}') == 1)
            time.sleep(0.2)  # requests keep flowing after the refusal
            stop.set()
            for w in workers:
                w.result()
        store.close()
        child = model.artifact
        assert model.artifact_digest == child_digest  # the worse one was never swapped in
        assert metric(client, 'probecal_auto_recalibrations_total{outcome="swapped"}') == 1
    assert len(statuses) > 60 and set(statuses) == {200}, sorted(set(statuses))
    assert isinstance(child.calibrator, ShrinkageCalibrator) and child.calibrator.offsets_["geo"] < -1.0
    assert child.metadata.parent["digest"] == parent_digest
    written = [d.name for d in (tmp_path / "children").iterdir()]
    assert written == [child_digest[:16]]  # the refused child was never written
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("auto-recalibrate:")]
    assert len(lines) == 2
    assert "domain geo (" in lines[0] and f"child {child_digest[:12]}" in lines[0] and "replaced" in lines[0]
    assert "refused, not better on the" in lines[1] or "refused by the refusal rule" in lines[1]


def server_auto(client):
    return client.app.state.server.auto


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("auto_recalibrate_labels", 2, "auto_recalibrate_labels must be an integer >= 5"),
        ("auto_recalibrate_max_ece", 0.0, "auto_recalibrate_max_ece must be in"),
        ("auto_recalibrate_kind", "magic", "auto_recalibrate_kind='magic' is not allowed"),
        ("auto_recalibrate_holdback", 1.0, "auto_recalibrate_holdback must be in"),
        ("auto_recalibrate", "yes", "auto_recalibrate must be true or false"),
        ("auto_recalibrate_prior", "xd", "auto_recalibrate_prior='xd' is not allowed"),
    ],
)
def test_bad_auto_recalibrate_settings_name_the_field(tmp_path, field, value, message):
    settings = ServeSettings(db_path=str(tmp_path / "f.sqlite"), **{field: value})
    with pytest.raises(ValueError, match=message):
        settings.validate()


def test_auto_recalibrate_needs_a_model_that_reloads(tmp_path):
    class NoReload:
        model_name, max_context_tokens, max_batch_size, vocab_size = "m", 100, 4, 10

    with pytest.raises(ValueError, match="auto_recalibrate=true needs a model that can hot reload"):
        create_app(NoReload(), ServeSettings(db_path=str(tmp_path / "f.sqlite"), auto_recalibrate=True))


def test_auto_recalibrate_prior_cross_domain_needs_an_artifact_that_stores_it(tmp_path):
    from tests.unit.probes.test_recalibration import parent_artifact

    class Reloads:
        model_name, max_context_tokens, max_batch_size, vocab_size = "m", 100, 4, 10
        artifact = parent_artifact()  # trained without leave-one-domain-out: no cross-domain record

        def load_artifact(self, path): ...

        def swap_artifact(self, artifact): ...

    settings = dict(db_path=str(tmp_path / "f.sqlite"), auto_recalibrate=True)
    with pytest.raises(ValueError, match="recalibrate.prior=cross_domain needs the cross-domain calibration"):
        create_app(Reloads(), ServeSettings(**settings, auto_recalibrate_prior="cross_domain"))
    with pytest.raises(ValueError, match="not allowed with auto_recalibrate_kind=platt"):
        ServeSettings(
            **settings, auto_recalibrate_prior="cross_domain", auto_recalibrate_kind="platt"
        ).validate()
