"""Prometheus exposition of the server's counters and the rolling calibration of labelled answers."""

from __future__ import annotations

import math

from probes.serving.feedback import CalibrationStats
from probes.serving.wrapper import ProbedGeneration


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs.items()) + "}" if pairs else ""


def _num(value: float) -> str:
    return "NaN" if math.isnan(value) else repr(float(value)) if isinstance(value, float) else str(value)


class Histogram:
    """Cumulative Prometheus histogram with fixed upper bounds (+Inf added)."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def render(self, name: str, labels: dict[str, str]) -> list[str]:
        lines, cumulative = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            cumulative += count
            le = "+Inf" if math.isinf(bound) else repr(float(bound))
            lines.append(f"{name}_bucket{_labels({**labels, 'le': le})} {cumulative}")
        lines.append(f"{name}_sum{_labels(labels)} {_num(self.sum)}")
        lines.append(f"{name}_count{_labels(labels)} {self.count}")
        return lines


class ServerMetrics:
    """In-process counters (reset on restart, as Prometheus expects); calibration comes from the store.

    Updated only on the event-loop thread, so no lock is needed.
    """

    LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
    CONFIDENCE_BOUNDS = tuple(i / 10 for i in range(1, 11))
    BATCH_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128)

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.confidence = Histogram(self.CONFIDENCE_BOUNDS)
        self.batch_size = Histogram(self.BATCH_BOUNDS)
        self.responses = 0
        self.abstentions = 0
        self.model_errors = 0

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        key = (endpoint, str(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        self.latency.setdefault(endpoint, Histogram(self.LATENCY_BOUNDS)).observe(seconds)

    def observe_generation(self, gen: ProbedGeneration) -> None:
        self.responses += 1
        self.abstentions += int(gen.abstained)
        self.confidence.observe(gen.p_correct)

    def render(self, calib: CalibrationStats, counts: dict[str, int], queue_depth: int, window: int) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[str]) -> None:
            out.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples])

        metric("probecal_requests_total", "counter", "HTTP requests by endpoint and status code.",
               [f"probecal_requests_total{_labels({'endpoint': e, 'status': s})} {n}"
                for (e, s), n in sorted(self.requests.items())])
        metric("probecal_request_latency_seconds", "histogram", "Request latency by endpoint.",
               [line for e, h in sorted(self.latency.items())
                for line in h.render("probecal_request_latency_seconds", {"endpoint": e})])
        metric("probecal_confidence", "histogram", "p_correct of served answers (higher = more likely correct).",
               self.confidence.render("probecal_confidence", {}))
        metric("probecal_responses_total", "counter", "Answers served since start.",
               [f"probecal_responses_total {self.responses}"])
        metric("probecal_abstentions_total", "counter", "Answers abstained since start.",
               [f"probecal_abstentions_total {self.abstentions}"])
        rate = self.abstentions / self.responses if self.responses else math.nan
        metric("probecal_abstention_rate", "gauge", "Abstained / served answers since start.",
               [f"probecal_abstention_rate {_num(rate)}"])
        metric("probecal_batch_size", "histogram", "Requests per ProbedModel.generate call.",
               self.batch_size.render("probecal_batch_size", {}))
        metric("probecal_model_errors_total", "counter", "generate calls that raised.",
               [f"probecal_model_errors_total {self.model_errors}"])
        metric("probecal_queue_depth", "gauge", "Requests waiting for the model.",
               [f"probecal_queue_depth {queue_depth}"])
        metric("probecal_stored_responses", "gauge", "Responses in the feedback database (all time).",
               [f"probecal_stored_responses {counts['responses']}"])
        metric("probecal_labelled_responses", "gauge", "Responses with feedback in the database (all time).",
               [f"probecal_labelled_responses {counts['labelled']}"])
        metric("probecal_feedback_total", "gauge", "Feedback posts in the database, repeats included.",
               [f"probecal_feedback_total {counts['feedback']}"])
        about = f"over the last {window} labelled responses"
        metric("probecal_calibration_window_labelled", "gauge", f"Labelled responses in the window ({window}).",
               [f"probecal_calibration_window_labelled {calib.labelled}"])
        metric("probecal_calibration_accuracy", "gauge", f"Fraction correct {about}.",
               [f"probecal_calibration_accuracy {_num(calib.accuracy)}"])
        metric("probecal_calibration_mean_confidence", "gauge", f"Mean p_correct {about}.",
               [f"probecal_calibration_mean_confidence {_num(calib.mean_confidence)}"])
        metric("probecal_calibration_ece", "gauge", f"Expected calibration error (equal-width bins) {about}.",
               [f"probecal_calibration_ece {_num(calib.ece)}"])
        bin_labels = [{"lower": f"{b.lower:g}", "upper": f"{b.upper:g}"} for b in calib.bins]
        metric("probecal_calibration_bin_accuracy", "gauge", f"Fraction correct per p_correct bin {about}.",
               [f"probecal_calibration_bin_accuracy{_labels(lab)} {_num(b.accuracy)}"
                for lab, b in zip(bin_labels, calib.bins, strict=True)])
        metric("probecal_calibration_bin_confidence", "gauge", f"Mean p_correct per bin {about}.",
               [f"probecal_calibration_bin_confidence{_labels(lab)} {_num(b.mean_confidence)}"
                for lab, b in zip(bin_labels, calib.bins, strict=True)])
        metric("probecal_calibration_bin_count", "gauge", f"Labelled responses per p_correct bin {about}.",
               [f"probecal_calibration_bin_count{_labels(lab)} {b.count}"
                for lab, b in zip(bin_labels, calib.bins, strict=True)])
        return "\n".join(out) + "\n"
