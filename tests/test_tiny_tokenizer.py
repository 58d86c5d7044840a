"""The small committed test tokenizer (tests/assets/tiny_tokenizer) keeps the contract `tiny_model` relies on."""

from transformers import AutoTokenizer

from compressor.core.data import render_instruction
from tests.conftest import TINY_TOKENIZER, TINY_VOCAB, tiny_llama_config


def test_tiny_tokenizer_matches_the_tiny_model_and_renders_chat():
    tok = AutoTokenizer.from_pretrained(TINY_TOKENIZER)
    cfg = tiny_llama_config(TINY_VOCAB)
    assert len(tok) == cfg.vocab_size == TINY_VOCAB
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        cfg.bos_token_id,
        cfg.eos_token_id,
        cfg.pad_token_id,
    )
    text = "Catherine Morland — 17 years old, café & “novels”\n\tend."
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text and max(ids) < TINY_VOCAB  # byte-level: any text round-trips
    assert tok("the").input_ids == tok("the", add_special_tokens=False).input_ids  # nothing added, like SmolLM2
    prompt, response = render_instruction(tok, {"instruction": "Name a novel.", "output": "Emma"}, "chat")
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nName a novel.<|im_end|>" in prompt
    assert response == "Emma<|im_end|>" and tok(response, add_special_tokens=False).input_ids[-1] == cfg.eos_token_id
