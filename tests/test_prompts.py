"""A1111 prompt syntax: attention parsing, chunking of long prompts, weighted encoding."""

from __future__ import annotations

import pytest
import torch

from stable_diffusion import load_pipeline
from stable_diffusion.models.tokenizer import CLIPTokenizer
from stable_diffusion.prompts import CHUNK, chunk_tokens, encode_weighted, parse_prompt_attention

CASES = {  # AUTOMATIC1111's documented examples of parse_prompt_attention
    "normal text": [["normal text", 1.0]],
    "an (important) word": [["an ", 1.0], ["important", 1.1], [" word", 1.0]],
    "(unbalanced": [["unbalanced", 1.1]],
    "\\(literal\\]": [["(literal]", 1.0]],
    "(unnecessary)(parens)": [["unnecessaryparens", 1.1]],
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).": [
        ["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
        [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]],
    "[faded]": [["faded", 1 / 1.1]],
    "a BREAK b": [["a", 1.0], ["BREAK", -1], ["b", 1.0]],
    "": [["", 1.0]],
}


@pytest.mark.parametrize("text", list(CASES))
def test_parse_prompt_attention(text):
    parsed = parse_prompt_attention(text)
    assert [p[0] for p in parsed] == [p[0] for p in CASES[text]]
    assert [p[1] for p in parsed] == pytest.approx([p[1] for p in CASES[text]], rel=1e-12)


def test_chunks_break_and_comma_backtrack():
    tok = CLIPTokenizer.builtin()
    assert len(chunk_tokens(tok, "a cat")) == 1
    two = chunk_tokens(tok, "a cat BREAK a dog")
    assert len(two) == 2 and two[1][0][:2] == tok.encode("a dog")
    words = "word " * 70 + ", " + "tail " * 10  # comma at index 70: within 20 of the end -> cut after it
    chunks = chunk_tokens(tok, words)
    comma = tok.encode(",")[0]
    assert len(chunks) == 2 and chunks[0][0][70] == comma and chunks[0][0][71] == tok.pad_token_id
    assert chunks[1][0][:10] == tok.encode("tail " * 10)
    assert all(len(ids) == CHUNK and len(w) == CHUNK for ids, w in chunks)
    weighted = chunk_tokens(tok, "(red:1.5) cat")[0]
    assert weighted[1][:2] == [1.5, 1.0]


@torch.no_grad()
def test_weighted_encoding_matches_plain_for_plain_prompts_and_restores_the_mean():
    pipe = load_pipeline("tiny-sd1")
    tok, enc = pipe.tokenizer, pipe.text_encoder
    plain, _ = enc(tok(["a red circle"]))
    ours, _ = encode_weighted(tok, enc, ["a red circle"], pipe.device)
    assert torch.equal(ours, plain)
    emphasised, _ = encode_weighted(tok, enc, ["a (red:1.5) circle"], pipe.device)
    assert not torch.equal(emphasised, plain)
    assert torch.allclose(emphasised.mean(), plain.mean(), atol=1e-5)
    long, _ = encode_weighted(tok, enc, ["word " * 100], pipe.device)
    assert long.shape == (1, 154, 32)
    padded, _ = encode_weighted(tok, enc, ["a"], pipe.device, min_chunks=3)
    assert padded.shape[1] == 231


def test_long_prompt_and_short_negative_share_one_guided_unet_call(sd1):
    """100 words + a weighted word fill two 75-token chunks, BREAK starts a third; the one-chunk negative prompt
    is padded to three chunks so both halves of CFG go through the UNet together: (2, 3 * 77, width)."""
    contexts = []
    hook = sd1.unet.register_forward_pre_hook(lambda module, args: contexts.append(tuple(args[2].shape)))
    try:
        images = sd1.txt2img("word " * 100 + "(cat:1.3) BREAK [dog]", negative_prompt="blurry", steps=2, seed=0)
    finally:
        hook.remove()
    assert contexts == [(2, 3 * 77, sd1.text_encoder.config.width)] * 2 and images[0].size == (64, 64)
