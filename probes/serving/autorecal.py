"""`serve.auto_recalibrate`: recalibrate the serving artifact from its own feedback, in the background.

Policy (off by default; settings in probes/serving/settings.py):
1. TRIGGER: after each stored label the worker thread wakes; a domain triggers when the serving artifact's
   responses in it collected `auto_recalibrate_labels` labels since the last refit (a global watermark of
   feedback.seq, moved at every attempt whatever its outcome, so a refused refit waits for new labels) and
   the artifact's ECE on those labels exceeds `auto_recalibrate_max_ece`.
2. REFIT: the labelled responses of the artifact and its lineage (probes.recalibration.read_feedback_rows),
   in label order; the newest `auto_recalibrate_holdback` share is held back, `recalibrate` (its own
   refusal rule included) fits `auto_recalibrate_kind` on the rest.
3. COMPARE on the held-back labels (the newest: traffic as it is now): the child is swapped in only if its
   ECE and its Brier score are both lower than the parent's there; otherwise it is refused and never
   written. A swap goes through the hot reload path (`Server.reload`: verified off the event loop, installed
   between two batches), so no request waits on any of this.
4. One log line says what changed; /metrics counts probecal_auto_recalibrations_total{outcome}.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np

from probes.evaluation.metrics import brier, ece
from probes.recalibration import (
    NotEnoughRows,
    lineage_digests,
    parent_probabilities,
    read_feedback_rows,
    recalibrate,
)

log = logging.getLogger("probecal.serve")

RELOAD_TIMEOUT_S = 120.0
N_BOOTSTRAP = 200  # the refusal rule's intervals: enough for a 95% interval, light on a serving machine


class AutoRecalibrator:
    """One daemon worker thread per server: `notify()` (any thread, never blocks) after each stored label."""

    def __init__(self, server: Any, loop: asyncio.AbstractEventLoop):
        self.server, self.loop = server, loop
        self.settings = server.settings
        self.output_dir = Path(self.settings.auto_recalibrate_dir or Path(self.settings.db_path).parent)
        if not self.settings.auto_recalibrate_dir:
            self.output_dir = self.output_dir / "auto_recalibrate"
        self.watermark = 0  # feedback.seq of the newest label seen by the last refit attempt
        self.last: str | None = None  # the last attempt's log line
        self._wake, self._stop, self._lock = threading.Event(), threading.Event(), threading.Lock()
        self._thread = threading.Thread(target=self._run, name="probecal-auto-recalibrate", daemon=True)
        self.idle = threading.Event()  # set while the worker waits with nothing to do
        self.idle.set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=RELOAD_TIMEOUT_S)

    def notify(self) -> None:
        with self._lock:
            self.idle.clear()
            self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.step()
            except Exception:  # the worker must survive anything: serving goes on either way
                log.exception("auto-recalibrate: the refit failed")
                self.server.metrics.observe_auto_recalibration("failed")
            with self._lock:  # idle only when no label arrived during the attempt
                if not self._wake.is_set():
                    self.idle.set()

    # -- one attempt ---------------------------------------------------------------------------------------
    def trigger(self, parent: Any) -> tuple[str, int, float, int] | None:
        """(domain, new labels, ECE on them, newest label_seq) of the domain that calls for a refit, or None."""
        s = self.settings
        labels = self.server.store.labels_since(parent.digest, self.watermark)
        by_domain: dict[str, list[tuple[float, bool]]] = {}
        for _, domain, p, correct in labels:
            by_domain.setdefault(domain, []).append((p, correct))
        worst = None
        for domain, pairs in sorted(by_domain.items()):
            if len(pairs) < s.auto_recalibrate_labels:
                continue
            p, y = np.array([a for a, _ in pairs]), np.array([int(b) for _, b in pairs])
            value = ece(p, y, s.calibration_bins)
            if value > s.auto_recalibrate_max_ece and (worst is None or value > worst[2]):
                worst = (domain, len(pairs), float(value), labels[-1][0])
        return worst

    def step(self) -> str | None:
        """Check the trigger and, when it fires, refit, compare and swap or refuse; returns the outcome."""
        s, server = self.settings, self.server
        parent = getattr(server.model, "artifact", None)
        if parent is None:
            return None
        fired = self.trigger(parent)
        if fired is None:
            return None
        domain, n_new, ece_new, newest = fired
        self.watermark = newest
        bound = s.auto_recalibrate_max_ece
        why = f"domain {domain or '(untagged)'} ({n_new} new labels, ECE {ece_new:.3f} > {bound:g})"
        meta = parent.metadata
        try:
            rows = read_feedback_rows(s.db_path, meta.layer, meta.position, lineage_digests(parent))
            held_n = max(1, math.ceil(s.auto_recalibrate_holdback * len(rows)))
            order = np.arange(len(rows))  # label order: the newest are held back
            fit, held = rows.subset(order < len(rows) - held_n), rows.subset(order >= len(rows) - held_n)
            result = recalibrate(
                parent,
                fit,
                s.auto_recalibrate_kind,
                n_bins=s.calibration_bins,
                n_bootstrap=N_BOOTSTRAP,
                prior=s.auto_recalibrate_prior,
            )
        except NotEnoughRows as err:
            return self._outcome("skipped", f"{why}: not refit ({err})")
        if not result.accepted:
            return self._outcome("refused", f"{why}: child refused by the refusal rule ({result.reason})")
        child = result.artifact
        p_parent = parent_probabilities(parent, held)
        p_child = child.calibrator.predict(held.score, categories=held.domain)
        before = (ece(p_parent, held.y, s.calibration_bins), brier(p_parent, held.y))
        after = (ece(p_child, held.y, s.calibration_bins), brier(p_child, held.y))
        versus = (
            f"on the {len(held)} newest labels held back: ECE {before[0]:.3f} -> {after[0]:.3f}, "
            f"Brier {before[1]:.3f} -> {after[1]:.3f}"
        )
        if not (after[0] < before[0] and after[1] < before[1]):
            return self._outcome("refused", f"{why}: child {child.digest[:12]} refused, not better {versus}")
        directory = child.save(self.output_dir / child.digest[:16])
        future = asyncio.run_coroutine_threadsafe(server.reload(str(directory)), self.loop)
        try:
            future.result(timeout=RELOAD_TIMEOUT_S)
        except Exception as err:  # APIError (refused, reload in progress), timeout: the parent keeps serving
            return self._outcome("failed", f"{why}: child {child.digest[:12]} not swapped in ({err})")
        return self._outcome(
            "swapped",
            f"{why}: {s.auto_recalibrate_kind} child {child.digest[:12]} (from {directory}) replaced "
            f"{parent.digest[:12]}, {versus}",
        )

    def _outcome(self, outcome: str, line: str) -> str:
        log.info("auto-recalibrate: %s", line)
        self.server.metrics.observe_auto_recalibration(outcome)
        self.last = line
        return outcome
