"""/metrics counters for novelty and domains: novel answers counted per domain tag, label sets bounded."""

from __future__ import annotations

from probes.runtime.wrapper import ProbedGeneration
from probes.serving.exposition import ServerMetrics


def _gen(novelty: float | None) -> ProbedGeneration:
    return ProbedGeneration(
        text="x",
        p_correct=0.5,
        score=0.0,
        layer=2,
        position="answer_last",
        abstained=False,
        threshold=None,
        finish_reason="stop",
        prompt_tokens=3,
        completion_tokens=1,
        novelty=novelty,
        in_domain=None if novelty is None else novelty <= 1.0,
    )


def _value(metrics: ServerMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_novel_answers_are_counted_per_domain_and_domain_labels_are_bounded():
    metrics = ServerMetrics(max_domains=2)
    for domain, novelty in [
        ("med", 0.4),
        ("med", 1.7),
        ("law", 3.0),
        (None, None),
        ("tax", 2.0),
        ("art", 0.1),
    ]:
        metrics.observe_generation(_gen(novelty), domain)
    assert _value(metrics, "probecal_novel_answers_total", domain="med") == 1
    assert _value(metrics, "probecal_domain_answers_total", domain="med") == 2
    assert _value(metrics, "probecal_domain_answers_total", domain="law") == 1
    # a third and fourth tag (and the untagged answer) fall under "other": clients cannot grow the label set
    assert _value(metrics, "probecal_domain_answers_total", domain="other") == 3
    assert _value(metrics, "probecal_novel_answers_total", domain="other") == 1  # tax at 2.0
    assert _value(metrics, "probecal_novelty_count") == 5  # answers without novelty are not observed
