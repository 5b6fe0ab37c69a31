"""Cost of the scoring sidecar (`ProbedModel.score`, behind POST /v1/score) relative to generating the same
answers (`ProbedModel.generate`) on SmolLM2, same batch size; prints a table and the agreement.

    .venv/bin/python benchmarks/bench_score.py [--probe-dir <run>/probe] --n 32 --batch-size 16

Without --probe-dir a random probe (layer --layer, position --position) is built for the model: the cost
does not depend on the probe's weights. Target: scoring <= 0.2x generation time at batch 16.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from bench_capture import questions  # same question pool as the other benchmarks

from extract.models import ModelSpec, load_model
from probes.artifact import ProbeArtifact
from probes.calibration import PlattCalibrator
from probes.estimators import LogisticProbe
from probes.runtime.wrapper import ProbedModel


def random_probe(loaded, layer: int, position: str, directory: str) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, loaded.fingerprint.hidden_size))
    y = (X[:, 0] > 0).astype(int)
    probe = LogisticProbe(C=1.0).fit(X, y)
    calibrator = PlattCalibrator().fit(probe.decision_function(X), y)
    ProbeArtifact.create(
        probe,
        calibrator,
        layer,
        position,
        loaded.fingerprint,
        extract_settings={"generation": {"stop_strings": ["\n"]}},
    ).save(directory)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--probe-dir")
    parser.add_argument("--layer", type=int, default=20)
    parser.add_argument("--position", default="answer_mean")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    loaded = load_model(ModelSpec())
    probe_dir = args.probe_dir or tempfile.mkdtemp(prefix="bench-score-")
    if not args.probe_dir:
        random_probe(loaded, args.layer, args.position, probe_dir)

    wrapped = ProbedModel(
        loaded,
        ProbeArtifact.load(probe_dir, expected_fingerprint=loaded.fingerprint),
        threshold=None,
        max_batch_size=args.batch_size,
    )
    prompts = [wrapped.question_prompt(q) for q in questions(args.n)]
    prompt_ids = [wrapped.prompt_ids(p) for p in prompts]
    gens = wrapped.generate(prompts, max_new_tokens=args.max_new_tokens)  # warm-up + the answers to score
    completions = [list(g.completion_ids) for g in gens]
    wrapped.score(prompt_ids, completions)  # warm-up
    best = {"generate": float("inf"), "score": float("inf")}
    for _ in range(args.repeats):
        start = time.perf_counter()
        gens = wrapped.generate(prompts, max_new_tokens=args.max_new_tokens)
        best["generate"] = min(best["generate"], time.perf_counter() - start)
        start = time.perf_counter()
        scores = wrapped.score(prompt_ids, completions)
        best["score"] = min(best["score"], time.perf_counter() - start)
    gap = max(abs(s.p_correct - g.p_correct) for s, g in zip(scores, gens, strict=True))
    print(
        f"{loaded.fingerprint.name}, {args.n} answers, batch {args.batch_size}, max_new_tokens "
        f"{args.max_new_tokens}, probe at layer {wrapped.layer} / {wrapped.position}, best of {args.repeats}"
    )
    print("| mode | wall s | answers/s | ratio to generate |")
    print("|---|---:|---:|---:|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.2f} | {args.n / seconds:.1f} | {seconds / best['generate']:.3f} |")
    print(f"max |p_correct(score) - p_correct(generate)| = {gap:.2e}")


if __name__ == "__main__":
    main()
