"""A1111 prompt editing: [from:to:when], [to:when], [from::when], [a|b], and their use during sampling."""

from __future__ import annotations

import numpy as np
import torch

from stable_diffusion import load_pipeline
from stable_diffusion.prompt_editing import prompt_schedule


def test_documented_schedule():
    text = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
            "[ in background:0.25] [shoddy:masterful:0.5]")
    assert prompt_schedule(text, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


def test_alternation_steps_nesting_and_literals():
    assert prompt_schedule("a [cat|dog] b", 3) == [(1, "a cat b"), (2, "a dog b"), (3, "a cat b")]
    assert prompt_schedule("[[a:b:2]:c:4]", 6) == [(2, "a"), (4, "b"), (6, "c")]
    assert prompt_schedule("(word:1.2) [emph] \\[x\\] [a:b]", 5) == [(5, "(word:1.2) [emph] \\[x\\] [a:b]")]
    assert prompt_schedule("", 3) == [(3, "")]


@torch.no_grad()
def test_editing_changes_the_prompt_mid_sampling():
    pipe = load_pipeline("tiny-sd1")
    contexts = []
    original = pipe.unet.forward

    def spy(x, t, context=None, y=None):
        contexts.append(context[-1].clone())  # the batch is [uncond, cond]
        return original(x, t, context, y)

    pipe.unet.forward = spy
    try:
        edited = pipe.txt2img("a [cat:dog:2]", steps=4, seed=0, sampler="Euler")[0]
    finally:
        del pipe.unet.forward
    assert torch.equal(contexts[0], contexts[1]) and not torch.equal(contexts[1], contexts[2])
    assert torch.equal(contexts[2], contexts[3])
    cat_only = pipe.txt2img("a cat", steps=4, seed=0, sampler="Euler")[0]
    assert not np.array_equal(np.asarray(edited), np.asarray(cat_only))
    heun = pipe.txt2img("a [cat|dog]", steps=3, seed=0, sampler="Heun")[0]  # second-order midpoints too
    assert not np.array_equal(np.asarray(heun), np.asarray(pipe.txt2img("a cat", steps=3, seed=0, sampler="Heun")[0]))
