"""`probecal STAGE [hydra overrides...]`: one entry point, one Hydra config, several stages."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from omegaconf import DictConfig

log = logging.getLogger("probecal")

DEMO_QUESTIONS = (
    "What is the capital of France?",
    "What is the chemical symbol for gold?",
    "What is 12 + 30?",
)


def stage_demo(cfg: DictConfig) -> None:
    """Load the configured model and answer a few built-in questions."""
    from extract.models import load_model
    from probes.config import instantiate_group

    loaded = load_model(instantiate_group(cfg.model))
    tokenizer, model = loaded.tokenizer, loaded.model
    for question in DEMO_QUESTIONS:
        if loaded.uses_chat_template:
            messages = [{"role": "user", "content": f"{question} Answer briefly."}]
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            prompt = f"Question: {question}\nAnswer:"
        batch = tokenizer(prompt, return_tensors="pt", add_special_tokens=not loaded.uses_chat_template)
        batch = batch.to(loaded.device)
        out = model.generate(**batch, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"Q: {question}\nA: {answer.strip().splitlines()[0] if answer.strip() else ''}\n")


STAGES: dict[str, tuple[Callable[[DictConfig], None], str]] = {
    "run": (stage_demo, "the main job (for now: load the model and answer built-in questions)"),
    "demo": (stage_demo, "load the model and answer a few built-in questions"),
}


def usage() -> str:
    lines = ["usage: probecal STAGE [key=value ...] [-m for a multirun sweep]", "", "stages:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in STAGES.items()]
    lines += [
        "",
        "Every setting is a Hydra override, e.g.  probecal run model=gemma3_270m seed=1",
        "`probecal STAGE --cfg job` prints the composed config; `probecal STAGE --help` lists config groups.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import hydra

    from probes.config import register_configs

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    stage = argv[0]
    if stage not in STAGES:
        print(f"probecal: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        return 2
    func = STAGES[stage][0]
    register_configs()

    @hydra.main(config_path="pkg://probecal_conf", config_name="config", version_base="1.3")
    def _task(cfg: DictConfig) -> None:
        func(cfg)

    sys.argv = [f"probecal {stage}", *argv[1:]]
    _task()
    return 0


if __name__ == "__main__":
    sys.exit(main())
