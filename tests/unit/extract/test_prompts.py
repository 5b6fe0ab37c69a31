import pytest
from omegaconf import OmegaConf

from extract.data import QARow
from extract.prompts import (
    DEFAULT_FEW_SHOT_EXAMPLES,
    PromptSpec,
    Question,
    build_prompt_ids,
    chat_messages,
    encode_prompt,
    few_shot_for,
    render_prompt,
    saved_prompt_spec,
)
from tests import tiny_models

CAPITAL = QARow("q1", "geo", "what is the capital of france ?", ("paris",))


@pytest.fixture(scope="module")
def bos_tokenizer():
    """The word tokenizer, without chat template, whose post-processor prepends <s> like Llama/Gemma do."""
    from tokenizers.processors import TemplateProcessing

    tok = tiny_models.word_tokenizer(chat=False)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    assert tok("what")["input_ids"][0] == tok.bos_token_id
    return tok


def test_chat_prompt_has_instruction_question_and_no_extra_bos(word_tokenizer):
    spec = PromptSpec(instruction="answer briefly .", num_chat_shots=0)
    text = render_prompt(CAPITAL.question, word_tokenizer, True, spec)
    assert text == (
        "<|im_start|> user answer briefly .\n\nQuestion: what is the capital of france ? <|im_end|> <|im_start|> assistant "  # noqa: E501
    )
    [ids] = build_prompt_ids([CAPITAL], word_tokenizer, True, spec)
    assert ids == word_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == word_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert word_tokenizer.bos_token_id not in ids


def test_chat_shots_are_user_assistant_turn_pairs_before_the_question(word_tokenizer):
    spec = PromptSpec(
        instruction="answer briefly .",
        few_shot_examples=[
            {"question": "q one", "answer": "a one"},
            {"question": "q two", "answer": "a two"},
            {"question": "q three", "answer": "a three"},
        ],
        num_chat_shots=2,
    )
    messages = chat_messages(CAPITAL.question, spec)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert [m["content"] for m in messages] == [
        "answer briefly .\n\nQuestion: q one",
        "a one",
        "answer briefly .\n\nQuestion: q two",
        "a two",
        "answer briefly .\n\nQuestion: " + CAPITAL.question,
    ]
    text = render_prompt(CAPITAL.question, word_tokenizer, True, spec)
    assert text == (
        "<|im_start|> user answer briefly .\n\nQuestion: q one <|im_end|> <|im_start|> assistant a one <|im_end|> "
        "<|im_start|> user answer briefly .\n\nQuestion: q two <|im_end|> <|im_start|> assistant a two <|im_end|> "
        "<|im_start|> user answer briefly .\n\nQuestion: what is the capital of france ? <|im_end|> <|im_start|> assistant "  # noqa: E501
    )
    # The ids are the one encoder's: encode_prompt(Question) = build_prompt_ids = the template's own ids.
    [ids] = build_prompt_ids([CAPITAL], word_tokenizer, True, spec)
    assert ids == encode_prompt(Question(CAPITAL.question, CAPITAL.id), word_tokenizer, True, spec)
    assert ids == encode_prompt(messages, word_tokenizer, True)
    assert (
        ids
        == word_tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )
    # num_few_shot is the base models' count: it does not change the chat prompt.
    assert build_prompt_ids(
        [CAPITAL], word_tokenizer, True, PromptSpec(**{**vars(spec), "num_few_shot": 0})
    ) == [ids]


def test_chat_shots_never_contain_the_question_asked():
    spec = PromptSpec(num_chat_shots=3)
    for example in DEFAULT_FEW_SHOT_EXAMPLES:
        asked = example["question"].upper().rstrip("?")  # the same question, differently written
        messages = chat_messages(asked, spec)
        assert len(messages) == 2 * spec.num_chat_shots + 1
        shown = [m["content"] for m in messages[:-1]]
        assert not any(example["question"] in c or c == example["answer"] for c in shown)
        assert messages[-1]["content"].endswith(asked)
    # The default facts never meet the pool: every facts question gets the same default turns.
    from extract.data import DataSpec, load_rows

    first = chat_messages("x", spec)[:-1]
    assert len(first) == 6
    assert all(chat_messages(row.question, spec)[:-1] == first for row in load_rows(DataSpec(name="facts")))


def test_default_chat_shots_are_short_phrases_and_a_bad_count_is_clear(word_tokenizer):
    assert PromptSpec().num_chat_shots == 0  # by measurement: see benchmarks/bench_prompt_length.py
    assert all(len(e["answer"].split()) <= 3 for e in DEFAULT_FEW_SHOT_EXAMPLES)
    with pytest.raises(ValueError, match=r"extract.prompt.num_chat_shots=-1; must be >= 0"):
        render_prompt("q", word_tokenizer, True, PromptSpec(num_chat_shots=-1))


def test_saved_settings_without_chat_shots_keep_the_single_turn_prompt():
    """A probe saved before `num_chat_shots` existed was trained on the single user turn."""
    saved = {k: v for k, v in vars(PromptSpec()).items() if k != "num_chat_shots"}
    assert saved_prompt_spec(saved).num_chat_shots == 0
    assert saved_prompt_spec({**saved, "num_chat_shots": 2, "gone_field": 1}).num_chat_shots == 2


def test_few_shot_prompt_layout(word_tokenizer):
    spec = PromptSpec(
        few_shot_examples=[{"question": "q one", "answer": "a one"}, {"question": "q two", "answer": "a two"}]
    )
    text = render_prompt("what is 2 + 2 ?", word_tokenizer, False, spec)
    assert (
        text
        == "Question: q one\nAnswer: a one\n\nQuestion: q two\nAnswer: a two\n\nQuestion: what is 2 + 2 ?\nAnswer:"
    )


def test_few_shot_gets_bos_exactly_once(bos_tokenizer, word_tokenizer):
    [ids] = build_prompt_ids([CAPITAL], bos_tokenizer, False, PromptSpec())
    assert ids[0] == bos_tokenizer.bos_token_id and ids.count(bos_tokenizer.bos_token_id) == 1
    [plain] = build_prompt_ids([CAPITAL], word_tokenizer, False, PromptSpec())
    assert plain == ids[1:]  # a tokenizer that adds no BOS gets none


def test_few_shot_examples_never_include_the_question():
    spec = PromptSpec()
    asked = "HOW many legs does a spider have"  # the first pool example, differently written
    shots = few_shot_for(asked, spec)
    assert len(shots) == spec.num_few_shot == 4
    assert all(s["question"] != DEFAULT_FEW_SHOT_EXAMPLES[0]["question"] for s in shots)
    assert shots == [dict(e) for e in DEFAULT_FEW_SHOT_EXAMPLES[1:5]]  # the next pool example fills in
    assert few_shot_for("Who discovered penicillin?", spec) == [
        dict(e) for e in DEFAULT_FEW_SHOT_EXAMPLES[:4]
    ]
    # The defaults stay out of every built-in facts category.
    assert not any(
        word in e["question"].lower()
        for e in DEFAULT_FEW_SHOT_EXAMPLES
        for word in ("capital", "currency", "continent", "element", "+")
    )


def test_overlong_prompt_is_an_error_naming_the_row(word_tokenizer):
    row = QARow("long-7", "geo", "what is the capital of " * 30 + "france ?", ("paris",))
    spec = PromptSpec(max_prompt_tokens=40, num_chat_shots=0)  # the limit is about the question here
    with pytest.raises(
        ValueError, match=r"row 'long-7': prompt is \d+ tokens, more than extract.prompt.max_prompt_tokens=40"
    ):
        build_prompt_ids([CAPITAL, row], word_tokenizer, True, spec)


def test_truncate_shortens_only_the_question(word_tokenizer):
    row = QARow("long-7", "geo", "what is the capital of " * 30 + "france ?", ("paris",))
    spec = PromptSpec(max_prompt_tokens=40, truncate=True, num_chat_shots=0)
    short, long_ = build_prompt_ids([CAPITAL, row], word_tokenizer, True, spec)
    assert len(long_) == 40  # one word at a time: the longest question that fits
    assert short == build_prompt_ids([CAPITAL], word_tokenizer, True, spec)[0]
    end = word_tokenizer(" <|im_end|> <|im_start|> assistant ", add_special_tokens=False)["input_ids"]
    assert long_[-len(end) :] == end  # the template's end survives


def test_template_with_unknown_placeholder_is_clear(word_tokenizer):
    with pytest.raises(
        ValueError, match=r"chat_template_format=.*allowed placeholders: \{instruction\}, \{question\}"
    ):
        render_prompt("q", word_tokenizer, True, PromptSpec(chat_template_format="{quest}"))
    with pytest.raises(ValueError, match=r"few_shot_examples\[0\] needs keys 'question' and 'answer'"):
        render_prompt("q", word_tokenizer, False, PromptSpec(few_shot_examples=[{"q": "x"}]))


def test_prompt_spec_is_a_valid_structured_config():
    cfg = OmegaConf.structured(PromptSpec)
    cfg.max_prompt_tokens = 128
    assert OmegaConf.to_object(cfg).few_shot_examples[0]["answer"] == "eight"
    with pytest.raises(Exception, match="instrucion"):
        cfg.instrucion = "typo"


def test_encode_prompt_puts_leading_special_tokens_exactly_once():
    from extract.prompts import Question, encode_prompt, leading_special_ids

    both = tiny_models.word_tokenizer(add_bos=True, template_bos=True)
    plain = tiny_models.word_tokenizer()
    assert leading_special_ids(both) == [both.bos_token_id] and leading_special_ids(plain) == []
    words = plain("what is 12 + 30 ?", add_special_tokens=False)["input_ids"]
    assert encode_prompt("what is 12 + 30 ?", both, True) == [1, *words]
    assert encode_prompt("<s> what is 12 + 30 ?", both, True) == [1, *words]  # already there: not doubled
    assert encode_prompt("what is 12 + 30 ?", plain, True) == words  # a tokenizer without BOS gets none
    messages = [{"role": "user", "content": "what is 12 + 30 ?"}]
    chat_ids = encode_prompt(messages, both, True)
    assert (
        chat_ids
        == both.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    assert chat_ids.count(1) == 1 and chat_ids[0] == 1
    # A Question is build_prompt_ids of one row, in both formats.
    for chat in (True, False):
        assert (
            encode_prompt(Question(CAPITAL.question), both, chat, PromptSpec())
            == build_prompt_ids([CAPITAL], both, chat, PromptSpec())[0]
        )


def test_encode_prompt_rejects_what_it_cannot_encode(word_tokenizer):
    from extract.prompts import Question, encode_prompt

    with pytest.raises(ValueError, match="without a chat template: send a plain text prompt"):
        encode_prompt([{"role": "user", "content": "what"}], word_tokenizer, False)
    with pytest.raises(ValueError, match=r"chat message \[1\] needs keys 'role' and 'content'"):
        encode_prompt([{"role": "user", "content": "what"}, {"text": "x"}], word_tokenizer, True)
    with pytest.raises(ValueError, match="a Question is formatted with a PromptSpec"):
        encode_prompt(Question("what"), word_tokenizer, True)
    with pytest.raises(TypeError, match="got int"):
        encode_prompt(42, word_tokenizer, True)
    with pytest.raises(ValueError, match=r"row 'q-9': prompt is \d+ tokens"):
        encode_prompt(
            Question("what " * 40, "q-9"),
            word_tokenizer,
            True,
            PromptSpec(max_prompt_tokens=20, num_chat_shots=0),
        )


@pytest.mark.parametrize("chat", [True, False])
def test_self_evaluation_prompts_get_bos_once(chat):
    from extract.self_eval import P_TRUE_PROMPT, _prompt_ids

    tok = tiny_models.word_tokenizer(add_bos=True, template_bos=True)
    ids = _prompt_ids(tok, P_TRUE_PROMPT.format(question="what is 2 + 2 ?", answer="4"), "\nAnswer:", chat)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_demo_feeds_the_training_ids(tiny_llama, tmp_path, monkeypatch, capsys):
    """`probecal demo` encodes its questions exactly like extraction (BOS once with a BOS-writing template)."""
    from extract.models import from_transformers
    from probes.cli import main as cli

    tok = tiny_models.word_tokenizer(add_bos=True, template_bos=True)
    monkeypatch.setattr(
        "extract.models.load_model", lambda spec: from_transformers(tiny_llama, tok, name="tiny")
    )
    seen = []
    real_generate = tiny_llama.generate

    def recording_generate(*args, input_ids=None, **kwargs):
        seen.append(input_ids[0].tolist())
        return real_generate(*args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(tiny_llama, "generate", recording_generate)
    assert cli.main(
        ["demo", "model=hf", "model.path=tiny-in-process", f"hydra.run.dir={tmp_path / 'run'}"]
    ) in (0, None)
    rows = [QARow(f"d{i}", "demo", q, ("x",)) for i, q in enumerate(cli.DEMO_QUESTIONS)]
    assert seen == build_prompt_ids(rows, tok, True, PromptSpec())  # conf/extract/default.yaml = PromptSpec()
    assert all(ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id for ids in seen)
    assert "Q: What is the capital of France?" in capsys.readouterr().out
