"""AUTOMATIC1111's prompt syntax: attention weights, BREAK, and prompts longer than 75 tokens.

``(text)`` multiplies the weight of its text by 1.1, ``[text]`` divides it by 1.1, ``(text:1.5)`` sets the
factor to 1.5; nesting multiplies; ``\\(`` ``\\)`` ``\\[`` ``\\]`` are literal brackets; unclosed brackets
apply to the end of the prompt. Tokens go into chunks of 75 (each encoded as BOS + 75 + EOS and concatenated
along the sequence), a chunk that would overflow is cut after its last comma when that comma is within the
last 20 tokens, and BREAK starts a new chunk. Weights scale the encoder's output, then the mean is restored."""

from __future__ import annotations

import re

import torch

CHUNK = 75
COMMA_BACKTRACK = 20
_TOKEN = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\bBREAK\b")
MAX_OPEN = 64  # brackets open at once beyond this are literal text, so a parse stays linear in the prompt


def _split_break(text: str) -> list[str]:
    """A1111's split on BREAK with the whitespace around it (its regex backtracks quadratically on long runs of
    whitespace): split on the word, then strip the whitespace beside each BREAK."""
    parts = _BREAK.split(text)
    for i in range(1, len(parts)):
        parts[i - 1], parts[i] = parts[i - 1].rstrip(), parts[i].lstrip()
    return parts


def parse_prompt_attention(text: str) -> list[list]:
    """``"a (red:1.2) [cat]"`` -> ``[["a ", 1.0], ["red", 1.2], [" ", 1.0], ["cat", 1/1.1]]``; BREAK -> ``["BREAK", -1]``.

    Time is linear in the prompt: a piece is scaled only by the brackets open when it was added (at most
    ``MAX_OPEN`` of each kind)."""
    pieces: list[list] = []
    open_round: list[int] = []  # index into pieces where each unclosed bracket started
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _TOKEN.finditer(text):
        token, explicit = match.group(0), match.group(1)
        if token.startswith("\\") and len(token) == 2:
            pieces.append([token[1], 1.0])
        elif token == "(" and len(open_round) < MAX_OPEN:
            open_round.append(len(pieces))
        elif token == "[" and len(open_square) < MAX_OPEN:
            open_square.append(len(pieces))
        elif explicit is not None and open_round:
            scale(open_round.pop(), float(explicit))
        elif token == ")" and open_round:
            scale(open_round.pop(), 1.1)
        elif token == "]" and open_square:
            scale(open_square.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_split_break(token)):
                if i:
                    pieces.append(["BREAK", -1])
                pieces.append([part, 1.0])
    for start in open_round:
        scale(start, 1.1)
    for start in open_square:
        scale(start, 1 / 1.1)
    merged: list[list] = []  # neighbours of equal weight joined (a list of texts each, joined once)
    for text_part, weight in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == weight:
            merged[-1][0].append(text_part)
        else:
            merged.append([[text_part], weight])
    return [["".join(parts), weight] for parts, weight in merged]


def _with_embeddings(tokenizer, ids: list[int], library) -> list:
    """Replace each embedding name's token sequence with ``(name, k)`` placeholders, one per vector."""
    if library is None or not library.names:
        return ids
    names = sorted(((tokenizer.encode(n), n) for n in library.names), key=lambda x: -len(x[0]))
    out: list = []
    i = 0
    while i < len(ids):
        for seq, name in names:
            if seq and ids[i:i + len(seq)] == seq and library.usable(name):
                out.extend((name, k) for k in range(library.count(name)))
                i += len(seq)
                break
        else:
            out.append(ids[i])
            i += 1
    return out


def chunk_tokens(tokenizer, text: str, library=None) -> list[tuple[list, list[float]]]:
    """The prompt as chunks of exactly 75 (token, weight) pairs, padded with the end token as A1111 does (see
    ``chunk_ids`` for the model's own padding); tokens of textual-inversion embeddings in ``library`` appear as
    ``(name, index)`` placeholders."""
    comma = tokenizer.encode(",")[0]
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        pad = CHUNK - len(ids)
        chunks.append((ids + [tokenizer.eos_token_id] * pad, weights + [1.0] * pad))
        ids, weights, last_comma = [], [], -1

    for fragment, weight in parse_prompt_attention(text):
        if weight == -1:  # BREAK
            close()
            continue
        for token in _with_embeddings(tokenizer, tokenizer.encode(fragment), library):
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK and last_comma != -1 and CHUNK - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                rest_ids, rest_weights = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = rest_ids, rest_weights
            if len(ids) == CHUNK:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    return chunks


def _token_embeds(encoder, rows: list[list], ids: torch.Tensor, library) -> torch.Tensor | None:
    """Token embeddings with embedding vectors at their placeholders (None when there are none)."""
    spots = [(b, t, tok) for b, row in enumerate(rows) for t, tok in enumerate(row) if isinstance(tok, tuple)]
    if not spots:
        return None
    table = encoder.text_model.embeddings.token_embedding
    embeds = table(ids).clone()
    for b, t, (name, k) in spots:
        embeds[b, t + 1] = library.vectors(name, table.embedding_dim)[k].to(embeds)  # +1: after BOS
    return embeds


def chunk_ids(tokenizer, rows: list[list]) -> list[list[int]]:
    """77-token ids of 75-token chunks, as A1111 and diffusers give them to the encoder: ``[BOS] + tokens + [EOS]``
    then the model's pad id (EOS for OpenAI CLIP, 0 for OpenCLIP, whose pooled output is read at the first EOS);
    embedding placeholders are 0 until their vectors replace them."""
    out = []
    for row in rows:
        ids = [tokenizer.bos_token_id, *(tok if isinstance(tok, int) else 0 for tok in row), tokenizer.eos_token_id]
        end = ids.index(tokenizer.eos_token_id, 1)
        out.append(ids[:end + 1] + [tokenizer.pad_token_id] * (len(ids) - end - 1))
    return out


def encode_weighted(tokenizer, encoder, texts: list[str], device: torch.device, clip_skip: int = 1,
                    min_chunks: int = 1, library=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(context (B, 77 * chunks, C), pooled of the first chunk) with A1111's emphasis applied."""
    per_text = [chunk_tokens(tokenizer, t, library) for t in texts]
    n = max(min_chunks, *(len(c) for c in per_text))
    empty = ([tokenizer.eos_token_id] * CHUNK, [1.0] * CHUNK)
    contexts, pooled = [], None
    for k in range(n):
        rows = [c[k] if k < len(c) else empty for c in per_text]
        ids = torch.tensor(chunk_ids(tokenizer, [r[0] for r in rows]), device=device)
        w = torch.tensor([[1.0, *r[1], 1.0] for r in rows], device=device)
        z, p = encoder(ids, clip_skip=clip_skip, token_embeds=_token_embeds(encoder, [r[0] for r in rows], ids, library))
        if bool((w != 1.0).any()):
            mean = z.float().mean(dim=(1, 2), keepdim=True)
            z = z * w[..., None].to(z.dtype)
            z = z * (mean / z.float().mean(dim=(1, 2), keepdim=True)).to(z.dtype)
        contexts.append(z)
        pooled = p if pooled is None else pooled
    return torch.cat(contexts, dim=1), pooled


def count_chunks(tokenizer, text: str, library=None) -> int:
    return len(chunk_tokens(tokenizer, text, library))
