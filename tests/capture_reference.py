"""The plain reference path for capture tests: unbatched greedy generation, then ONE forward with
`output_hidden_states=True` over prompt + answer. Captured vectors must equal its hidden states."""

from __future__ import annotations

import torch


def greedy(model, prompt, n):
    """Unbatched plain greedy generation (no padding, no hooks): the reference token sequence."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def reference(model, prompt, answer_tokens):
    """Plain forward over prompt + answer: hidden_states [layers+1][seq, hidden] and log-softmax [seq, vocab]."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt + answer_tokens]), output_hidden_states=True)
    return [h[0] for h in out.hidden_states], torch.log_softmax(out.logits[0].float(), -1)


def rel_err(got, want):
    got = torch.as_tensor(got)
    return float((got - want).norm() / want.norm())


def check_against_plain_forward(model, prompts, result, start=0, tolerance=1e-4):
    """Every captured (row, layer, position) of `result` equals the plain forward's hidden state."""
    for i, prompt in enumerate(prompts):
        n = int(result.n_answer_tokens[i])
        tokens = greedy(model, prompt, start + n)
        hidden, _ = reference(model, prompt, tokens)
        P = len(prompt)
        want = {
            "prompt_last": [h[P - 1] for h in hidden],
            "answer_last": [h[P + start + n - 1] for h in hidden],
            "answer_mean": [h[P + start : P + start + n].mean(0) for h in hidden],
        }
        for p, position in enumerate(result.positions):
            for li, layer in enumerate(result.layers):
                err = rel_err(result.activations[i, li, p], want[position][layer])
                assert err < tolerance, (i, position, layer, err)
