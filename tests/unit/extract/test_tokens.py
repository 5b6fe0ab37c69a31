"""The shared train/serve rules of extract.tokens (and the layer -> module hook of extract.hooks), pinned
against hand-built token sequences: extraction, the runtime wrapper, /v1/score and the proxy all use these."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch

from extract.grading import cut_answer
from extract.hooks import find_decoder_blocks, hook_layer
from extract.tokens import cut_generation, eos_token_ids, left_pad, pool_states, position_ids


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_eos_ids_come_from_the_generation_config_then_the_tokenizer_without_repeats():
    tokenizer = SimpleNamespace(eos_token_id=2)
    config = lambda eos: SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=eos))  # noqa: E731
    assert eos_token_ids(config([5, 2]), tokenizer) == [5, 2]
    assert eos_token_ids(config(7), tokenizer) == [7, 2]
    assert eos_token_ids(config(None), tokenizer) == [2]
    assert eos_token_ids(SimpleNamespace(), SimpleNamespace(eos_token_id=None)) == []


def test_left_padding_and_position_ids_skip_the_pads():
    ids, mask = left_pad([[4, 5, 6], [7]], pad_id=0, device="cpu")
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    wide = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids(wide).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_cut_generation_stops_at_eos_then_the_stop_string_then_the_first_line(word_tokenizer):
    tok = word_tokenizer
    cut = partial(cut_answer, stop_sequences=["?"])
    tokens = _ids(tok, "paris is the capital ? rome")
    got = cut_generation(tok, tokens, eos=[tok.eos_token_id], stops=["?"], cut_answer=cut)
    assert (got.answer, got.start, got.end, got.stop is not None, got.eos_at) == (
        "paris is the capital",
        0,
        4,
        True,
        None,
    )
    with_eos = _ids(tok, "paris is") + [tok.eos_token_id] + _ids(tok, "the capital")
    got = cut_generation(tok, with_eos, eos=[tok.eos_token_id], stops=[], cut_answer=cut)
    assert (got.answer, got.start, got.end, got.eos_at) == ("paris is", 0, 2, 2)
    stopped_at_once = [tok.eos_token_id] + _ids(tok, "paris")
    got = cut_generation(tok, stopped_at_once, eos=[tok.eos_token_id], stops=[], cut_answer=cut)
    assert got.empty and got.answer == "" and (got.start, got.end) == (0, 0)


def test_pool_states_reads_the_documented_token_of_each_position():
    states = torch.arange(10, dtype=torch.float32)[:, None].repeat(1, 2)  # state of token j = j
    # prompt tokens 0..2 (prompt_last = 2); completion tokens start at index 3; the answer is completion [1, 3)
    assert pool_states(states, 2, 1, 3, "prompt_last").tolist() == [2, 2]
    assert pool_states(states, 2, 1, 3, "answer_last").tolist() == [5, 5]  # completion token 2 = index 5
    assert pool_states(states, 2, 1, 3, "answer_mean").tolist() == [4.5, 4.5]  # indices 4, 5
    assert pool_states(states, 2, 3, 3, "answer_last").tolist() == [2, 2]  # empty answer -> prompt_last
    assert pool_states(states, 2, 3, 3, "answer_mean").tolist() == [2, 2]
    with pytest.raises(ValueError, match="unknown position 'answer_first'"):
        pool_states(states, 2, 1, 3, "answer_first")


def test_hook_layer_follows_the_hidden_states_convention(tiny_llama, word_tokenizer):
    """layer 0 = embeddings (input of block 1), layer i = output of block i, last layer = after the final norm."""
    ids = torch.tensor([_ids(word_tokenizer, "paris is the capital")])
    with torch.no_grad():
        expected = tiny_llama(input_ids=ids, output_hidden_states=True).hidden_states
    layout = find_decoder_blocks(tiny_llama)
    for layer in range(layout.num_layers + 1):
        seen = []
        handle = hook_layer(layout, layer, seen.append)
        try:
            with torch.no_grad():
                tiny_llama(input_ids=ids)
        finally:
            handle.remove()
        torch.testing.assert_close(seen[0], expected[layer], msg=f"layer {layer}")


def _char_tokenizer():
    """A byte-level tokenizer with one token per character, so that line breaks are tokens of their own (the
    word tokenizer splits them away)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(["</s>", *sorted(alphabet)])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")


@pytest.mark.parametrize("lead", ["\n", "\n\n", " \n \n  ", "\r\n"])
def test_an_answer_after_leading_line_breaks_is_not_cut_to_empty(lead):
    """Issue #22 item 6: an engine whose answer opens with a line break had its answer scored as empty (the
    stop string "\\n" matched at position 0), so different texts got the same p_correct."""
    tok = _char_tokenizer()
    tokens = _ids(tok, lead + "Paris is it.\nQuestion: next")
    assert tok.decode(tokens) == lead + "Paris is it.\nQuestion: next"
    got = cut_generation(tok, tokens, eos=[tok.eos_token_id], stops=["\n"], cut_answer=cut_answer)
    assert got.answer == "Paris is it."
    assert not got.empty and got.found
    assert tok.decode(tokens[got.start : got.end]).strip() == "Paris is it."
    assert got.stop is not None and got.before == lead + "Paris is it."
    only_blank = _ids(tok, lead)
    got = cut_generation(tok, only_blank, eos=[tok.eos_token_id], stops=["\n"], cut_answer=cut_answer)
    assert got.empty and got.answer == ""
