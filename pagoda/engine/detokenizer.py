"""Incremental detokenization and stop strings.

Each new token's text is the difference between decoding a short window of recent tokens with and
without it. A window starts a few tokens back so that tokenizers which drop a leading space at the
start of a decode still give the right spacing; a character whose UTF-8 bytes are split across tokens
decodes to U+FFFD until its last byte arrives, and is held back until then, so it comes out whole.
"""
from __future__ import annotations

# Prompt tokens decoded with the first output token, for its leading space (vLLM uses 5 too).
INITIAL_CONTEXT = 5
REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """The text of one completion, token by token: ``add(token_id)`` returns the new text (possibly "")
    and ``output_text`` holds everything so far."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_token_ids[-INITIAL_CONTEXT:])
        self._prefix = 0                  # window start: text before it is already in output_text
        self._read = len(self._ids)       # tokens before it have been turned into output_text
        self.output_text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ("" while a character is incomplete)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT):
            return ""
        delta = new_text[len(prefix_text):]
        # The window moves on: keep only the tokens the next decode needs.
        del self._ids[:self._read]
        self._prefix, self._read = 0, len(self._ids)
        self.output_text += delta
        return delta

    def flush(self) -> str:
        """At the end: whatever text is still held back (e.g. bytes that never became a character)."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        delta = new_text[len(prefix_text):] if new_text.startswith(prefix_text) else ""
        self._prefix, self._read = len(self._ids), len(self._ids)
        self.output_text += delta
        return delta


def find_stop_string(text: str, num_new_chars: int, stop: list[str],
                     include_stop_str_in_output: bool) -> tuple[str, int] | None:
    """The first stop string that ends inside the last ``num_new_chars`` characters of ``text``.

    Returns ``(stop_str, cut)`` where ``text[:cut]`` is the text to keep (the stop string left out unless
    include_stop_str_in_output), or None. When several stop strings match, the one that starts first
    wins. Only the new characters (and the ``len(stop_str) - 1`` before them) are searched: earlier text
    was searched when it was new.
    """
    if not num_new_chars or not stop:
        return None
    best: tuple[int, str] | None = None
    for s in stop:
        start = max(0, len(text) - num_new_chars - len(s) + 1)
        i = text.find(s, start)
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    if best is None:
        return None
    i, s = best
    return s, i + len(s) if include_stop_str_in_output else i
