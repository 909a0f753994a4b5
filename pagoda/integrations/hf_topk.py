"""HF's warper chain led by top-k (``Temperature -> TopK -> TopP -> MinP``) from one ``torch.topk``: exact, no sort
of the vocabulary, no host synchronisation; on CUDA at small batch replayed from a CUDA graph.

HF's ``TopPLogitsWarper`` sorts the whole row ``[b, vocab]`` although, after top-k, at most the k largest logits
and the tokens tied with the k-th can be kept. Here the kept set comes from the k values ``torch.topk`` returns
(what HF's own ``TopKLogitsWarper`` computes) and three full-row passes:

- HF's order: values descending, a tie group highest index first (HF's stable ascending sort puts it last).
  Top-k keeps every token ``>= v_k`` (the k-th largest); ``torch.topk`` returns k of them, and the
  ``extra = count(x >= v_k) - k`` tokens tied with ``v_k`` it left out follow at the end of the order.
- The weights ``w = exp(v - v_1)`` (float64) and their cumulative sum ``C`` over the k values give top-p's
  kept length ``n`` in that order: HF keeps a token while the mass before it is ``< top_p * Z``
  (``Z = C_k + extra * w_k``), so ``n`` is one past the first position where ``C >= top_p * Z``; where ``C``
  never gets there the boundary lies among the left-out ties and ``ceil((top_p * Z - C_k) / w_k)`` more are
  kept. min-p keeps the tokens with ``w >= min_p`` (a prefix of the same order): the kept length is the
  smaller of the two.
- The kept set is then every token above ``c``, the value at position ``n``, and of the tokens equal to
  ``c`` (one full-row comparison and cumulative count) the ones of highest index, as many as the order
  reaches: HF's tie rule at the top-p boundary, exactly.

The result is HF's processed scores (``scores / temperature`` with the removed tokens at -inf), so HF's own
softmax and ``torch.multinomial`` draw the same token HF's warpers would, seed for seed. HF decides its top-p
boundary with a float32 cumulative sum of the whole row; here it is float64 over the kept candidates, so where
HF's sum lands within rounding of ``top_p`` the two may keep one boundary token apart (a rounding-size mass).

CUDA launches: ~30 small ones plus ``torch.topk``. A batch-1 step is host-bound on them, so while
``batch * vocab <= GRAPH_MAX_ELEMENTS`` the first call of a shape captures them in a CUDA graph, and a repeat
call is three launches (copy in, replay, copy out). Under an outer capture or ``torch.compile`` the ops run as
they are (each is capturable).
"""
import torch

__all__ = ["topk_warp", "GRAPH_MAX_ELEMENTS", "clear_graphs"]

# Replay from a CUDA graph up to this many logits (16 rows of a 151,936 vocabulary, 64 of a 32,000 one): the
# graph's memory pool holds about six [batch, vocab] intermediates; larger batches are bound by the GPU, not by
# the launches a graph saves. 0 turns the graphs off.
GRAPH_MAX_ELEMENTS = 1 << 22
_GRAPHS_KEPT = 4                       # shapes / settings kept captured (generate keeps one per call)
_graphs: dict = {}                     # key -> (graph, static input, static output), or None: not capturable


def clear_graphs() -> None:
    """Drop every captured graph (and its memory pool)."""
    _graphs.clear()


def _last_kept(v: torch.Tensor, extra: torch.Tensor, top_p: float | None,
               min_p: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Position, in HF's order, of the last token HF's chain keeps (``[b, 1]``, integer-valued, int64 or float64),
    and the same clamped to the k values (int64 ``[b, 1]``, an index into ``v``). v: the top-k values ``[b, k]``
    descending; extra: int64 ``[b, 1]``, the ties with ``v[:, -1]`` that ``torch.topk`` left out."""
    k = v.shape[-1]
    v64 = v.double()
    w = (v64 - v64[:, :1]).exp()                               # p / max(p): the maximum has weight 1
    w_k = w[:, -1:]
    last = None
    if top_p is not None:
        c = w.cumsum(-1)
        c_k = c[:, -1:]
        p = torch.addcmul(c_k * top_p, extra, w_k, value=top_p)     # top_p of the top-k set's mass Z
        # First position where C >= p: the mass before it is < p (kept), the mass before the next is not.
        pos = torch.searchsorted(c, p).clamp(max=k - 1)
        # If C never reaches p the boundary is among the left-out ties (weight w_k each); else p <= C_k adds
        # none. w_k = 0 only where C_k = Z > p, so never 0 / 0.
        last = pos + ((p - c_k) / w_k).ceil().clamp(min=0)
    if min_p is not None:
        # HF removes p < min_p * max(p): here w < min_p; a prefix of HF's order (whole tie groups).
        last_min = (w >= min_p).sum(-1, keepdim=True) + extra * (w_k >= min_p) - 1
        last = last_min if last is None else torch.minimum(last, last_min)
        pos = last.clamp(max=k - 1).long()
    return last, pos


def _warp(scores: torch.Tensor, temperature: float | None, top_k: int, top_p: float | None,
          min_p: float | None) -> torch.Tensor:
    """HF's chain on ``scores`` (float ``[b, vocab]``), eager torch ops; returns a new ``[b, vocab]`` tensor."""
    x = scores / temperature if temperature is not None else scores       # HF's own division, bit for bit
    k = min(top_k, x.shape[-1])
    v = torch.topk(x, k, dim=-1).values                        # [b, k] descending: HF's TopKLogitsWarper call
    v_k = v[:, -1:]
    if top_p is None and min_p is None:
        return x.masked_fill(x < v_k, float("-inf"))           # HF's TopKLogitsWarper exactly
    extra = (x >= v_k).sum(-1, keepdim=True) - k               # ties with the k-th that topk left out
    last, pos = _last_kept(v, extra, top_p, min_p)
    c = v.gather(-1, pos)                                      # value of the last kept token
    tied = x == c
    rank = tied.cumsum(-1, dtype=torch.int32)                  # 1-based rank by index within c's tie group
    # Tokens >= c in HF's order: those above c (all kept), then c's tie group from its highest index down; the
    # ones past position `last` are the group's lowest indices, ranks below `first_kept`.
    first_kept = (v > c).sum(-1, keepdim=True) + rank[:, -1:] - last
    return x.masked_fill(torch.where(rank >= first_kept, x < c, x <= c), float("-inf"))


def _graphable(scores: torch.Tensor) -> bool:
    return (scores.is_cuda and 0 < scores.numel() <= GRAPH_MAX_ELEMENTS and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing())


def _replay(scores: torch.Tensor, args: tuple) -> torch.Tensor | None:
    """``_warp(scores, *args)`` replayed from a CUDA graph captured at the first call of this shape and these
    settings; None where capture failed once (the caller runs the ops)."""
    key = (scores.device, scores.shape, scores.dtype, scores.stride(), *args)
    if key in _graphs:
        entry = _graphs.pop(key)                               # re-inserted last: least recently used goes first
    else:
        entry = None
        try:
            static_in = scores.clone()
            side = torch.cuda.Stream(scores.device)
            side.wait_stream(torch.cuda.current_stream(scores.device))
            with torch.cuda.stream(side):                      # warm-up off the capture, as CUDA graphs require
                _warp(static_in, *args)
            torch.cuda.current_stream(scores.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = _warp(static_in, *args)
            entry = (graph, static_in, static_out)
        except RuntimeError:
            entry = None
        while len(_graphs) >= _GRAPHS_KEPT:
            _graphs.pop(next(iter(_graphs)))
    _graphs[key] = entry
    if entry is None:
        return None
    graph, static_in, static_out = entry
    static_in.copy_(scores)
    graph.replay()
    return static_out.clone()                                  # the next replay overwrites static_out


def topk_warp(scores: torch.Tensor, temperature: float | None, top_k: int, top_p: float | None = None,
              min_p: float | None = None) -> torch.Tensor:
    """HF's ``Temperature -> TopK -> TopP -> MinP`` chain (``min_tokens_to_keep=1``, -inf filter) for
    ``top_k >= 1``. scores: float ``[b, vocab]``; temperature None or > 0, top_p None or in (0, 1), min_p None
    or in [0, 1] (checked by the caller). Returns a new ``[b, vocab]`` tensor: ``scores / temperature`` with every
    token HF's chain removes at -inf."""
    args = (temperature, top_k, top_p, min_p)
    if GRAPH_MAX_ELEMENTS and _graphable(scores):
        out = _replay(scores, args)
        if out is not None:
            return out
    return _warp(scores, *args)
