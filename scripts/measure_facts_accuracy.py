"""Per-category accuracy of a model on the built-in `facts` set under the default prompt.

    .venv/bin/python scripts/measure_facts_accuracy.py [--per-category 40] [--batch-size 16] [--device cpu]

Greedy decoding, left padding, answers cut with `cut_answer` and graded with `grade` (default
"contains" grader). "truncated" counts generations that hit max_new_tokens before any stop sequence or
end of turn (their graded part may be incomplete).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from extract.data import DataSpec, load_rows  # noqa: E402
from extract.grading import cut_answer, grade  # noqa: E402
from extract.models import ModelSpec, load_model  # noqa: E402
from extract.prompts import PromptSpec, build_prompt_ids  # noqa: E402


def stratified_sample(rows, per_category: int, seed: int):
    by_cat: dict[str, list] = {}
    for row in rows:
        by_cat.setdefault(row.category, []).append(row)
    rng = random.Random(seed)
    return [r for cat in sorted(by_cat) for r in rng.sample(by_cat[cat], min(per_category, len(by_cat[cat])))]


@torch.no_grad()
def generate(loaded, prompt_ids: list[list[int]], batch_size: int, max_new_tokens: int):
    """Greedy continuations, yielded batch by batch: (decoded text, hit the token limit) per prompt."""
    tok, model = loaded.tokenizer, loaded.model
    for start in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[start : start + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in batch], device=loaded.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=loaded.device)
        gen = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )[:, width:]
        for row in gen.tolist():
            ended = tok.eos_token_id in row
            yield tok.decode(row, skip_special_tokens=True), not ended and len(row) == max_new_tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--per-category", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=2, help="example answers printed per category")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(ModelSpec(name=args.model, device=args.device))
    spec = PromptSpec()
    rows = stratified_sample(load_rows(DataSpec()), args.per_category, args.seed)
    prompt_ids = build_prompt_ids(rows, loaded.tokenizer, loaded.uses_chat_template, spec)
    generations = generate(loaded, prompt_ids, args.batch_size, args.max_new_tokens)
    stops = spec.stops_for(loaded.uses_chat_template)

    stats: dict[str, list[int]] = {}
    shown: dict[str, int] = {}
    for row, (text, hit_limit) in zip(rows, generations, strict=True):
        answer = cut_answer(text, stops)
        g = grade(answer, row.answers, row.question)
        cut_by_stop = answer != text.strip()
        s = stats.setdefault(row.category, [0, 0, 0])
        s[0] += g.correct
        s[1] += 1
        s[2] += hit_limit and not cut_by_stop
        if shown.get(row.category, 0) < args.show:
            shown[row.category] = shown.get(row.category, 0) + 1
            print(f"[{row.category}] {row.question!r} -> {answer!r} gold={list(row.answers)[:2]} {g.rule}", flush=True)
    print(f"\n{args.model}, default prompt, greedy, max_new_tokens={args.max_new_tokens}")
    print(f"{'category':<26}{'n':>4}{'accuracy':>10}{'truncated':>11}")
    total = [0, 0, 0]
    for cat in sorted(stats):
        c, n, t = stats[cat]
        total = [total[0] + c, total[1] + n, total[2] + t]
        print(f"{cat:<26}{n:>4}{c / n:>10.1%}{t:>11}")
    print(f"{'all':<26}{total[1]:>4}{total[0] / total[1]:>10.1%}{total[2]:>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
