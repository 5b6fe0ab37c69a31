"""Prometheus exposition (prometheus_client) of the server's counters and the rolling calibration of
labelled answers. One CollectorRegistry per app, so several apps in one process (tests) never share or
clash over metrics.

Per domain and artifact: `probecal_calibration_ece` carries, beside its unlabelled sample (the rolling window,
all domains, whatever artifact), one sample per {domain, artifact="current"|"previous"}: the ECE of the
labelled responses of that domain scored by the artifact now in service vs by the one before the last reload
(domain "default": requests without a domain tag). `probecal_calibration_domain_labelled` gives their counts,
`probecal_calibration_domain_ece_floor` the ECE a perfectly calibrated p reads on the same responses (judge a
domain's ECE against it: ~0.1 at 50 labels) and `probecal_calibration_domain_smooth_ece` the smooth ECE."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from probes.runtime.wrapper import ProbedGeneration
from probes.serving.feedback import CalibrationStats


class _ECEFamily(Collector):
    """`probecal_calibration_ece`: the unlabelled window sample plus {domain, artifact} samples in ONE family
    (prometheus_client's Gauge cannot mix an unlabelled sample with labelled ones)."""

    NAME = "probecal_calibration_ece"
    HELP = (
        "Expected calibration error (equal-width bins, probes.evaluation.metrics.ece): unlabelled = over the "
        "rolling window of labelled responses (serve.calibration_window); {domain, artifact} = over the "
        "labelled responses of that domain scored by the current / previous artifact (last window of each)."
    )

    def __init__(self) -> None:
        self.window = math.nan
        self.per_domain: dict[tuple[str, str], float] = {}

    def describe(self):
        return [GaugeMetricFamily(self.NAME, self.HELP)]

    def collect(self):
        family = GaugeMetricFamily(self.NAME, self.HELP)
        family.add_sample(self.NAME, {}, self.window)
        for (domain, artifact), value in sorted(self.per_domain.items()):
            family.add_sample(self.NAME, {"domain": domain, "artifact": artifact}, value)
        yield family


class ServerMetrics:
    """In-process counters (reset on restart, as Prometheus expects); calibration comes from the store,
    read at scrape time into gauges."""

    LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
    CONFIDENCE_BOUNDS = tuple(i / 10 for i in range(1, 11))
    BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128)
    NOVELTY_BOUNDS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0)

    def __init__(self, max_domains: int = 20) -> None:
        self.max_domains = max_domains  # domain tags come from clients: label at most this many, then "other"
        self._domains: set[str] = set()
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "probecal_requests",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "probecal_request_latency_seconds",
            "Request latency by endpoint.",
            ["endpoint"],
            buckets=self.LATENCY_BOUNDS,
            registry=r,
        )
        self.confidence = Histogram(
            "probecal_confidence",
            "p_correct of served answers (higher = more likely correct).",
            buckets=self.CONFIDENCE_BOUNDS,
            registry=r,
        )
        self.responses = Counter("probecal_responses", "Answers served since start.", registry=r)
        self.abstentions = Counter("probecal_abstentions", "Answers abstained since start.", registry=r)
        self.abstention_rate = Gauge(
            "probecal_abstention_rate", "Abstained / served answers since start.", registry=r
        )
        self.batch_size = Histogram(
            "probecal_batch_size",
            "Requests per ProbedModel.generate / score call.",
            buckets=self.BATCH_BOUNDS,
            registry=r,
        )
        self.model_errors = Counter(
            "probecal_model_errors", "generate / score calls that raised.", registry=r
        )
        self.feedback_write_errors = Counter(
            "probecal_feedback_write_errors",
            "Served responses or labels the feedback database failed to store (the answer was still sent).",
            registry=r,
        )
        self.queue_depth = Gauge("probecal_queue_depth", "Requests waiting for the model.", registry=r)
        self.stored = Gauge(
            "probecal_stored_responses", "Responses in the feedback database (all time).", registry=r
        )
        self.labelled = Gauge(
            "probecal_labelled_responses", "Responses with feedback in the database (all time).", registry=r
        )
        self.feedback = Gauge(
            "probecal_feedback_total", "Feedback posts in the database, repeats included.", registry=r
        )
        about = "over the rolling window of labelled responses (serve.calibration_window)"
        self.window_labelled = Gauge(
            "probecal_calibration_window_labelled", "Labelled responses in the window.", registry=r
        )
        self.accuracy = Gauge("probecal_calibration_accuracy", f"Fraction correct {about}.", registry=r)
        self.mean_confidence = Gauge(
            "probecal_calibration_mean_confidence", f"Mean p_correct {about}.", registry=r
        )
        self.ece = _ECEFamily()
        r.register(self.ece)
        self.domain_labelled = Gauge(
            "probecal_calibration_domain_labelled",
            "Labelled responses per domain scored "
            "by the current / previous artifact (those probecal_calibration_ece{domain, "
            "artifact} is computed over).",
            ["domain", "artifact"],
            registry=r,
        )
        self.domain_floor = Gauge(
            "probecal_calibration_domain_ece_floor",
            "ECE a perfectly calibrated p_correct reads on the same labelled responses as "
            "probecal_calibration_ece{domain, artifact} (binning noise; labels drawn from p).",
            ["domain", "artifact"],
            registry=r,
        )
        self.domain_smooth_ece = Gauge(
            "probecal_calibration_domain_smooth_ece",
            "Smooth ECE (kernel, no bins; Blasiok & Nakkiran 2023) of the labelled responses of that domain "
            "scored by the current / previous artifact.",
            ["domain", "artifact"],
            registry=r,
        )
        self.reloads = Counter(
            "probecal_reloads", "POST /admin/reload outcomes since start.", ["outcome"], registry=r
        )
        self.auto_recalibrations = Counter(
            "probecal_auto_recalibrations",
            "serve.auto_recalibrate refits since start, by outcome (swapped | refused | skipped | failed).",
            ["outcome"],
            registry=r,
        )
        bins = ["lower", "upper"]
        self.bin_accuracy = Gauge(
            "probecal_calibration_bin_accuracy",
            f"Fraction correct per p_correct bin {about}.",
            bins,
            registry=r,
        )
        self.bin_confidence = Gauge(
            "probecal_calibration_bin_confidence", f"Mean p_correct per bin {about}.", bins, registry=r
        )
        self.bin_count = Gauge(
            "probecal_calibration_bin_count",
            f"Labelled responses per p_correct bin {about}.",
            bins,
            registry=r,
        )
        self.novelty = Histogram(
            "probecal_novelty",
            "Novelty of served questions (probes.novelty; 1.0 = the cut-off, above it = not like training).",
            buckets=self.NOVELTY_BOUNDS,
            registry=r,
        )
        self.novel_answers = Counter(
            "probecal_novel_answers",
            "Answers to questions with novelty > 1 (their p_correct is unverified), by domain tag.",
            ["domain"],
            registry=r,
        )
        self.domain_answers = Counter(
            "probecal_domain_answers",
            "Answers served, by domain tag ('' = untagged).",
            ["domain"],
            registry=r,
        )
        self._served = self._abstained = 0

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def _domain_label(self, domain: str) -> str:
        """`domain` while fewer than `max_domains` tags have been seen, else "other" (bounded label sets)."""
        if domain in self._domains or len(self._domains) < self.max_domains:
            self._domains.add(domain)
            return domain
        return "other"

    def observe_generation(self, gen: ProbedGeneration, domain: str | None = None) -> None:
        self._served += 1
        self._abstained += int(gen.abstained)
        self.responses.inc()
        self.abstentions.inc(int(gen.abstained))
        self.confidence.observe(gen.p_correct)
        tag = self._domain_label(domain or "")
        self.domain_answers.labels(tag).inc()
        novelty = getattr(gen, "novelty", None)
        if novelty is not None:
            self.novelty.observe(novelty)
            self.novel_answers.labels(tag).inc(int(novelty > 1.0))

    def observe_batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def observe_model_error(self) -> None:
        self.model_errors.inc()

    def observe_feedback_write_error(self) -> None:
        self.feedback_write_errors.inc()

    def observe_reload(self, ok: bool) -> None:
        self.reloads.labels("swapped" if ok else "refused").inc()

    def observe_auto_recalibration(self, outcome: str) -> None:
        """serve.auto_recalibrate: swapped | refused (its own refusal rule or worse on held-back labels) |
        skipped (too few labels to refit) | failed."""
        self.auto_recalibrations.labels(outcome).inc()

    def render(
        self,
        calib: CalibrationStats,
        counts: dict[str, int],
        queue_depth: int,
        window: int,
        domains: dict[str, dict[str, CalibrationStats]] | None = None,
    ) -> str:
        """Prometheus text format; the scrape-time gauges are set from `calib` / `counts` / `domains`
        ({"current" | "previous": {domain: stats}}) first."""
        self.abstention_rate.set(self._abstained / self._served if self._served else math.nan)
        self.queue_depth.set(queue_depth)
        self.stored.set(counts["responses"])
        self.labelled.set(counts["labelled"])
        self.feedback.set(counts["feedback"])
        self.window_labelled.set(calib.labelled)
        self.accuracy.set(calib.accuracy)
        self.mean_confidence.set(calib.mean_confidence)
        self.ece.window = calib.ece
        self.ece.per_domain = {}
        self.domain_labelled.clear()
        self.domain_floor.clear()
        self.domain_smooth_ece.clear()
        for artifact, per_domain in (domains or {}).items():
            for domain, stats in per_domain.items():
                self.ece.per_domain[(domain, artifact)] = stats.ece
                self.domain_labelled.labels(domain, artifact).set(stats.labelled)
                self.domain_floor.labels(domain, artifact).set(stats.ece_floor)
                self.domain_smooth_ece.labels(domain, artifact).set(stats.smooth_ece)
        for b in calib.bins:
            labels = (f"{b.lower:g}", f"{b.upper:g}")
            self.bin_accuracy.labels(*labels).set(b.accuracy)
            self.bin_confidence.labels(*labels).set(b.mean_confidence)
            self.bin_count.labels(*labels).set(b.count)
        return generate_latest(self.registry).decode()
