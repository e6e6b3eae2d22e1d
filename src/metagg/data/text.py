"""Character-level text as a dataset: next-character prediction for a causal language model.

    ds = load_dataset("text")                               # the built-in corpus, 32 characters
    ds = load_dataset("text", path="my.txt", seq_len=64)    # any UTF-8 text file
    ds.x_train[0], ds.y_train[0]      # int64 [32] each; y is x shifted by one character

(`load_dataset` builds the `Dataset` from `text_splits` here.)

The built-in corpus ships with the package (`corpus.txt.gz`, 39 KB): the licence texts
GPL-2, GPL-3, LGPL-2.1, Apache-2.0, MPL-2.0 and GFDL-1.3 concatenated verbatim, as Debian
ships them in /usr/share/common-licenses; about 130 000 characters of English prose that
anyone may copy verbatim. It is checked against a SHA-256, so a run means the same data on
every machine. The vocabulary is the sorted set of the
corpus's characters; the first 90 % of the text is the training split, the rest the test
split, each cut into non-overlapping windows of `seq_len` characters (inputs) and the same
windows shifted by one (targets). Losses on it are in nats per character.
"""

from __future__ import annotations

import gzip
import hashlib
import math
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = ["CORPUS_FILE", "CORPUS_SHA256", "TextSplits", "text_splits", "unigram_entropy"]

CORPUS_FILE = Path(__file__).with_name("corpus.txt.gz")
CORPUS_SHA256 = "7e0445e4e8133dda5cff8d276a804430684398c96dda903358d60db60686b026"  # unzipped
TRAIN_FRACTION = 0.9


def _corpus(path: Path = CORPUS_FILE) -> str:
    try:
        raw = gzip.decompress(path.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"the built-in text corpus {path} is missing: reinstall metagg, "
                                "or give your own text with data.path=FILE.txt") from None
    except (OSError, EOFError) as exc:
        raise ValueError(f"the built-in text corpus {path} is corrupt ({exc}): reinstall "
                         "metagg") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != CORPUS_SHA256:
        raise ValueError(f"the built-in text corpus {path} is corrupt (sha256 {digest[:12]}…, "
                         f"expected {CORPUS_SHA256[:12]}…): reinstall metagg")
    return raw.decode("utf-8")


class TextSplits(NamedTuple):
    name: str
    vocab: list[str]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def text_splits(path: str | Path | None = None, *, seq_len: int = 32) -> TextSplits:
    """The corpus (or the UTF-8 text file `path`) as next-character windows (see the
    module docstring). Raises FileNotFoundError / ValueError with the reason."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}")
    if path is None:
        text, name = _corpus(), "text"
    else:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"text file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text ({exc})") from None
        name = f"text:{path.name}"
    vocab = sorted(set(text))
    ids = torch.tensor(_encode(text, vocab), dtype=torch.int64)
    cut = int(len(ids) * TRAIN_FRACTION)
    x_train, y_train = _windows(ids[:cut], seq_len)
    x_test, y_test = _windows(ids[cut:], seq_len)
    if len(x_train) == 0 or len(x_test) == 0:
        raise ValueError(f"{name}: {len(text)} characters are too few for training and test "
                         f"windows of seq_len={seq_len}")
    return TextSplits(name if seq_len == 32 else f"{name}@{seq_len}", vocab,
                      x_train, y_train, x_test, y_test)


def _encode(text: str, vocab: list[str]) -> list[int]:
    index = {c: i for i, c in enumerate(vocab)}
    return [index[c] for c in text]


def _windows(ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows: inputs ids[i:i+T], targets ids[i+1:i+T+1]."""
    n = (len(ids) - 1) // seq_len
    x = ids[: n * seq_len].view(n, seq_len)
    y = ids[1 : n * seq_len + 1].view(n, seq_len)
    return x.clone(), y.clone()


def unigram_entropy(tokens: torch.Tensor, vocab: int) -> float:
    """H = −Σ p log p (nats) of the token frequencies: what a model that ignores context
    can reach at best."""
    p = torch.bincount(tokens.flatten(), minlength=vocab).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum()) if len(p) else math.nan
