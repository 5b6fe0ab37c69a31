"""Cost of probecal's single-pass capture against plain generation, on SmolLM2 (prints a table).

Same prompts, same batches, one process:
  (a) plain `model.generate` (greedy, same stop strings and budget);
  (b) `generate_and_capture`: all layers x 3 positions + the six confidence baselines;
  (c) `model.generate(output_hidden_states=True, return_dict_in_generate=True)`, the usual way.
Each mode runs once as warm-up; then the modes run in rotation `--repeats` times and the best
time of each is kept (a shared machine makes single timings noisy). Peak memory: CUDA
max_memory_allocated above the start of the run; on CPU the peak process RSS above the start
(sampled every 2 ms).

    .venv/bin/python benchmarks/bench_capture.py --n 32          # ~2-3 minutes on 2 shared CPU cores
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import psutil
import torch

from extract.generation import generate_and_capture
from extract.models import ModelSpec, load_model
from extract.settings import POSITIONS, GenerationSpec

CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("Canada", "Ottawa"),
    ("Australia", "Canberra"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Norway", "Oslo"),
    ("Poland", "Warsaw"),
    ("Greece", "Athens"),
    ("Portugal", "Lisbon"),
    ("Chile", "Santiago"),
    ("Mexico", "Mexico City"),
    ("India", "New Delhi"),
    ("China", "Beijing"),
    ("Russia", "Moscow"),
    ("Brazil", "Brasilia"),
    ("Turkey", "Ankara"),
    ("Sweden", "Stockholm"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("Hungary", "Budapest"),
    ("Cuba", "Havana"),
    ("Vietnam", "Hanoi"),
    ("Thailand", "Bangkok"),
    ("Argentina", "Buenos Aires"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Nigeria", "Abuja"),
]
ELEMENTS = [
    "gold",
    "silver",
    "iron",
    "copper",
    "sodium",
    "potassium",
    "oxygen",
    "helium",
    "lead",
    "tin",
    "mercury",
    "zinc",
    "carbon",
    "nitrogen",
    "calcium",
    "neon",
]


def questions(n: int) -> list[str]:
    pool = [f"What is the capital of {country}?" for country, _ in CAPITALS]
    pool += [f"What is the chemical symbol for {element}?" for element in ELEMENTS]
    pool += [f"What is {a} + {b}?" for a in range(3, 40, 5) for b in range(2, 30, 4)]
    pool += [f"Which continent is {country} in?" for country, _ in CAPITALS]
    return (pool * (n // len(pool) + 1))[:n]


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, else sampled process RSS."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.proc = psutil.Process()
            self.base = self.proc.memory_info().rss
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=32, help="questions (default 32)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(ModelSpec(name="smollm2-135m-instruct", device=args.device))
    model, tok, device = loaded.model, loaded.tokenizer, loaded.device
    prompts = []
    for q in questions(args.n):
        text = tok.apply_chat_template(
            [{"role": "user", "content": f"{q} Answer briefly."}], add_generation_prompt=True, tokenize=False
        )
        prompts.append(tok(text, add_special_tokens=False)["input_ids"])
    spec = GenerationSpec(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, stop_strings=["\n"])
    batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]

    def padded(batch):
        enc = tok.pad({"input_ids": batch}, return_tensors="pt", padding=True)  # tokenizer pads on the left
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def plain(extra):
        tokens = 0
        for batch in batches:
            ids, mask = padded(batch)
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=spec.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                stop_strings=spec.stop_strings,
                tokenizer=tok,
                **extra,
            )
            seqs = out.sequences if extra else out
            tokens += (seqs.shape[1] - ids.shape[1]) * len(batch)
        return tokens

    def capture():
        result = generate_and_capture(model, tok, prompts, "all", POSITIONS, spec, str.strip)
        return result.n_generated_tokens

    modes = {
        "(a) plain generate": lambda: plain({}),
        "(b) probecal capture": capture,
        "(c) output_hidden_states": lambda: plain(
            {"output_hidden_states": True, "return_dict_in_generate": True}
        ),
    }
    for run in modes.values():  # warm-up (allocator, kernels)
        run()
    best = {name: (float("inf"), 0, 0) for name in modes}
    for _ in range(args.repeats):
        for name, run in modes.items():
            with torch.no_grad(), PeakMemory(device) as mem:
                start = time.perf_counter()
                tokens = run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
            print(f"  {name}: {elapsed:.2f} s", file=sys.stderr, flush=True)
            if elapsed < best[name][0]:
                best[name] = (elapsed, mem.peak, tokens)
            else:
                best[name] = (best[name][0], max(best[name][1], mem.peak), best[name][2])

    base = best["(a) plain generate"][0]
    print(
        f"\nSmolLM2-135M-Instruct on {device} ({loaded.model.dtype}), n={args.n}, batch={args.batch_size}, "
        f"max_new_tokens={args.max_new_tokens}, {loaded.fingerprint.num_layers + 1} layers x 3 positions, "
        f"best of {args.repeats}"
    )
    print(f"{'mode':<28}{'wall s':>9}{'ratio':>8}{'gen tokens':>12}{'peak mem MiB':>14}")
    for name, (elapsed, peak, tokens) in best.items():
        print(f"{name:<28}{elapsed:>9.2f}{elapsed / base:>8.3f}{tokens:>12}{peak / 2**20:>14.1f}")


if __name__ == "__main__":
    main()
