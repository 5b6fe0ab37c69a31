"""How well novelty tells a held-out domain from the domains the probe saw (leave-one-domain-out).

For each domain D: a NoveltyModel is fit on the train rows of every other domain (its cut-off on their
calibration rows), then D's rows (all splits) are scored against the test rows of the other domains. The
numbers: AUROC of novelty for "held-out domain" vs "in-domain", and the share of each side under the cut-off
(in_domain = novelty <= 1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from probes.evaluation.metrics import auroc
from probes.evaluation.transfer import DomainFolds
from probes.novelty import NoveltyModel


def novelty_transfer(
    prompts: np.ndarray,
    folds: DomainFolds,
    reference_rows: np.ndarray,
    make_model: Callable[[], NoveltyModel] = NoveltyModel,
) -> dict[str, Any]:
    """prompts [n, hidden]: prompt_last states at the probe's layer; reference_rows [n] bool: the in-domain
    rows each held-out domain is compared against (the test split), taken outside that domain."""
    per_domain: dict[str, dict[str, float]] = {}
    for f, domain in enumerate(folds.domains):
        model = make_model().fit(prompts[folds.fit[f]], prompts[folds.calibrate[f]])
        held, reference = folds.held_out[f], reference_rows & ~folds.held_out[f]
        novel, known = model.score(prompts[held]), model.score(prompts[reference])
        labels = np.r_[np.zeros(len(known)), np.ones(len(novel))]
        per_domain[domain] = {
            "auroc": auroc(np.r_[known, novel], labels),
            "heldout_in_domain_share": float(np.mean(novel <= 1.0)),
            "reference_in_domain_share": float(np.mean(known <= 1.0)),
            "heldout_median_novelty": float(np.median(novel)),
            "n": int(held.sum()),
        }
    values = list(per_domain.values())
    return {
        "auroc": float(np.mean([v["auroc"] for v in values])),
        "min_auroc": float(np.min([v["auroc"] for v in values])),
        "heldout_in_domain_share": float(np.mean([v["heldout_in_domain_share"] for v in values])),
        "reference_in_domain_share": float(np.mean([v["reference_in_domain_share"] for v in values])),
        "per_domain": per_domain,
        "statistic": "PCA-residual of the prompt_last state at the probe's layer (probes.novelty), "
        "leave-one-domain-out: held-out domain rows vs the other domains' test rows",
    }


def novelty_headline(summary: dict[str, Any]) -> str:
    return (
        f"novelty (leave-one-domain-out): AUROC {summary['auroc']:.3f} for held-out-domain vs in-domain questions; "
        f"flagged novel (novelty > 1): {1 - summary['heldout_in_domain_share']:.1%} of held-out-domain rows, "
        f"{1 - summary['reference_in_domain_share']:.1%} of in-domain test rows"
    )


def novelty_markdown(summary: dict[str, Any]) -> str:
    lines = [
        "Novelty is the PCA residual of the question's `prompt_last` state at the probe's layer, scaled so that "
        "1.0 is the cut-off (`in_domain` = novelty <= 1; 5% of held-out in-domain rows read above it). A novel "
        "answer's p_correct is unverified for its kind of question: label a few and recalibrate.",
        "",
        novelty_headline(summary) + ".",
        "",
        "| held-out domain | n | AUROC vs in-domain | held-out rows under the cut-off | in-domain rows under it "
        "| median novelty |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for domain, row in summary["per_domain"].items():
        lines.append(
            f"| {domain} | {row['n']} | {row['auroc']:.3f} | {row['heldout_in_domain_share']:.1%} "
            f"| {row['reference_in_domain_share']:.1%} | {row['heldout_median_novelty']:.2f} |"
        )
    return "\n".join(lines)
