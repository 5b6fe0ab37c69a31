"""Cost of the runtime wrapper: `ProbedModel.generate` vs plain `model.generate` on SmolLM2 (prints a table).

Same prompts (the training prompt format), same batches, greedy, same stop string and token budget.
Each mode runs once as warm-up, then the modes alternate `--repeats` times and the best time of each
is kept (the machine is shared and noisy). Needs a probe artifact trained on SmolLM2
(`probecal run` writes one to <run dir>/probe).

    .venv/bin/python benchmarks/bench_wrapper.py --probe-dir outputs/runs/<date>/<time>/probe --n 32
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_capture import questions  # same question pool as the capture benchmark

from extract.models import ModelSpec
from probes.wrapper import ProbedModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe-dir", required=True)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    wrapped = ProbedModel.from_config(ModelSpec(device=args.device), args.probe_dir, threshold=None,
                                      max_batch_size=args.batch_size)
    model, tok = wrapped.loaded.model, wrapped.loaded.tokenizer
    prompts = [wrapped.question_prompt(q) for q in questions(args.n)]
    batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]

    def plain() -> None:
        for batch in batches:
            enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(wrapped.loaded.device)
            with torch.no_grad():
                model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                               stop_strings=wrapped.default_stop, tokenizer=tok)

    def probed() -> None:
        for batch in batches:
            wrapped.generate(batch, max_new_tokens=args.max_new_tokens)

    modes = {"plain model.generate": plain, "ProbedModel.generate": probed}
    best = {name: float("inf") for name in modes}
    for fn in modes.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in modes.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    base = best["plain model.generate"]
    print(f"SmolLM2, {args.n} prompts, batch {args.batch_size}, max_new_tokens {args.max_new_tokens}, "
          f"probe at layer {wrapped.layer} / {wrapped.position}, best of {args.repeats}")
    print("| mode | wall time (s) | ratio to plain |")
    print("|---|---:|---:|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.2f} | {seconds / base:.3f} |")


if __name__ == "__main__":
    main()
