"""Each token id's text, as the model's tokenizer decodes it alone, written once into the prepared model folder.

The stages that only show tokens (embeddings, the exports) read this table instead of loading the tokenizer:
importing transformers to build one costs ~5 s per job, more than the rest of such a job on a small layer. A
folder prepared before the table existed, or an id past its end, falls back to the tokenizer itself.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

TOKEN_TEXTS = "token_texts.json"
log = logging.getLogger(__name__)


def write_token_texts(tokenizer: Any, folder: str | os.PathLike) -> int:
    """Decode every id of the tokenizer (added tokens too) alone, as TokenTexts gives them; the entry count. A
    tokenizer that cannot decode its ids one by one gets no table (0): the stages then load it, as before."""
    try:
        size = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(size)])
    except Exception as exc:  # a tokenizer's own failure: the table is an optimisation, never a requirement
        log.warning("token texts not written (%s: %s): later stages will load the tokenizer", type(exc).__name__, exc)
        return 0
    record = {"texts": texts, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    (Path(folder) / TOKEN_TEXTS).write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    return size


class TokenTexts:
    """id -> the text tokenizer.decode([id]) gives, from the prepared folder's table (the tokenizer only for what
    the table lacks)."""

    def __init__(self, model_dir: str | os.PathLike, trust_remote_code: bool = False):
        self.model_dir, self.trust_remote_code = model_dir, trust_remote_code
        path = Path(model_dir) / TOKEN_TEXTS
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        self.texts: list[str] = record.get("texts", [])
        self.special = {k: record[k] for k in ("pad_token_id", "eos_token_id")} if record else None
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from .models import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_dir, self.trust_remote_code)
        return self._tokenizer

    def __call__(self, token_id: int) -> str:
        if 0 <= token_id < len(self.texts):
            return self.texts[token_id]
        return self.tokenizer.decode([token_id])

    def special_id(self, name: str) -> int | None:
        """The tokenizer's pad_token_id or eos_token_id."""
        if self.special is not None:
            return self.special[name]
        return getattr(self.tokenizer, name)
