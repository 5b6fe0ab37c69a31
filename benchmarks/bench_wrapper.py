"""Cost of the runtime wrapper: `ProbedModel.generate` vs plain `model.generate` on SmolLM2 (prints a table).

Same prompts (the training prompt format), same batches, greedy, same stop string and token budget.
The baseline stops rows exactly as the wrapper does (at the stop string, once the answer's last token was
fed, `max_new_tokens + 1` budget), so the ratio is the cost of the hook, the probe and the bookkeeping.
HF's own `stop_strings=` is shown too: it is much slower on CPU, so it would flatter the wrapper.
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
from transformers import StoppingCriteriaList

from extract.generation import StopWhenAnswerFed
from extract.models import ModelSpec
from extract.tokens import eos_token_ids
from probes.runtime.wrapper import ProbedModel


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--probe-dir", required=True)
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    wrapped = ProbedModel.from_config(
        ModelSpec(device=args.device), args.probe_dir, threshold=None, max_batch_size=args.batch_size
    )
    model, tok = wrapped.loaded.model, wrapped.loaded.tokenizer
    prompts = [wrapped.question_prompt(q) for q in questions(args.n)]
    batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]

    def plain(hf_stop_strings: bool = False) -> None:
        for batch in batches:
            enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(
                wrapped.loaded.device
            )
            if hf_stop_strings:
                stopping = {
                    "stop_strings": wrapped.default_stop,
                    "tokenizer": tok,
                    "max_new_tokens": args.max_new_tokens,
                }
            else:
                criterion = StopWhenAnswerFed(tok, wrapped.default_stop, enc["input_ids"].shape[1], set(eos))
                stopping = {
                    "stopping_criteria": StoppingCriteriaList([criterion]),
                    "max_new_tokens": args.max_new_tokens + 1,
                }
            with torch.no_grad():
                model.generate(**enc, do_sample=False, pad_token_id=tok.pad_token_id, **stopping)

    def probed() -> None:
        for batch in batches:
            wrapped.generate(batch, max_new_tokens=args.max_new_tokens)

    eos = eos_token_ids(model, tok)
    modes = {
        "plain model.generate (same stopping)": plain,
        "ProbedModel.generate": probed,
        "plain model.generate (HF stop_strings)": lambda: plain(hf_stop_strings=True),
    }
    best = {name: float("inf") for name in modes}
    for fn in modes.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in modes.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    base = best["plain model.generate (same stopping)"]
    print(
        f"SmolLM2, {args.n} prompts, batch {args.batch_size}, max_new_tokens {args.max_new_tokens}, "
        f"probe at layer {wrapped.layer} / {wrapped.position}, best of {args.repeats}"
    )
    print("| mode | wall time (s) | ratio to plain |")
    print("|---|---:|---:|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.2f} | {seconds / base:.3f} |")


if __name__ == "__main__":
    main()
