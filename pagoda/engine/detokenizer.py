"""Incremental detokenization and stop strings.

Each new token's text is the difference between decoding a short window of recent tokens with and
without it. A window starts a few tokens back so that tokenizers which drop a leading space at the
start of a decode still give the right spacing; a character whose UTF-8 bytes are split across tokens
decodes to U+FFFD until its last byte arrives, and is held back until then, so it comes out whole.
"""
from __future__ import annotations

try:
    from tokenizers.decoders import DecodeStream as _DecodeStream
except ImportError:          # tokenizers < 0.21: the Python window below
    _DecodeStream = None

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
        # A fast (Rust) tokenizer decodes a stream itself (`tokenizers.decoders.DecodeStream`, as vLLM does):
        # one call of ~2 µs a token instead of two Python-level decodes of ~8 µs each. The stream is primed with
        # the prompt's last tokens, for the first token's leading space.
        self._stream = self._backend = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and _DecodeStream is not None:
            self._backend, self._stream = backend, _DecodeStream(skip_special_tokens=skip_special_tokens)
            for t in self._ids:
                self._stream.step(backend, t)
            self._ids, self._read = [], 0  # here: the tokens whose text the stream still holds back

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ("" while a character is incomplete)."""
        if self._stream is not None:
            try:
                delta = self._stream.step(self._backend, token_id)
            except Exception:        # an id the tokenizer does not know: no text, as the decode path gives
                delta = None
            if not delta:
                self._ids.append(token_id)
                return ""
            self._ids.clear()
            self.output_text += delta
            return delta
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
        if self._stream is not None:
            delta = self._decode(self._ids) if self._ids else ""
            self._ids.clear()
            self.output_text += delta
            return delta
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
