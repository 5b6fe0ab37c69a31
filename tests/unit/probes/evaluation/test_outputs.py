"""Per-domain calibration in what a run writes: metrics.json["calibration"], the headline lines, the report table."""

import numpy as np
import pytest

from probes.evaluation.metrics import calibration_row
from probes.evaluation.outputs import calibration_by_domain, calibration_headline
from probes.evaluation.report import calibration_markdown
from probes.evaluation.transfer import TransferTable
from probes.training.splits import SplitData


def _data():
    # test split: domain a (p 0.8, 3 of 4 right: ECE 0.05), domain b (p 0.2, 2 of 2 right: ECE 0.8); one train row
    y = np.array([1, 1, 1, 0, 1, 1, 0])
    categories = np.array(["a1", "a2", "a1", "a2", "b1", "b1", "b1"])
    domains = np.array(["a", "a", "a", "a", "b", "b", "b"])
    test = np.array([True] * 6 + [False])
    data = SplitData(y, categories, {"test": test, "train": ~test}, domains)
    return data, test, np.array([0.8, 0.8, 0.8, 0.8, 0.2, 0.2])


def _transfer():
    p, y = np.array([0.9] * 40), np.array([1] * 36 + [0] * 4)  # held-out x: calibrated (ECE 0, floor 0.04)
    per = {"x": calibration_row(p, y), "z": calibration_row(np.full(40, 0.1), y)}  # z: under-confident by 0.8
    return TransferTable({"probe": {"pooled_ece": 0.4}}, {"probe": per}, ("x", "z"))


def test_calibration_by_domain_in_domain_and_held_out():
    data, mask, p = _data()
    calibration = calibration_by_domain(p, data, mask, _transfer(), n_bins=15)
    inside = calibration["in_domain"]
    assert set(inside["per_domain"]) == {"a", "b"}  # the domain, not the category; test rows only
    assert inside["per_domain"]["a"]["ece"] == pytest.approx(0.05) and inside["per_domain"]["b"]["n"] == 2
    assert inside["summary"]["n_within"] == 1 and inside["summary"]["pooled_ece"] == pytest.approx(0.3)
    held = calibration["held_out"]["summary"]
    assert (held["n_domains"], held["n_within"], held["pooled_ece"]) == (2, 1, 0.4)
    assert held["mean_ece"] == pytest.approx(0.4)  # (0 + 0.8) / 2
    assert calibration["margin"] == 0.03
    assert calibration_by_domain(p, data, mask, None, 15)["held_out"] is None
    data.domains = None  # no domains: each category is its own domain
    assert set(calibration_by_domain(p, data, mask, None, 15)["in_domain"]["per_domain"]) == {
        "a1",
        "a2",
        "b1",
    }


def test_headline_and_report_say_how_many_domains_are_within_floor():
    data, mask, p = _data()
    calibration = calibration_by_domain(p, data, mask, _transfer(), n_bins=15)
    lines = calibration_headline(calibration).splitlines()
    assert lines[0].startswith(
        "1 of 2 held-out domains within floor + 0.03: mean per-domain ECE 0.400 vs mean floor"
    )
    assert lines[1].startswith(
        "1 of 2 domains in domain (test split) within floor + 0.03: mean per-domain ECE 0.425"
    )
    markdown = calibration_markdown(calibration)
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| x (held-out domain) | 40 | 0.900 | 0.900 | 0.000 |") and rows[1].endswith(
        "| yes |"
    )
    assert rows[2].startswith("| z (held-out domain) | 40 | 0.900 | 0.100 | 0.800 |") and rows[2].endswith(
        "| NO |"
    )
    assert "| a (in domain (test)) | 4 | 0.750 | 0.800 | 0.050 |" in markdown
    calibration["held_out"] = None  # no transfer table: only the in-domain part
    assert len(calibration_headline(calibration).splitlines()) == 1
    assert "held-out domain)" not in calibration_markdown(calibration)
