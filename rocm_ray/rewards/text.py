"""Prompt clean-up exactly as each official reward model's tokenizer did it in training.

* HPSv2 / HPSv2.1 (open_clip ``SimpleTokenizer``, ``clean='lower'``): ``ftfy.fix_text``, HTML unescaping
  (twice), whitespace collapsed, lower case, then BPE. transformers' ``CLIPTokenizer`` only applies NFC,
  whitespace and lower case, so ``rock &amp; roll``, curly quotes ``“open”`` or the ligature ``ﬁ``
  tokenize differently from the official scorer unless :func:`open_clip_clean` runs first.
* PickScore and CLIP score: the official code calls transformers' ``CLIPProcessor`` / ``CLIPTokenizer``
  (fast), which do no ftfy or HTML clean-up: nothing is added for them.
* ImageReward: BLIP's ``BertTokenizer('bert-base-uncased')`` (its own normalizer): nothing is added.
"""

from __future__ import annotations

import html
from collections.abc import Sequence


def open_clip_clean(text: str) -> str:
    """open_clip's ``_clean_lower``: ``whitespace_clean(basic_clean(text)).lower()``.

    ``basic_clean`` = ``ftfy.fix_text`` + ``html.unescape(html.unescape(.))`` + strip; ``whitespace_clean``
    = runs of whitespace -> one space + strip.
    """
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


def open_clip_clean_all(prompts: Sequence[str]) -> list[str]:
    """:func:`open_clip_clean` of every prompt."""
    return [open_clip_clean(p) for p in prompts]
