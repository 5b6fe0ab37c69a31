"""The pipeline end to end: train/evaluate/report on a synthetic store, and the CLI on the tiny Llama."""

from __future__ import annotations

import csv
import json
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from extract.data import DataSpec
from extract.generation import BASELINE_NAMES
from extract.grading import ARTICLES, CONTRAST_WORDS
from extract.runner import rows_and_splits
from extract.store import open_store
from probes.artifact import ProbeArtifact, hash_arrays
from probes.calibration import PlattCalibrator, fit_cross_domain_prior
from probes.estimators import LogisticProbe
from probes.evaluation.metrics import auroc
from probes.evaluation.outputs import write_run_outputs
from probes.evaluation.tables import PROBE_METHOD
from probes.evaluation.transfer import cross_domain_set, domain_folds
from probes.selection.sweep import SweepResult
from probes.training import SplitData, TrainSpec, evaluate_probe, probe_features, train_probe
from probes.training.train import fold_scorer
from tests import tiny_models
from tests.pipeline_fixtures import SIGNAL_SITE, write_synthetic_store

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = (
    "layers.png",
    "reliability.png",
    "risk_coverage.png",
    "categories.png",
    "confidence_hist.png",
    "transfer.png",
)
# select=cv: the in-domain selection these tests check; transfer is still measured (two domains = categories)
SPEC = TrainSpec(n_folds=3, n_bootstrap=50, select="cv")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_synthetic_store(tmp_path_factory.mktemp("store") / "synthetic")


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    """train_probe -> evaluate_probe (test split) -> write_run_outputs, once for the module."""
    run_dir = tmp_path_factory.mktemp("run")
    result = train_probe(store, LogisticProbe(), PlattCalibrator(), SPEC, seed=0)
    artifact, sweep_result, extra = result.artifact, result.sweep, result.outputs()
    table, methods, data, mask = evaluate_probe(artifact, store, PlattCalibrator(), SPEC, "test")
    report, headline = write_run_outputs(
        run_dir,
        "synthetic run",
        table,
        methods,
        data,
        mask,
        SPEC,
        sweep_result,
        {**extra, "notes": {"store": str(store.path)}, "model": "synthetic-model"},
    )
    return {
        "run_dir": run_dir,
        "artifact": artifact,
        "sweep": sweep_result,
        "extra": extra,
        "table": table,
        "methods": methods,
        "data": data,
        "mask": mask,
        "report": report,
        "headline": headline,
    }


# ------------------------------------------------------------------------------- synthetic store


def test_synthetic_store_looks_like_an_extracted_one(store):
    assert len(store) == 150 and store.layers == (0, 1, 2, 3)
    assert sorted(store.baselines) == sorted(BASELINE_NAMES)
    for field in (
        "id",
        "category",
        "question",
        "answers",
        "split",
        "label",
        "truncated",
        "empty_answer",
        "model_answer",
        "grader_rule",
    ):
        store.column(field)
    split, label = store.column("split"), store.column("label")
    for name in ("train", "calibration", "test"):
        assert set(label[split == name]) == {0, 1}, name


def test_sweep_selects_the_informative_site(trained, store):
    sweep = trained["sweep"]
    assert (sweep.best_layer, sweep.best_position) == SIGNAL_SITE
    others = [r.auroc_mean for r in sweep.rows if (r.layer, r.position) != SIGNAL_SITE]
    assert sweep.best_row().auroc_mean > 0.8 > max(others) + 0.1
    assert len(sweep.rows) == 4 * 2
    meta = trained["artifact"].metadata
    assert (meta.layer, meta.position) == SIGNAL_SITE
    split = store.column("split")
    assert meta.split_sizes == {name: int((split == name).sum()) for name in ("train", "calibration", "test")}
    assert meta.split_sizes["train"] > 80 and min(meta.split_sizes.values()) > 20


def test_probe_scores_the_test_split(trained, store):
    data, mask, methods = trained["data"], trained["mask"], trained["methods"]
    assert np.array_equal(mask, store.column("split") == "test")
    p = methods[PROBE_METHOD]
    assert p.shape == (mask.sum(),) and np.all((p >= 0) & (p <= 1))
    assert auroc(p, data.y[mask]) == pytest.approx(trained["table"].rows[PROBE_METHOD]["auroc"])
    assert trained["table"].rows[PROBE_METHOD]["auroc"] > 0.75
    # every baseline is shown calibrated, and the probability-valued ones raw as well
    for name in BASELINE_NAMES:
        assert f"{name} (platt)" in methods
    assert {"mean_logprob (raw)", "first_token_prob (raw)", "sequence_prob (raw)"} <= set(methods)
    assert "mean_entropy (raw)" not in methods  # an entropy is no probability


def test_run_outputs_exist_and_are_valid(trained):
    run_dir = trained["run_dir"]
    for name in ("metrics.json", "sweep.json", "report.md", "report.html"):
        assert (run_dir / name).is_file(), name
    for name in PLOTS:
        data = (run_dir / "plots" / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE, name
        assert len(data) > 10_000, f"{name} is only {len(data)} bytes"
    assert SweepResult.from_json(run_dir / "sweep.json").best_layer == SIGNAL_SITE[0]


def test_report_mentions_every_method_and_embeds_every_plot(trained):
    run_dir = trained["run_dir"]
    markdown = (run_dir / "report.md").read_text()
    for method in trained["table"].rows:
        assert f"| {method} |" in markdown, method
    for name in PLOTS:
        assert f"(plots/{name})" in markdown
    page = (run_dir / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(PLOTS)
    assert "plots/" not in re.sub(r'alt="[^"]*"', "", page)  # self-contained: no file references
    assert "## Categories" in markdown and "arithmetic" in markdown and "capitals" in markdown


def test_metrics_and_headline_show_probe_and_best_baseline(trained):
    metrics = json.loads((trained["run_dir"] / "metrics.json").read_text())
    best = metrics["best_baseline"]
    assert best and not best.startswith(PROBE_METHOD)
    assert set(metrics["headline"]) == {PROBE_METHOD, best}
    assert metrics["headline"][PROBE_METHOD]["auroc"] == pytest.approx(
        trained["table"].rows[PROBE_METHOD]["auroc"]
    )
    assert metrics["model"] == "synthetic-model" and metrics["train_spec"]["n_folds"] == 3
    table_part, calibration_part = trained["headline"].split("\n\n")
    lines = table_part.splitlines()
    assert lines[0].startswith("| method | auroc | within_cat_auroc | ece")
    # below the table: how many domains are calibrated, held-out (leave-one-domain-out) and in domain
    held = metrics["calibration"]["held_out"]["summary"]
    assert calibration_part.splitlines()[0].startswith(
        f"{held['n_within']} of {held['n_domains']} held-out domains within floor + 0.03"
    )
    assert held["mean_ece"] == pytest.approx(metrics["transfer"]["rows"][PROBE_METHOD]["ece"])
    assert "## Calibration per domain" in (trained["run_dir"] / "report.md").read_text()
    assert "novelty (leave-one-domain-out): AUROC" in calibration_part  # under the table too
    shown = [line.split("|")[1].strip() for line in lines[2:]]
    assert shown[:2] == [PROBE_METHOD, best]
    assert shown[2:] in (
        [],
        [metrics["transfer"]["best_baseline"]],
    )  # the held-out best, when it is another one
    # the best baseline has the highest within-category AUROC of the non-probe rows
    rows = {m: r for m, r in trained["table"].rows.items() if not m.startswith(PROBE_METHOD)}
    assert rows[best]["within_cat_auroc"] == max(r["within_cat_auroc"] for r in rows.values())


# ------------------------------------------------------------------------------- transfer (leave-one-domain-out)


def test_transfer_numbers_in_metrics_headline_and_report(trained, store):
    metrics = json.loads((trained["run_dir"] / "metrics.json").read_text())
    transfer = metrics["transfer"]
    # the synthetic store's rows have no domain of their own: each category is a domain
    assert transfer["domains"] == ["arithmetic", "capitals"]
    categories = store.column("category")
    for domain in transfer["domains"]:
        assert transfer["per_domain"][PROBE_METHOD][domain]["n"] == np.sum(categories == domain)
    probe = transfer["rows"][PROBE_METHOD]
    assert probe["within_cat_auroc"] == pytest.approx(
        np.mean([transfer["per_domain"][PROBE_METHOD][d]["within_cat_auroc"] for d in transfer["domains"]])
    )
    assert probe["within_cat_auroc"] > 0.75  # the synthetic signal direction is shared by both categories
    assert {"sequence_prob (platt)", "sequence_prob (raw)"} <= set(transfer["rows"])
    assert transfer["selection"]["by"].startswith("in-domain CV")  # SPEC has select=cv
    assert set(metrics["novelty"]["per_domain"]) == set(transfer["domains"])
    report = (trained["run_dir"] / "report.md").read_text()
    assert "## Novelty: held-out domains vs in-domain" in report and "| capitals |" in report
    assert (
        trained["headline"]
        .splitlines()[0]
        .endswith("| held-out within_cat_auroc | held-out ece | held-out brier |")
    )
    report = trained["report"].read_text()
    assert "## Held-out domains (transfer)" in report and "plots/transfer.png" in report
    assert (trained["run_dir"] / "plots" / "transfer.png").read_bytes()[:8] == PNG_SIGNATURE


def test_the_artifact_carries_the_cross_domain_prior_fit_on_out_of_domain_scores(trained, store, tmp_path):
    """Platt on each domain's calibration rows scored by the probe fit without that domain (what
    recalibrate.prior=cross_domain shrinks toward), recomputed here from the same folds."""
    artifact = trained["artifact"]
    record = artifact.metadata.cross_domain_calibration
    data = SplitData.from_store(store)
    folds = domain_folds(data.domains, data.masks["train"], data.masks["calibration"], data.y)
    X = store.read(artifact.metadata.layer, artifact.metadata.position)
    outer = fold_scorer(artifact.probe, X, data.y, folds.fit.any(axis=0))(folds.fit)
    rows, scores = cross_domain_set(outer, folds, data.masks["calibration"])
    expected = fit_cross_domain_prior(scores, data.y[rows.astype(int)], data.domains[rows.astype(int)])
    assert record["a"] == pytest.approx(expected["a"], rel=1e-3) and record["a"] > 0
    assert record["b"] == pytest.approx(expected["b"], abs=1e-3)
    assert record["n_domains"] == 2 and record["tau"] is None  # two domains: too few to estimate tau
    loaded = ProbeArtifact.load(artifact.save(tmp_path / "probe"))
    assert loaded.metadata.cross_domain_calibration == record


def test_select_transfer_picks_the_signal_site_by_held_out_domains(store):
    spec = TrainSpec(n_folds=3, n_bootstrap=50, transfer_layer_step=1, transfer_features=["hidden"])
    result = train_probe(store, LogisticProbe(), PlattCalibrator(), spec)
    artifact, extra = result.artifact, result.outputs()
    meta = artifact.metadata
    assert (meta.layer, meta.position) == SIGNAL_SITE and meta.kind == "logistic"
    assert (
        artifact.probe.C in spec.transfer_Cs
    )  # the C the held-out domains chose, not an in-domain CV choice
    search = extra["candidates"]
    assert len(search.scores) == 4 * 2 * len(spec.transfer_Cs)
    assert extra["selection"]["heldout_auroc"] == max(s.heldout_auroc for s in search.scores)


def test_hybrid_probe_reads_logit_signals_and_round_trips(store, tmp_path):
    spec = TrainSpec(
        n_folds=3,
        n_bootstrap=50,
        transfer_layer_step=1,
        transfer_features=["hidden+logits"],
        transfer_Cs=[0.01],
    )
    result = train_probe(store, LogisticProbe(), PlattCalibrator(), spec)
    artifact, extra = result.artifact, result.outputs()
    assert artifact.metadata.kind == "hybrid"
    assert list(artifact.probe.logit_features) == sorted(BASELINE_NAMES)
    X = probe_features(artifact.probe, store, artifact.metadata.layer, artifact.metadata.position)
    assert X.shape == (len(store), 12 + len(BASELINE_NAMES))
    loaded = ProbeArtifact.load(artifact.save(tmp_path / "probe"))
    np.testing.assert_allclose(loaded.predict(X)[0], artifact.predict(X)[0])
    table, *_ = evaluate_probe(loaded, store, PlattCalibrator(), spec, "test")
    assert table.rows[PROBE_METHOD]["auroc"] > 0.7
    assert extra["transfer"].rows[PROBE_METHOD]["within_cat_auroc"] > 0.7


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"select": "best"}, "train.select='best' is not allowed; allowed values: transfer, cv"),
        ({"select": "transfer", "transfer": False}, "needs train.transfer=true"),
        (
            {"transfer_features": ["hidden+all"]},
            "allowed values: a non-empty list of hidden, hidden\\+logits",
        ),
        ({"transfer_Cs": [0.0]}, "positive numbers"),
        ({"transfer_layer_step": 0}, "must be >= 1"),
        (
            {"select_rule": "cv"},
            "train.select_rule='cv' is not allowed; allowed values: heldout, heldout_then_cv",
        ),
        ({"select_tolerance": -0.1}, "train.select_tolerance=-0.1 must be >= 0"),
        (
            {"calibrate_on": "test"},
            "train.calibrate_on='test' is not allowed; allowed values: calibration, cross_domain, both",
        ),
        (
            {"select": "cv", "transfer": False, "calibrate_on": "cross_domain"},
            "calibrate_on=cross_domain calibrates on leave-one-domain-out scores: it needs train.transfer=true",
        ),
        ({"calibrate_on": "both"}, "needs at least three usable domains"),  # the synthetic store has two
    ],
)
def test_train_spec_transfer_options_are_validated(store, changes, message):
    spec = TrainSpec(n_folds=3, n_bootstrap=50, **changes)
    with pytest.raises(ValueError, match=message):
        train_probe(store, LogisticProbe(), PlattCalibrator(), spec)


# ------------------------------------------------------------------------------- splits and bad input


def test_split_with_one_class_is_a_clear_error(store):
    split, label = store.column("split"), store.column("label")
    # the calibration split keeps only its correct answers; its wrong ones move to test
    splits = np.where((split == "calibration") & (label == 0), "test", split)
    with pytest.raises(ValueError, match=r"the calibration split has \d+ rows with labels \[1\]"):
        train_probe(store, LogisticProbe(), PlattCalibrator(), SPEC, splits=splits)


def test_splits_override_the_recorded_ones(store, trained):
    split = store.column("split")
    splits = np.where(split == "test", "train", split)  # no test rows left
    result = train_probe(store, LogisticProbe(), PlattCalibrator(), SPEC, splits=splits)
    artifact = result.artifact
    assert artifact.metadata.split_sizes == {
        "train": int((split != "calibration").sum()),
        "calibration": int((split == "calibration").sum()),
        "test": 0,
    }
    with pytest.raises(ValueError, match="no rows in the 'test' split"):
        evaluate_probe(artifact, store, PlattCalibrator(), SPEC, "test", splits=splits)
    with pytest.raises(ValueError, match=r"unknown split name\(s\) \['validation'\]"):
        evaluate_probe(
            artifact,
            store,
            PlattCalibrator(),
            SPEC,
            "test",
            splits=np.where(split == "test", "validation", split),
        )
    with pytest.raises(ValueError, match="split='validation'; allowed: train, calibration, test"):
        evaluate_probe(trained["artifact"], store, PlattCalibrator(), SPEC, "validation")


def test_evaluate_all_rows_shows_raw_baselines(trained, store):
    table, methods, _, mask = evaluate_probe(trained["artifact"], store, PlattCalibrator(), SPEC, None)
    assert mask.all()
    assert {
        "probe",
        "probe (uncalibrated)",
        "mean_logprob (raw)",
        "min_logprob (raw)",
        "first_token_prob (raw)",
        "sequence_prob (raw)",
    } == set(table.rows)


# ------------------------------------------------------------------------------- the CLI on the tiny Llama


def _write_tiny_dataset(path: Path, n_rows: int = 40, seed: int = 0) -> None:
    """Two categories; each row accepts a random third of the tokenizer's words that its question lacks,
    so even a random model's 2-token answers come out right for some rows and wrong for others."""
    words = [
        w for w in dict.fromkeys(tiny_models.WORDS) if w.isalpha() and w not in ARTICLES | CONTRAST_WORDS
    ]
    words += [f"w{i}" for i in range(60, 99)]  # the tokenizer's filler words
    countries = ["france", "germany", "italy", "spain", "australia"]
    rng = random.Random(seed)
    with path.open("w") as fh:
        for i in range(n_rows):
            if i % 2:
                category, question = "geo", f"which city is {i // 2 % 12} in {countries[i % 5]} ?"
            else:
                category, question = "math", f"what is {i // 2 % 12} + {i % 7} ?"
            pool = [w for w in words if w not in question.split()]
            row = {
                "id": f"r{i}",
                "category": category,
                "question": question,
                "answers": rng.sample(pool, len(pool) // 3),
            }
            fh.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_models.save_tiny_llama(root / "model")
    _write_tiny_dataset(root / "data.jsonl")
    common = [
        "model=hf",
        f"model.path={root / 'model'}",
        "model.name=tiny-llama",
        "model.device=cpu",
        "data=jsonl",
        f"data.path={root / 'data.jsonl'}",
        "extract.generation.max_new_tokens=2",
        f"extract.store_root={root / 'stores'}",
        "train.n_folds=3",
        "train.n_bootstrap=20",
    ]
    return root, common


def _probecal(monkeypatch, *args: str) -> None:
    from probes.cli.main import main

    monkeypatch.setattr(sys, "argv", ["probecal"])  # main() rewrites sys.argv for Hydra
    assert main(list(args)) == 0


@pytest.fixture(scope="module")
def cli_run(cli_setup):
    root, common = cli_setup
    with pytest.MonkeyPatch.context() as monkeypatch:
        _probecal(monkeypatch, "run", *common, f"hydra.run.dir={root / 'run'}")
    return root / "run"


def test_cli_run_writes_store_probe_metrics_and_report(cli_setup, cli_run):
    root, _ = cli_setup
    store_path = Path((cli_run / "store.txt").read_text().strip())
    assert store_path.parent == root / "stores"
    store = open_store(store_path)
    assert len(store) == 40 and set(store.column("label")) == {0, 1}  # the data set gives mixed labels
    artifact = ProbeArtifact.load(cli_run / "probe", expected_fingerprint=store.fingerprint)
    assert artifact.metadata.layer in store.layers and artifact.metadata.position in store.positions
    assert artifact.metadata.metrics["test"]["auroc"] is not None
    metrics = json.loads((cli_run / "metrics.json").read_text())
    assert metrics["model"] == "tiny-llama" and metrics["data"] == "jsonl"
    assert metrics["headline"][PROBE_METHOD]["auroc"] == pytest.approx(
        artifact.metadata.metrics["test"]["auroc"]
    )
    for name in (
        "report.md",
        "report.html",
        "sweep.json",
        ".hydra/config.yaml",
        *(f"plots/{p}" for p in PLOTS),
    ):
        assert (cli_run / name).is_file(), name
    # default train.select=transfer: the two categories (= domains, the data sets none) are held out in turn
    assert metrics["transfer"]["domains"] == ["geo", "math"]
    assert metrics["transfer"]["selection"]["by"].startswith(
        "train.select_rule=heldout_then_cv: held-out-domain"
    )
    assert (
        "optimistic" in metrics["transfer"]["note"] and metrics["transfer"]["calibrate_on"] == "calibration"
    )


def test_cli_evaluate_a_saved_probe(cli_setup, cli_run, monkeypatch, capsys):
    root, common = cli_setup
    out = root / "evaluate"
    _probecal(
        monkeypatch, "evaluate", *common, f"evaluate.probe_dir={cli_run / 'probe'}", f"hydra.run.dir={out}"
    )
    assert [p.name for p in (root / "stores").iterdir()] == [
        Path((cli_run / "store.txt").read_text().strip()).name
    ]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["title"].startswith(f"probecal evaluate: probe {cli_run / 'probe'}")
    # same store, same probe, same test split as the run: the same numbers
    run_metrics = json.loads((cli_run / "metrics.json").read_text())
    assert metrics["headline"][PROBE_METHOD] == pytest.approx(
        run_metrics["headline"][PROBE_METHOD], nan_ok=True
    )
    assert (out / "report.md").is_file() and not (out / "sweep.json").exists()
    assert "report:" in capsys.readouterr().out


def test_cli_evaluate_rejects_an_unknown_split(cli_setup, cli_run, monkeypatch):
    root, common = cli_setup
    with pytest.raises(
        SystemExit, match="evaluate.split='validation'; allowed: train, calibration, test, all"
    ):
        _probecal(
            monkeypatch,
            "evaluate",
            *common,
            f"evaluate.probe_dir={cli_run / 'probe'}",
            "evaluate.split=validation",
            f"hydra.run.dir={root / 'bad'}",
        )


def test_cli_multirun_and_summarize(cli_setup, cli_run, monkeypatch):
    root, common = cli_setup
    sweep_dir = root / "multirun"
    _probecal(monkeypatch, "run", "-m", "seed=0,1", *common, f"hydra.sweep.dir={sweep_dir}")
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    # both jobs reuse the one store, but each trains on the split its own seed assigns
    (store_path,) = (root / "stores").iterdir()
    store = open_store(store_path)
    y = store.column("label").astype(int)
    train_masks = []
    for job, seed in zip(jobs, (0, 1), strict=True):
        _, splits = rows_and_splits(DataSpec(name="jsonl", path=str(root / "data.jsonl"), seed=seed))
        train_masks.append(np.asarray(splits) == "train")
        loaded = ProbeArtifact.load(job / "probe")
        meta = loaded.metadata
        X = probe_features(loaded.probe, store, meta.layer, meta.position)  # hidden (+ logits for a hybrid)
        assert meta.training_data_hash == hash_arrays(X[train_masks[-1]], y[train_masks[-1]]), f"seed {seed}"
    assert not np.array_equal(*train_masks)

    _probecal(monkeypatch, "summarize", f"summarize.dir={sweep_dir}", f"hydra.run.dir={root / 'summary-run'}")
    with (sweep_dir / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["run"] for r in rows) == ["0", "1"]
    assert sorted(r["overrides"].split()[0] for r in rows) == ["seed=0", "seed=1"]
    assert all(r["model"] == "tiny-llama" and r["probe_auroc"] for r in rows)
    table = (sweep_dir / "summary.md").read_text().strip().splitlines()
    assert len(table) == 2 + 2  # header, rule, two runs


def test_summarize_puts_runs_without_the_metric_last(tmp_path):
    from probes.evaluation.summary import summarize

    for run, ece in (("a", None), ("b", 0.2), ("c", 0.1)):
        (tmp_path / run).mkdir()
        headline = {PROBE_METHOD: {"auroc": 0.7, "ece": ece}}
        (tmp_path / run / "metrics.json").write_text(
            json.dumps({"headline": headline, "best_baseline": None})
        )
    for sort_by, order in (("ece", ["c", "b", "a"]), ("auroc", ["a", "b", "c"])):
        csv_path, _, _ = summarize(tmp_path, sort_by)
        with csv_path.open() as fh:
            assert [r["run"] for r in csv.DictReader(fh)] == order, sort_by
    with pytest.raises(ValueError, match="summarize.sort_by='accuracy'; allowed: auroc"):
        summarize(tmp_path, "accuracy")


def test_accuracy_table_counts_per_category(tmp_path):
    from extract.runner import accuracy_table

    def refuse_some(i, record):  # a refusal is its own outcome: label 0, counted apart
        return {**record, "refused": True, "label": 0} if i % 9 == 0 else record

    store = write_synthetic_store(tmp_path / "store", edit_record=refuse_some)
    table = accuracy_table(store)
    records = store.records
    for category in {r["category"] for r in records} | {"all"}:
        group = [r for r in records if category in ("all", r["category"])]
        accuracy = sum(r["label"] for r in group) / len(group)
        answered = [r["label"] for r in group if not r["refused"]]
        refused = sum(r["refused"] for r in group)
        truncated = sum(r["truncated"] for r in group)
        assert refused > 0
        row = (
            f"| {category} | {len(group)} | {accuracy:.3f} | {sum(answered) / len(answered):.3f} | {refused} "
        )
        assert row + f"| {truncated} | 0 |" in table
    assert "verbalized" not in table  # the baseline was off: nothing to report


def test_accuracy_table_reports_unparseable_verbalized_replies(tmp_path, monkeypatch):
    from extract.runner import accuracy_table

    store = write_synthetic_store(tmp_path / "store")
    records = [dict(r, verbalized_parsed=(i % 4 != 0)) for i, r in enumerate(store.records)]
    monkeypatch.setattr(type(store), "records", property(lambda self: records))
    unparseable = sum(1 for r in records if not r["verbalized_parsed"])
    assert f"{unparseable} of {len(records)} replies unparseable" in accuracy_table(store)


def test_calibrate_on_cross_domain_fits_the_final_calibrator_on_out_of_domain_scores(store, monkeypatch):
    """Three domains (rows dealt round-robin): the final calibrator sees each domain's calibration rows scored by
    the leave-one-domain-out probe fit without it; the held-out numbers say how they were calibrated."""
    import probes.training.splits as splits_module
    from probes.evaluation.transfer import cross_domain_set, domain_folds
    from probes.training import SplitData, measure_transfer

    monkeypatch.setattr(
        splits_module, "row_domains", lambda s: np.array(["a", "b", "c"])[np.arange(len(s)) % 3]
    )
    spec = TrainSpec(
        n_folds=3,
        n_bootstrap=50,
        transfer_layer_step=1,
        transfer_features=["hidden"],
        calibrate_on="cross_domain",
    )
    result = train_probe(store, LogisticProbe(), PlattCalibrator(), spec)
    artifact, extra = result.artifact, result.outputs()
    selection = extra["selection"]
    assert selection["calibrate_on"] == "cross_domain" and selection["rule"] == "heldout_then_cv"
    assert selection["by"].startswith("train.select_rule=heldout_then_cv") and selection["cv_auroc"] > 0.5
    assert "optimistic" in selection["heldout_auroc_note"]
    data = SplitData.from_store(store)
    folds = domain_folds(data.domains, data.masks["train"], data.masks["calibration"], data.y)
    X = probe_features(artifact.probe, store, artifact.metadata.layer, artifact.metadata.position)
    _, outer = measure_transfer(artifact.probe, X, store.baselines, data, folds, PlattCalibrator(), spec)
    idx, values = cross_domain_set(outer, folds, data.masks["calibration"])
    expected = PlattCalibrator().fit(values, data.y[idx.astype(int)])
    np.testing.assert_allclose(
        artifact.calibrator.predict(np.array([-1.0, 0.0, 1.0])),
        expected.predict(np.array([-1.0, 0.0, 1.0])),
        atol=1e-6,
    )
    assert extra["transfer"].rows[PROBE_METHOD]["within_cat_auroc"] > 0.7


def test_a_per_domain_calibrator_is_keyed_by_the_domain_serving_looks_up(store, monkeypatch):
    """Serving and recalibration look the calibrator up by the request's domain tag, so training must fit it
    per domain, not per category (the synthetic store's two categories are dealt into three domains here)."""
    import probes.training.splits as splits_module
    from probes.calibration import PerCategoryCalibrator

    domains = np.array(["d1", "d2", "d3"])
    monkeypatch.setattr(splits_module, "row_domains", lambda s: domains[np.arange(len(s)) % 3])
    result = train_probe(store, LogisticProbe(), PerCategoryCalibrator(min_count=10), SPEC)
    fitted = set(result.artifact.calibrator.per_category_)
    assert fitted and fitted <= set(domains), fitted
