import pytest
from transformers import AutoTokenizer

from srdata.steps.tokenize import encode_pairs
from tests._encode import encode_pair


def test_gpt2_style_prompt_has_no_bos_and_reference_ends_with_eos(tiny_gpt2):
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    pair = encode_pair(tok, "Say hi.\n", "hello there")
    assert pair.prompt_ids == tok("Say hi.\n", add_special_tokens=False)["input_ids"]
    assert pair.reference_ids == tok("hello there", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert not pair.prompt_truncated and not pair.reference_truncated


def test_llama_style_prompt_keeps_bos_and_reference_has_none(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    pair = encode_pair(tok, "Say hi.\n", "hello")
    assert pair.prompt_ids[0] == tok.bos_token_id
    assert tok.bos_token_id not in pair.reference_ids
    assert pair.reference_ids[-1] == tok.eos_token_id


@pytest.mark.parametrize("side", ["left", "right"])
def test_long_prompt_is_truncated_keeping_bos_and_flagged(tiny_llama, side):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompt = "start " + "words in the middle " * 50 + "### Response:\n"
    plain = tok(prompt, add_special_tokens=False)["input_ids"]
    pair = encode_pair(tok, prompt, "x", max_prompt_tokens=16, truncation_side=side)
    assert pair.prompt_truncated and len(pair.prompt_ids) == 16
    assert pair.prompt_ids[0] == tok.bos_token_id
    assert pair.prompt_ids[1:] == (plain[-15:] if side == "left" else plain[:15])


def test_reference_truncation_is_flagged(tiny_gpt2):
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    pair = encode_pair(tok, "p", "a long reference " * 20, max_reference_tokens=5)
    assert pair.reference_truncated and len(pair.reference_ids) == 5


def test_empty_reference_is_just_eos(tiny_gpt2):
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    assert encode_pair(tok, "p", "").reference_ids == [tok.eos_token_id]


def test_tokenizer_without_eos_gets_a_clear_error(tiny_gpt2):
    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    tok.eos_token = None
    with pytest.raises(ValueError, match="no end-of-sequence token.*--eos-token"):
        encode_pairs(tok, ["p"], ["r"])
