"""Our CLIP tokenizer against transformers' CLIPTokenizer built from the same vocabulary."""

from __future__ import annotations

import random

import pytest

from stable_diffusion.models.tokenizer import CLIPTokenizer

HANDWRITTEN = [
    "a photo of a cat", "A PHOTO OF A CAT", "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\nhere",
    "", " ", "a", "masterpiece, best quality, (detailed:1.2), [blurry], ((sharp))", "don't stop believin' y'all",
    "it's what we'll've done", "numbers 1234567890 and 3.14159, 1e-5, -42", "café naïve résumé Ångström",
    "日本語のプロンプト、猫の写真", "中文提示词：一只猫", "Привет, мир! кошка на крыше", "emoji 🐱🐶🚀✨ and 👩‍👩‍👧",
    "mixed😀text", "punctuation!!! ??? ... ;;; ::: --- ___ +++", "quotes \"double\" 'single' `back`",
    "html &amp; entities &lt;tag&gt;", "<|startoftext|> special <|endoftext|> tokens", "url https://example.com/a?b=c",
    "email someone@example.com", "hashtag #art #digitalart @artist", "a" * 300, "word " * 120,
    "\u00a0non-breaking\u2009thin\u3000ideographic spaces", "combining e\u0301 vs é", "ﬁ ligature and Ⅻ numerals",
    "arabic قطة on a mat", "hebrew חתול", "greek γάτα", "korean 고양이", "thai แมว", "math ∑∫√∞≈≠", "©®™ symbols",
    "a red circle on a white background", "a small blue square at the top left on a black background",
    "a red circle on the left and a blue square on the right", "a green triangle above a yellow star",
    "BREAK keyword BREAK here", "<lora:name:0.8> lora tag", "[from:to:0.5] editing [a|b]", "\\(escaped\\) parens",
]
WORDS = ["cat", "dog", "astronaut", "horse", "castle", "sunset", "cyberpunk", "city", "portrait", "oil", "painting",
         "highly", "detailed", "8k", "unreal", "engine", "trending", "artstation", "by", "greg", "rutkowski", "4K",
         "HDR", "bokeh", "f/1.8", "35mm", "a", "of", "the", "on", "in", "with", "and", "ÉCLAIR", "smörgåsbord"]
SEPARATORS = [" ", ", ", " ,", "; ", " | ", "...", "!", " - ", "\n", "  ", ":1.3) ("]


def corpus() -> list[str]:
    rng = random.Random(0)
    prompts = list(HANDWRITTEN)
    while len(prompts) < 240:
        n = rng.randint(1, 90)
        parts = [rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(n)]
        prompts.append("".join(parts))
    return prompts


@pytest.fixture(scope="module")
def ours():
    return CLIPTokenizer.builtin()


@pytest.fixture(scope="module")
def theirs(ours):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer(vocab=ours.vocab, merges=ours.merges)


def test_reference_ids(ours):
    ids = ours(["a photo of a cat"])
    assert ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert set(ids[0, 7:].tolist()) == {49407}
    assert ours.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]


def test_matches_transformers_on_a_corpus(ours, theirs):
    prompts = corpus()
    assert len(prompts) >= 200
    ids = ours(prompts)
    expected = theirs(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    for i, prompt in enumerate(prompts):
        assert ids[i].tolist() == expected[i], prompt
        assert ours.encode(prompt) == theirs(prompt, add_special_tokens=False).input_ids, prompt


def test_openclip_padding_and_truncation(ours):
    padded = CLIPTokenizer.builtin(pad_token_id=0)(["a cat"])[0].tolist()
    assert padded[:4] == [49406, 320, 2368, 49407] and set(padded[4:]) == {0}
    long = ours(["word " * 200])[0].tolist()
    assert len(long) == 77 and long[0] == 49406 and long[-1] == 49407 and 49407 not in long[1:-1]


def test_decode_round_trip(ours):
    assert ours.decode(ours.encode("A Photo of a CAT, 3 dogs")) == "a photo of a cat , 3 dogs"


def test_folder_round_trip_and_transformers_folder(ours, theirs, tmp_path):
    ours.save(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    for folder in ("ours", "theirs"):
        loaded = CLIPTokenizer.from_folder(tmp_path / folder)
        assert loaded(corpus()[:50]).tolist() == ours(corpus()[:50]).tolist()
    import transformers

    reloaded = transformers.CLIPTokenizer.from_pretrained(tmp_path / "ours")
    assert reloaded("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
