"""`ProbedModel.score` (the /v1/score sidecar path) must give the confidence `generate` gives for the same
tokens, cut at the same stop string; and the text / token counts / finish reason `generate` returns agree."""

import numpy as np
import pytest
import torch

from extract.models import from_transformers
from extract.streaming import BatchFeed, finish_text
from probes.runtime.wrapper import ProbedModel
from tests.factories import fitted_artifact

PROMPTS = ["what is the capital of france ?", "what is 12 + 30 ?", "which city is in asia ?"]
NEVER = [
    "w98"
]  # a filler word the tiny models practically never produce: generation runs to the length limit


def wrap(model, tokenizer, directory, layer, position, threshold=None, stop=("?",)):
    loaded = from_transformers(model, tokenizer, name="tiny")
    settings = {"generation": {"stop_strings": list(stop)}}
    fitted_artifact(loaded.fingerprint, layer, position, seed=layer, extract_settings=settings).save(
        directory
    )
    return ProbedModel.from_transformers(model, tokenizer, directory, threshold=threshold, max_batch_size=4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("position", ["prompt_last", "answer_last", "answer_mean"])
def test_score_equals_generate_on_the_same_tokens(
    arch, position, tiny_llama, tiny_gpt2, word_tokenizer, tmp_path
):
    model = tiny_llama if arch == "llama" else tiny_gpt2
    n_layers = model.config.num_hidden_layers
    for layer in (0, 2, n_layers):  # embeddings, a middle block, the last layer (after the final norm)
        pm = wrap(model, word_tokenizer, tmp_path / f"{layer}", layer, position)
        gens = pm.generate(PROMPTS, max_new_tokens=6, stop=NEVER)
        ids = [pm.prompt_ids(p) for p in PROMPTS]
        scores = pm.score(ids, [list(g.completion_ids) for g in gens], stop=NEVER)
        np.testing.assert_allclose([s.p_correct for s in scores], [g.p_correct for g in gens], atol=1e-5)
        np.testing.assert_allclose([s.score for s in scores], [g.score for g in gens], atol=1e-4)
        # text in (no drift with this tokenizer) gives the same numbers as ids in
        by_text = pm.score(PROMPTS, [g.text for g in gens], stop=NEVER)
        np.testing.assert_allclose([s.p_correct for s in by_text], [s.p_correct for s in scores], atol=1e-6)


def test_score_cuts_the_answer_at_the_stop_string_like_generate(tiny_llama, word_tokenizer, tmp_path):
    pm = wrap(tiny_llama, word_tokenizer, tmp_path, 2, "answer_mean")
    long = pm.generate(PROMPTS, max_new_tokens=8, stop=NEVER)
    for prompt, full in zip(PROMPTS, long, strict=True):
        words = full.text.split()
        stop = [words[3]]  # a word in the middle: generation must stop there
        short = pm.generate(prompt, max_new_tokens=8, stop=stop)[0]
        assert short.finish_reason == "stop" and stop[0] not in short.text
        assert short.completion_tokens < full.completion_tokens
        # the other engine returned the whole long completion: the sidecar cuts it where generate stopped
        (scored,) = pm.score([prompt], [list(full.completion_ids)], stop=stop)
        assert scored.p_correct == pytest.approx(short.p_correct, abs=1e-5)
        assert scored.answer_text == short.text.strip()
        # and the uncut score differs (the cut matters)
        (uncut,) = pm.score([prompt], [list(full.completion_ids)], stop=NEVER)
        assert uncut.p_correct == pytest.approx(full.p_correct, abs=1e-5)


def test_score_with_a_threshold_serializes_to_json(tiny_llama, word_tokenizer, tmp_path):
    import json

    pm = wrap(tiny_llama, word_tokenizer, tmp_path, 2, "answer_mean", threshold=0.5)
    gens = pm.generate(PROMPTS, max_new_tokens=6, stop=NEVER)
    scores = pm.score(PROMPTS, [g.text for g in gens], stop=NEVER)
    for result in [*scores, *gens]:
        assert type(result.abstained) is bool
        assert json.loads(json.dumps(result.to_dict()))["abstained"] == (result.p_correct < 0.5)


def test_score_forward_stops_at_the_probe_layer(tiny_llama, word_tokenizer, tmp_path):
    pm = wrap(tiny_llama, word_tokenizer, tmp_path, 1, "answer_last")
    ran = []
    handles = [
        tiny_llama.model.layers[k].register_forward_hook(lambda m, a, o, k=k: ran.append(k)) for k in range(3)
    ]
    handles.append(tiny_llama.lm_head.register_forward_hook(lambda m, a, o: ran.append("lm_head")))
    try:
        pm.score(PROMPTS, ["paris", "42", "rome"])
    finally:
        for h in handles:
            h.remove()
    assert ran == [0]  # layer 1 = output of block 0; blocks 1, 2 and the LM head never ran


def test_text_tokens_finish_and_scored_span_agree(tiny_llama, word_tokenizer, tmp_path):
    """Issue #12.7: with `stop` set, the returned text, completion_tokens, finish_reason and the span
    the probe scored describe the same generation."""
    pm = wrap(tiny_llama, word_tokenizer, tmp_path, 2, "answer_last")
    (full,) = pm.generate(PROMPTS[0], max_new_tokens=8, stop=NEVER)
    assert full.finish_reason == "length" and full.completion_tokens == 8 == len(full.completion_ids)
    assert word_tokenizer.decode(list(full.completion_ids), skip_special_tokens=True) == full.text
    stop_word = full.text.split()[2]
    (short,) = pm.generate(PROMPTS[0], max_new_tokens=8, stop=[stop_word])
    # text before the stop string; the tokens counted are those generated, the stop token included
    assert short.text == full.text[: full.text.find(stop_word)]
    assert short.completion_tokens == 3 and short.finish_reason == "stop"
    assert short.completion_ids == full.completion_ids[:3]
    start, end = short.answer_chars
    assert short.text[start:end] == short.text.strip()


def test_a_row_ended_by_eos_finishes_with_stop_not_length(word_tokenizer):
    ids = word_tokenizer(["paris", "and", "rome"], is_split_into_words=True, add_special_tokens=False)[
        "input_ids"
    ]
    eos = {2}
    feed = BatchFeed(word_tokenizer, rows=1, max_new_tokens=16, eos=eos, stops=["?"])
    feed.put(torch.tensor([[5, 6]]))  # the prompt
    for token in [*ids, 2, 2]:  # the row ends with EOS; generate keeps padding it with EOS
        feed.put(torch.tensor([token]))
    assert feed.tokens[0] == [*ids, 2]
    assert finish_text(word_tokenizer, feed.tokens[0], 16, eos, ["?"]) == ("paris and rome", 4, "stop")


def test_finish_text_and_feed_hold_back_partial_stop_strings(word_tokenizer):
    ids = word_tokenizer(
        ["paris", "and", "rome", "?", "berlin"], is_split_into_words=True, add_special_tokens=False
    )["input_ids"]
    assert finish_text(word_tokenizer, ids, 10, {2}, ["rome ?"]) == ("paris and ", 4, "stop")
    assert finish_text(word_tokenizer, ids, 3, {2}, ["?"]) == ("paris and rome", 3, "length")
    assert finish_text(word_tokenizer, [*ids[:2], 2, ids[3]], 10, {2}, ["?"]) == ("paris and", 3, "stop")
    pieces = []
    feed = BatchFeed(word_tokenizer, 1, 10, {2}, ["rome ?"], on_text=lambda row, piece: pieces.append(piece))
    feed.put(torch.tensor([[1, 5]]))  # the prompt
    for token in ids:
        feed.put(torch.tensor([token]))
    assert "".join(pieces) == "paris and " and feed.tokens[0] == ids[:4]


def test_stream_pieces_concatenate_to_the_final_text(tiny_llama, word_tokenizer, tmp_path):
    pm = wrap(tiny_llama, word_tokenizer, tmp_path, 2, "answer_last")
    *pieces, final = list(pm.stream(PROMPTS[1], max_new_tokens=6, stop=NEVER))
    assert len(pieces) >= 2 and "".join(pieces) == final.text
    assert final.p_correct == pytest.approx(
        pm.generate(PROMPTS[1], max_new_tokens=6, stop=NEVER)[0].p_correct, abs=1e-6
    )
