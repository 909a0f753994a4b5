"""Device state of the built-in logits processing (penalties, logit bias, allowed tokens, bad words,
min_tokens), one slot per request that uses any of it, applied by one kernel (`pagoda.ops.logits`).

Each group of tensors is allocated the first time a request needs it, for ``capacity`` slots (grown by
doubling when more requests hold slots at once, which only preemption can cause). Host work per step is the
row -> slot list; what a request brings (prompt mask, bias row, bad words, stop ids) is written into its slot
once, when it joins; what sampling changes (output counts, output length, the last tokens for bad words)
is updated on the device from the sampled token tensor (`on_sampled`), never read back.
"""
from __future__ import annotations

import torch

from pagoda.engine.sequence import Sequence
from pagoda.ops.logits import apply_logits_state


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length() if n > 0 else 0


def needs_builtin_state(seq: Sequence) -> bool:
    """Whether ``seq``'s params use any built-in processing (else its rows skip the kernel)."""
    p = seq.params
    return bool(p.has_penalties or p.logit_bias or p.allowed_token_ids is not None or p.bad_words
                or p.min_tokens > 0)


def min_tokens_stop_ids(seq: Sequence) -> list[int]:
    """Tokens forbidden while the output is shorter than min_tokens: stop_token_ids and EOS, as vLLM (its
    ``all_stop_token_ids`` holds the EOS ids whether or not ignore_eos is set)."""
    return sorted(set(seq.params.stop_token_ids) | set(seq.eos_token_ids))


class BuiltinLogitsState:
    def __init__(self, vocab_size: int, device: torch.device, capacity: int):
        self.vocab_size = vocab_size
        self.device = device
        self.capacity = max(capacity, 1)
        self.pin = device.type == "cuda"
        # Per slot, always present (small): output length and min_tokens.
        self.num_output = torch.zeros(self.capacity, dtype=torch.int32, device=device)
        self.min_tokens = torch.zeros(self.capacity, dtype=torch.int32, device=device)
        self.pen: dict[str, torch.Tensor] | None = None
        self.add: dict[str, torch.Tensor] | None = None
        self.stop_ids: torch.Tensor | None = None        # [S, M]
        self.bad_words: torch.Tensor | None = None       # [S, W, L]
        self.last_tokens: torch.Tensor | None = None     # [S, L]
        # How many held slots use each group (a group unused by every slot is not passed to the kernel).
        self.users = {"pen": 0, "add": 0, "stop": 0, "bad": 0}
        self.slot_groups: dict[int, tuple[str, ...]] = {}

    # -- allocation ----------------------------------------------------------------------------------------
    # A request joins while earlier steps still run on the device: what it brings goes up from pinned memory
    # without blocking (a copy from pageable memory would wait for the whole queue).
    def _host(self, values, dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, pin_memory=self.pin).to(self.device, non_blocking=True)

    def _pinned(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory() if self.pin else t

    @staticmethod
    def _fill(t: torch.Tensor, slot: int, value) -> None:
        """``t[slot] = value`` without a host-device copy: ``fill_`` passes a Python number to the kernel as an
        argument, where item assignment copies a CPU scalar tensor over (a synchronizing copy)."""
        t.narrow(0, slot, 1).fill_(value)

    def _alloc_pen(self) -> None:
        S, V, d = self.capacity, self.vocab_size, self.device
        self.pen = dict(output_counts=torch.zeros(S, V, dtype=torch.int32, device=d),
                        prompt_mask=torch.zeros(S, V, dtype=torch.uint8, device=d),
                        presence_penalty=torch.zeros(S, device=d), frequency_penalty=torch.zeros(S, device=d),
                        repetition_penalty=torch.ones(S, device=d))

    def _alloc_add(self) -> None:
        S, V, d = self.capacity, self.vocab_size, self.device
        self.add = dict(logit_add=torch.zeros(S, V, device=d), use_add=torch.zeros(S, dtype=torch.int32, device=d))

    def _widen_stop(self, m: int) -> None:
        m = _pow2(m)
        if self.stop_ids is not None and self.stop_ids.shape[1] >= m:
            return
        new = torch.full((self.capacity, m), -1, dtype=torch.int32, device=self.device)
        if self.stop_ids is not None:
            new[:, :self.stop_ids.shape[1]] = self.stop_ids
        self.stop_ids = new

    def _widen_bad(self, w: int, length: int) -> None:
        w, length = _pow2(w), max(_pow2(length), 2)
        old_w, old_l = (self.bad_words.shape[1], self.bad_words.shape[2]) if self.bad_words is not None else (0, 0)
        if old_w >= w and old_l >= length:
            return
        w, length = max(w, old_w), max(length, old_l)
        words = torch.full((self.capacity, w, length), -1, dtype=torch.int32, device=self.device)
        last = torch.full((self.capacity, length), -1, dtype=torch.int32, device=self.device)
        if self.bad_words is not None:       # right-aligned: old columns go to the right end
            words[:, :old_w, length - old_l:] = self.bad_words
            last[:, length - old_l:] = self.last_tokens
        self.bad_words, self.last_tokens = words, last

    def grow(self, capacity: int) -> None:
        """More slots: every allocated tensor keeps its rows and gains neutral ones."""
        if capacity <= self.capacity:
            return
        extra = capacity - self.capacity

        def pad(t: torch.Tensor, fill) -> torch.Tensor:
            return torch.cat([t, torch.full((extra, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)])

        self.num_output, self.min_tokens = pad(self.num_output, 0), pad(self.min_tokens, 0)
        if self.pen is not None:
            self.pen = {k: pad(t, 1.0 if k == "repetition_penalty" else 0) for k, t in self.pen.items()}
        if self.add is not None:
            self.add = {k: pad(t, 0) for k, t in self.add.items()}
        if self.stop_ids is not None:
            self.stop_ids = pad(self.stop_ids, -1)
        if self.bad_words is not None:
            self.bad_words, self.last_tokens = pad(self.bad_words, -1), pad(self.last_tokens, -1)
        self.capacity = capacity

    # -- requests joining and leaving ----------------------------------------------------------------------
    def add_seq(self, slot: int, seq: Sequence, bad_words_token_ids: list[list[int]]) -> None:
        """Write what ``seq`` brings into ``slot`` (its output so far included, for a request that joins late)."""
        p = seq.params
        out = seq.output_token_ids
        groups = []
        self._fill(self.num_output, slot, len(out))
        self._fill(self.min_tokens, slot, p.min_tokens)
        if p.has_penalties:
            if self.pen is None:
                self._alloc_pen()
            pen = self.pen
            pen["prompt_mask"][slot].zero_()
            pen["prompt_mask"][slot].index_fill_(0, self._host(seq.token_ids[:seq.num_prompt_tokens], torch.int64), 1)
            pen["output_counts"][slot].zero_()
            if out:
                pen["output_counts"][slot].index_add_(0, self._host(out, torch.int64),
                                                      torch.ones(len(out), dtype=torch.int32, device=self.device))
            self._fill(pen["presence_penalty"], slot, p.presence_penalty)
            self._fill(pen["frequency_penalty"], slot, p.frequency_penalty)
            self._fill(pen["repetition_penalty"], slot, p.repetition_penalty)
            groups.append("pen")
        if p.logit_bias or p.allowed_token_ids is not None:
            if self.add is None:
                self._alloc_add()
            # Written on the device from the few ids given (no vocabulary-wide row crosses the bus).
            row = self.add["logit_add"][slot]
            if p.allowed_token_ids is not None:
                row.fill_(float("-inf"))
                row.index_fill_(0, self._host(p.allowed_token_ids, torch.int64), 0.0)
            else:
                row.zero_()
            if p.logit_bias:
                row.index_add_(0, self._host(list(p.logit_bias), torch.int64),
                               self._host(list(p.logit_bias.values()), torch.float32))
            self._fill(self.add["use_add"], slot, 1)
            groups.append("add")
        stops = min_tokens_stop_ids(seq) if p.min_tokens > 0 else []
        if stops:
            self._widen_stop(len(stops))
            self.stop_ids[slot].fill_(-1)
            self.stop_ids[slot, :len(stops)] = self._host(stops, torch.int32)
            groups.append("stop")
        if bad_words_token_ids:
            self._widen_bad(len(bad_words_token_ids) + 1, max(len(w) for w in bad_words_token_ids))
            L = self.bad_words.shape[2]
            words = torch.full((self.bad_words.shape[1], L), -1, dtype=torch.int32)
            for i, w in enumerate(bad_words_token_ids):
                words[i, L - len(w):] = torch.tensor(w, dtype=torch.int32)
            self.bad_words[slot].copy_(self._pinned(words), non_blocking=True)
            hist = torch.full((L,), -1, dtype=torch.int32)
            tail = out[-(L - 1):]
            if tail:
                hist[L - 1 - len(tail):L - 1] = torch.tensor(tail, dtype=torch.int32)
            self.last_tokens[slot].copy_(self._pinned(hist), non_blocking=True)
            groups.append("bad")
        for g in groups:
            self.users[g] += 1
        self.slot_groups[slot] = tuple(groups)

    def drop_group(self, slot: int, group: str) -> None:
        """Stop applying one group of ``slot``'s state ("pen", "add", "stop" or "bad")."""
        groups = self.slot_groups.get(slot, ())
        if group in groups:
            self.slot_groups[slot] = tuple(g for g in groups if g != group)
            self._neutral(slot, group)

    def remove_seq(self, slot: int) -> None:
        """Make ``slot`` neutral again (its rows would be untouched if it were read)."""
        for g in self.slot_groups.pop(slot, ()):
            self._neutral(slot, g)
        self._fill(self.min_tokens, slot, 0)

    def _neutral(self, slot: int, g: str) -> None:
        self.users[g] -= 1
        if g == "pen":
            self._fill(self.pen["presence_penalty"], slot, 0.0)
            self._fill(self.pen["frequency_penalty"], slot, 0.0)
            self._fill(self.pen["repetition_penalty"], slot, 1.0)
        elif g == "add":
            self._fill(self.add["use_add"], slot, 0)
        elif g == "stop":
            self.stop_ids[slot].fill_(-1)
        elif g == "bad":
            self.bad_words[slot].fill_(-1)

    # -- each step -----------------------------------------------------------------------------------------
    def apply(self, logits: torch.Tensor, row_slots: torch.Tensor) -> torch.Tensor:
        """Edit ``logits [B, V]`` (row r: slot ``row_slots[r]``, -1 for a row without state) in one kernel."""
        u = self.users
        if not any(u.values()):
            return logits
        kw: dict = {}
        if u["pen"]:
            kw.update(self.pen)
        if u["add"]:
            kw.update(self.add)
        if u["stop"] or u["bad"]:
            kw.update(num_output=self.num_output, min_tokens=self.min_tokens)
        if u["stop"]:
            kw["stop_ids"] = self.stop_ids
        if u["bad"]:
            kw.update(bad_words=self.bad_words, last_tokens=self.last_tokens)
        return apply_logits_state(logits, row_slots, **kw)

    def on_sampled(self, row_slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Device-side bookkeeping of one sampled token per row; every row has a slot of its own."""
        slots, tok = row_slots.long(), tokens.long()
        one = torch.ones_like(row_slots)
        self.num_output.index_add_(0, slots, one)
        if self.pen is not None and self.users["pen"]:
            self.pen["output_counts"].index_put_((slots, tok), one, accumulate=True)
        if self.bad_words is not None and self.users["bad"]:
            hist = self.last_tokens[slots]
            self.last_tokens[slots] = torch.cat([hist[:, 1:-1], tok.to(torch.int32)[:, None], hist[:, -1:]], dim=1)
