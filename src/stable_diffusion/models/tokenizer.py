"""CLIP's byte-level BPE tokenizer (Radford et al. 2021), run by the Hugging Face ``tokenizers`` library.

The vocabulary is built from OpenAI's merge list ``bpe_simple_vocab_16e6.txt.gz`` (shipped in
``stable_diffusion/assets``, MIT licence, see ``assets/CLIP_LICENSE``) or read from a diffusers
``tokenizer/`` folder (vocab.json + merges.txt)."""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenisation: contractions, runs of letters, single digits, runs of other non-space symbols
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_NUM_MERGES = 49152 - 256 - 2


@lru_cache(maxsize=1)
def byte_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE (GPT-2, CLIP) uses for the byte values, in vocab order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable]  # vocabulary order: printable bytes first, then the rest
    extra = 0
    for b in range(256):
        if b not in printable:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _builtin_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    data = resources.files("stable_diffusion.assets").joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")[1 : _NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    alphabet = byte_alphabet()
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges  # type: ignore[return-value]


def _folder_vocab(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json + merges.txt (classic layout) or tokenizer.json (what transformers 5 writes)."""
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        return vocab, merges  # type: ignore[return-value]
    if (folder / "tokenizer.json").exists():
        model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
        merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return model["vocab"], merges  # type: ignore[return-value]
    raise FileNotFoundError(f"{folder}: no tokenizer files (vocab.json + merges.txt, or tokenizer.json)")


class CLIPTokenizer:
    """``tokenizer(["a photo of a cat"])`` -> (B, 77) ids; ``tokenizer.encode(text)`` -> unpadded ids.

    Padded ids are ``[BOS] + ids[:75] + [EOS] + [pad] * ...``; ``pad_token_id`` is EOS (49407) for OpenAI
    CLIP (SD1) and 0 ("!") for OpenCLIP (SD2, SDXL's second encoder)."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int = 77,
                 pad_token_id: int | None = None) -> None:
        self.vocab = vocab
        self.merges = merges
        self.max_length = max_length
        self.bos_token_id = vocab[BOS]
        self.eos_token_id = vocab[EOS]
        self.pad_token_id = self.eos_token_id if pad_token_id is None else pad_token_id
        bpe = BPE(vocab=vocab, merges=merges, unk_token=EOS, end_of_word_suffix="</w>", continuing_subword_prefix="",
                  fuse_unk=False)
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([BOS, EOS])
        self._tok = tok

    @classmethod
    def builtin(cls, pad_token_id: int | None = None) -> CLIPTokenizer:
        """The standard CLIP vocabulary shipped with the package."""
        vocab, merges = _cached_builtin()
        return cls(vocab, merges, pad_token_id=pad_token_id)

    @classmethod
    def from_folder(cls, folder: str | Path, pad_token_id: int | None = None) -> CLIPTokenizer:
        """A diffusers/transformers ``tokenizer/`` folder (vocab.json, merges.txt, special_tokens_map.json)."""
        folder = Path(folder)
        vocab, merges = _folder_vocab(folder)
        if pad_token_id is None:
            pad_token_id = _pad_from_folder(folder, vocab)
        return cls(vocab, merges, pad_token_id=pad_token_id)

    def save(self, folder: str | Path) -> None:
        """Write vocab.json, merges.txt and the special-token files a diffusers folder carries."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        merges = "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in self.merges) + "\n"
        (folder / "merges.txt").write_text(merges, encoding="utf-8")
        pad = self.id_to_token(self.pad_token_id)
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad}
        (folder / "special_tokens_map.json").write_text(json.dumps(special), encoding="utf-8")
        config = {**special, "model_max_length": self.max_length, "tokenizer_class": "CLIPTokenizer",
                  "do_lower_case": True}
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")

    def id_to_token(self, index: int) -> str:
        return self._tok.id_to_token(index)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS or padding."""
        return self._tok.encode(text.strip(), add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        words = self._tok.decode([i for i in ids if i not in (self.bos_token_id, self.eos_token_id)])
        return words.replace("</w>", " ").strip()

    def pad(self, ids: list[int]) -> list[int]:
        """``[BOS] + ids (truncated) + [EOS]`` padded to ``max_length``."""
        body = ids[: self.max_length - 2]
        row = [self.bos_token_id, *body, self.eos_token_id]
        return row + [self.pad_token_id] * (self.max_length - len(row))

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        encoded = self._tok.encode_batch([t.strip() for t in texts], add_special_tokens=False)
        return torch.tensor([self.pad(e.ids) for e in encoded], dtype=torch.long)


@lru_cache(maxsize=1)
def _cached_builtin() -> tuple[dict[str, int], list[tuple[str, str]]]:
    return _builtin_vocab()


def _pad_from_folder(folder: Path, vocab: dict[str, int]) -> int | None:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.exists():
            pad = json.loads(path.read_text(encoding="utf-8")).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if isinstance(pad, str) and pad in vocab:
                return vocab[pad]
    return None
