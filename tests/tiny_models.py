"""Tiny random models and a word-level tokenizer, built in-process (no downloads).

Odd sizes (hidden 32, vocab 99, 3 layers) make shape bugs visible. Importable as a module so that
subprocess tests, notebooks and benchmarks can build the same objects as the fixtures.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = (
    "what is the capital of france paris germany berlin italy rome spain madrid answer question "
    "a an and or not yes no true false symbol for gold au silver ag element number "
    "0 1 2 3 4 5 6 7 8 9 10 11 12 20 30 42 + - ? . , : ! user assistant system briefly "
    "city country currency euro dollar continent europe asia africa it in which who how many "
    "sydney canberra australia romeo confidence correct i don't know"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


# Like Llama 3 / Gemma / Mistral templates: the template itself writes BOS first.
CHAT_TEMPLATE_WITH_BOS = "{{ bos_token }}" + CHAT_TEMPLATE


def word_tokenizer(chat: bool = True, add_bos: bool = False, template_bos: bool = False):
    """A whitespace word-level tokenizer over `SPECIAL_TOKENS + WORDS` (vocab 99).

    add_bos: its post-processor prepends `<s>` to every encoding with special tokens (like Llama/Gemma).
    template_bos: its chat template writes `{{ bos_token }}` (like Llama 3/Gemma); both together are the
    case where re-encoding a rendered template with special tokens doubles BOS.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(SPECIAL_TOKENS + WORDS))}
    assert len(vocab) <= 99, len(vocab)
    for i in range(len(vocab), 99):  # pad the vocab to exactly 99 with filler words
        vocab[f"w{i}"] = i
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    if add_bos:
        backend.post_processor = TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
    )
    if chat:
        tok.chat_template = CHAT_TEMPLATE_WITH_BOS if template_bos else CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def tiny_llama(seed: int = 0, num_layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=99,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """Save a tiny Llama + tokenizer as a HF folder (for `model=hf model.path=...` and subprocess tests)."""
    folder = Path(folder)
    tiny_llama(seed).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------
# One tiny model per supported family (random weights, hidden 32, 2 layers, vocab 99, eager attention)
# ----------------------------------------------------------------------------------------------

_COMMON = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# Small enough that the word-level prompts (10-20 tokens) reach past it: the window must really apply.
SLIDING_WINDOW = 6

FAMILY_CONFIGS: dict[str, tuple[str, str, dict]] = {
    # family: (config class, model class, config kwargs beyond _COMMON)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": SLIDING_WINDOW}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            "head_dim": 8,
            "sliding_window": SLIDING_WINDOW,
            "query_pre_attn_scalar": 8,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
        },
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "head_dim": 8,
            "sliding_window": SLIDING_WINDOW,
            "query_pre_attn_scalar": 8,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),
}


def tiny_family_model(family: str, seed: int = 0):
    """A tiny random causal LM of `family` (see FAMILY_CONFIGS), eager attention, in eval mode."""
    import transformers

    config_name, model_name, extra = FAMILY_CONFIGS[family]
    if family == "gpt2":
        kwargs = dict(
            vocab_size=99,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=256,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    else:
        kwargs = {**_COMMON, **extra}
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)._from_config(config, attn_implementation="eager")
    return model.eval()
