"""Exact, order-independent example selection per neuron, streamed so that memory never grows with the corpus.

Every selection keeps, per *slot* (a neuron, or a neuron's activation-quantile bin), the k entries with the
highest *key*, ties broken by global token index. Because the key and the tie-break depend only on the entry,
never on when it was seen, streaming over batches and merging shards in any order give exactly the answer of
a brute force over the whole corpus:

- top_k: key = the activation.
- threshold (the paper's): every entry with activation >= alpha x the neuron's max is eligible; key = a hash
  priority of (token, slot, seed), so the k kept are a uniform sample without replacement (bottom-k sampling, a
  reservoir sample that merges exactly across shards). In one pass (`OnePassAccumulator`, the default), with the
  max found on the way; in two (`ThresholdAccumulator`, the reference), with the max of a first pass.
- quantiles: per neuron, a few entries from each of several activation bins below alpha x max, sampled the
  same way, so polysemanticity below the very top stays visible.

Every selection ranks by a *score* of the activation a, by the selection's sign: a (positive), -a (negative) or
|a| (both), so a gated neuron's strong negative activations can be its examples too. What is stored is always
the activation itself, with its sign.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import PipelineError

NO_TOKEN = torch.iinfo(torch.int64).max  # sentinel token index of an empty slot (ranks after every real one)

# Per-neuron activation histogram: log-spaced bins of both signs from 1e-3 to 1e3, plus under- and overflow.
HIST_EDGES = torch.cat([-torch.logspace(3, -3, 25, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                        torch.logspace(-3, 3, 25, dtype=torch.float64)]).float()
N_HIST = HIST_EDGES.numel() + 1


def _hist_lookup() -> torch.Tensor:
    """torch.bucketize(v, HIST_EDGES) for every float32 v that shares its top 16 bits with others in one bin, by
    those bits; -1 for the few bit patterns whose floats straddle an edge (or are NaN), which are bucketized."""
    top = torch.arange(1 << 16, dtype=torch.int32) << 16
    low = torch.bucketize(top.view(torch.float32), HIST_EDGES)
    high = torch.bucketize((top | 0xFFFF).view(torch.float32), HIST_EDGES)
    return torch.where(low == high, low, -1)


HIST_LOOKUP = {torch.device("cpu"): _hist_lookup()}  # per device, copied there once


def hist_bins(v: torch.Tensor) -> torch.Tensor:
    """torch.bucketize(v, HIST_EDGES) for float32 v, exactly, about 4x faster on the CPU: a table lookup by the
    top 16 bits of each float (bucketize's binary search dominated the statistics' cost)."""
    if v.device not in HIST_LOOKUP:
        HIST_LOOKUP[v.device] = HIST_LOOKUP[torch.device("cpu")].to(v.device)
    lookup = HIST_LOOKUP[v.device]
    bins = lookup.index_select(0, v.contiguous().view(torch.int32).bitwise_right_shift(16).bitwise_and_(0xFFFF)
                               .reshape(-1)).view(v.shape)
    straddle = (bins < 0).nonzero(as_tuple=True)
    if straddle[0].numel():
        bins[straddle] = torch.bucketize(v[straddle], HIST_EDGES.to(v.device))
    return bins


# What each field of an example set holds in an empty entry: it ranks after every real one, and no stage reads it.
EMPTY = {"keys": float("-inf"), "tokens": NO_TOKEN, "values": float("-inf"), "pre": 0.0, "context": float("nan"),
         "xrow": -1}

# The x store grows by segments of at most this many rows and bytes: growing by a segment copies nothing, where a
# contiguous buffer copied every row into fresh memory at each growth (and first-touching fresh memory costs more
# than the copy on some machines: a VM's page faults run at ~0.4 GB/s).
STORE_SEGMENT_ROWS = 1024
STORE_SEGMENT_BYTES = 4 << 20


class RowStore:
    """Rows (the MLP inputs x, one per distinct token) appended a batch at a time into fixed-size segments, and
    compacted in place: the rows still in use moved to the front, in order, segment by segment."""

    def __init__(self, width: int, dtype: torch.dtype):
        self.width, self.dtype = width, dtype
        row_bytes = max(1, width * torch.empty((), dtype=dtype).element_size())
        self.segment_rows = max(1, min(STORE_SEGMENT_ROWS, STORE_SEGMENT_BYTES // row_bytes))
        self.segments: list[torch.Tensor] = []
        self.n = 0

    @classmethod
    def holding(cls, rows: torch.Tensor) -> RowStore:
        store = cls(rows.shape[1], rows.dtype)
        store.reserve(rows.shape[0])
        store.append(rows)
        return store

    @property
    def capacity(self) -> int:
        return len(self.segments) * self.segment_rows

    def reserve(self, rows: int) -> None:
        """Room for `rows` rows in all (new segments are allocated, not touched: pages come as rows are written)."""
        while self.capacity < rows:
            self.segments.append(torch.empty((self.segment_rows, self.width), dtype=self.dtype))

    @torch.inference_mode()  # the segments may be inference tensors (made while caching): written only in this mode
    def append(self, rows: torch.Tensor) -> None:
        at, size = 0, self.segment_rows
        while at < rows.shape[0]:
            segment, offset = divmod(self.n, size)
            take = min(size - offset, rows.shape[0] - at)
            self.segments[segment][offset : offset + take] = rows[at : at + take]
            at += take
            self.n += take

    @torch.inference_mode()
    def compact(self, used: torch.Tensor) -> None:
        """Keep the rows `used` (sorted, distinct), now rows 0..len(used)-1 in the same order. In place: the rows
        that land in segment s come from segments >= s (used[i] >= i), read in increasing order, so a segment is
        never written before the rows it gives up have been read."""
        size = self.segment_rows
        for s, start in enumerate(range(0, used.numel(), size)):
            source = used[start : start + size]
            if int(source[0]) == start and int(source[-1]) == start + source.numel() - 1:
                continue  # these rows are in place already
            where = torch.div(source, size, rounding_mode="floor")
            cuts = torch.searchsorted(where, torch.unique_consecutive(where), right=True).tolist()
            begin = 0
            for cut in cuts:
                j = int(where[begin])
                self.segments[s][begin:cut] = self.segments[j][source[begin:cut] - j * size]
                begin = cut
        self.n = used.numel()

    def rows(self) -> torch.Tensor:
        """The store's rows as one tensor (a copy)."""
        size = self.segment_rows
        parts = [self.segments[s][: min(size, self.n - s * size)] for s in range(-(-self.n // size))]
        return torch.cat(parts) if parts else torch.empty((0, self.width), dtype=self.dtype)

SIGNS = ("positive", "negative", "both")

_PRIME = 2_147_483_647  # 2^31 - 1: products of two residues stay below 2^62, so int64 never overflows


def priority(token: torch.Tensor, slot: torch.Tensor, seed: int) -> torch.Tensor:
    """A deterministic pseudo-random number in [0, 1) per (token, slot): the sampling order of an entry."""
    h = torch.full_like(token, (seed * 48271 + 11) % _PRIME)
    for part in (token % _PRIME, token // _PRIME, slot):
        h = (h * 16807 + part % _PRIME + 1) % _PRIME
        h = h ^ (h >> 13)
        h = (h * 69621) % _PRIME
    for _ in range(2):
        h = h ^ (h >> 11)
        h = (h * 48271 + 12345) % _PRIME
    return h.double() / _PRIME


def canonical_topk(neuron: torch.Tensor, value: torch.Tensor, token: torch.Tensor, n_neurons: int, k: int) -> torch.Tensor:
    """Positions into the flat inputs of each slot's k best entries, as [n_slots, k] in rank order.

    Ranked by value descending, then token ascending. Every slot must have at least k entries (pad with
    -inf / NO_TOKEN).
    """
    order = torch.argsort(token, stable=True)
    order = order[torch.argsort(-value[order], stable=True)]
    order = order[torch.argsort(neuron[order], stable=True)]
    counts = torch.bincount(neuron, minlength=n_neurons)
    if int(counts.min()) < k:
        raise ValueError("canonical_topk needs at least k entries per neuron")
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=order.device) - starts[neuron[order]]
    return order[rank < k].view(n_neurons, k)


@dataclass
class Batch:
    """One forward pass's activations, left on their device (the GPU, when there is one), with the rows (tokens)
    that may be examples picked out. Only the few entries that enter a selection ever move to the CPU."""

    act: torch.Tensor  # [B, T, N], model dtype
    pre: list[torch.Tensor]  # per projection [B, T, N]
    x: torch.Tensor  # [B, T, d]
    valid: torch.Tensor  # [B, T] bool, on act's device
    rows: torch.Tensor  # [R] indices into B*T of valid tokens, on act's device
    act_flat: torch.Tensor  # [R, N] float32, on act's device
    tok_flat: torch.Tensor  # [R] int64, on act's device
    score_flat: torch.Tensor  # [R, N]: what the selection ranks by (act_flat itself for the positive sign)
    masked: bool = False  # some (token, unit) entries may not be examples: their score is -inf (experts)
    high: torch.Tensor | None = None  # [N] the batch's largest and smallest activation, once Stats has them
    low: torch.Tensor | None = None

    def score_bound(self, sign: str) -> torch.Tensor:
        """[N] at least each neuron's largest score in the batch (its largest, for an unmasked batch)."""
        if self.high is None or self.low is None:
            self.high, self.low = torch.amax(self.act_flat, dim=0), torch.amin(self.act_flat, dim=0)
        if sign == "positive":
            return self.high
        return -self.low if sign == "negative" else torch.maximum(self.high, -self.low)

    def at_least(self, threshold: torch.Tensor, sign: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, neurons) of the entries whose score is >= their neuron's threshold, in row-major order.

        Past the first batches few neurons reach their threshold at all: those are found from the batch's max
        (already known), and only their columns are scanned, instead of the whole [R, N] matrix."""
        a = self.score_flat
        reach = (self.score_bound(sign) >= threshold).nonzero(as_tuple=True)[0]
        if 2 * reach.numel() < a.shape[1]:
            row, column = _nonzero_at_least(a.index_select(1, reach), threshold[reach])
            return row, reach[column]
        return _nonzero_at_least(a, threshold)


def _nonzero_at_least(a: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a >= threshold[None, :]).nonzero(as_tuple=True); numpy's on the CPU, 2-3x faster than torch's there."""
    if a.device.type != "cpu":
        return (a >= threshold[None, :]).nonzero(as_tuple=True)
    flat = torch.from_numpy(np.flatnonzero(a.numpy() >= threshold.numpy()[None, :]))
    return flat // a.shape[1], flat % a.shape[1]


def score(act: torch.Tensor, sign: str) -> torch.Tensor:
    if sign == "positive":
        return act
    if sign == "negative":
        return -act
    if sign == "both":
        return act.abs()
    raise PipelineError(f"selection.sign: unknown sign '{sign}' ({', '.join(SIGNS)})")


def make_batch(act, pre, x, valid, token_index, where: str = "", sign: str = "positive",
               unit_valid: torch.Tensor | None = None) -> Batch | None:
    """`unit_valid` [B, T, N], for a mixture of experts: where the token was routed to the unit's expert. Only
    those entries can be examples; the statistics count the others as the 0 the unit contributes there."""
    B, T, N = act.shape
    device = act.device
    valid = valid.to(device)
    rows = valid.reshape(-1).nonzero(as_tuple=True)[0]
    if rows.numel() == 0:
        return None
    act_flat = act.reshape(B * T, N)[rows].float()
    scores = score(act_flat, sign)
    if unit_valid is not None:
        routed = unit_valid.to(device).reshape(B * T, N)[rows]
        scores = torch.where(routed, scores, torch.full_like(scores, float("-inf")))
    return Batch(act, pre, x, valid, rows, act_flat, token_index.to(device).reshape(-1)[rows], scores,
                 unit_valid is not None)


def score_max(stats: dict[str, Any], sign: str) -> torch.Tensor:
    """Each neuron's largest score over the corpus, from merged statistics (the threshold mode's max)."""
    high = torch.as_tensor(stats["stat_max"]).float()
    if sign == "positive":
        return high
    low = torch.as_tensor(stats["stat_min"]).float()
    return -low if sign == "negative" else torch.maximum(high, -low)


class Stats:
    """Per-neuron max, min, sum, count of positive activations and histogram; and the number of tokens seen.

    The histogram counts a deterministic 1-in-`histogram_stride` sample of tokens (by global token index), since
    binning every activation would cost as much as the selection itself; the other statistics are exact.
    """

    def __init__(self, n_neurons: int, histogram_stride: int = 8):
        self.stride = histogram_stride
        self.max = torch.full((n_neurons,), float("-inf"))
        self.min = torch.full((n_neurons,), float("inf"))
        self.sum = torch.zeros(n_neurons, dtype=torch.float64)
        self.positive = torch.zeros(n_neurons, dtype=torch.int64)
        self.hist = torch.zeros((n_neurons, N_HIST), dtype=torch.int64)
        self.n_tokens = 0

    def update(self, batch: Batch, where: str = "") -> None:
        a = batch.act_flat
        n = a.shape[1]
        batch_max = torch.amax(a, dim=0)  # amax: a.max(0) also finds the argmax, ~14x slower on the CPU here
        ones = torch.ones(1, a.shape[0], dtype=a.dtype, device=a.device)
        batch_sum = (ones @ a)[0]  # a GEMV: one cheap pass
        # NaN anywhere makes the sum NaN, +inf the max inf, -inf the sum -inf: no separate pass over a.
        if not (torch.isfinite(batch_sum).all() and torch.isfinite(batch_max).all()):
            raise PipelineError(f"{where}: NaN or inf activations (overflow in the model or its dtype?)")
        batch.high, batch.low = batch_max, torch.amin(a, dim=0)
        self.max = torch.maximum(self.max, batch_max.cpu())
        self.min = torch.minimum(self.min, batch.low.cpu())
        self.sum += batch_sum.double().cpu()
        # Counted as a GEMV over a 0/1 matrix (exact in float32 up to 2^24 tokens a batch): 2.6x faster than
        # count_nonzero(a > 0, dim=0) on the CPU here.
        positive = torch.gt(a, 0, out=torch.empty_like(a))
        self.positive += (ones @ positive)[0].round().long().cpu()
        sampled = a[batch.tok_flat % self.stride == 0] if self.stride > 1 else a
        if sampled.numel():
            bins = hist_bins(sampled)
            flat = (torch.arange(n, device=a.device) * N_HIST)[None, :] + bins
            self.hist += torch.bincount(flat.reshape(-1), minlength=n * N_HIST).view(n, N_HIST).cpu()
        self.n_tokens += a.shape[0]

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "stat_max": self.max, "stat_min": self.min, "stat_sum": self.sum, "stat_positive": self.positive, "stat_hist": self.hist,
            "n_tokens": torch.tensor([self.n_tokens], dtype=torch.int64),
            "hist_stride": torch.tensor([self.stride], dtype=torch.int64),
        }


def merge_stats(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {
        "stat_max": torch.stack([s["stat_max"] for s in states]).max(0).values,
        "stat_min": torch.stack([s["stat_min"] for s in states]).min(0).values,
        "stat_sum": torch.stack([s["stat_sum"] for s in states]).sum(0),
        "stat_positive": torch.stack([s["stat_positive"] for s in states]).sum(0),
        "stat_hist": torch.stack([s["stat_hist"] for s in states]).sum(0),
        "n_tokens": torch.tensor([sum(int(s["n_tokens"][0]) for s in states)], dtype=torch.int64),
        "hist_stride": states[0].get("hist_stride", torch.tensor([1])),
    }


class ExampleSet:
    """k entries per slot, ranked by key, with what the later stages need of each entry.

    Per entry: key, activation, pre-activation per projection, the neuron's activations over a context window
    around the token, and a pointer into a store of MLP inputs x. The store keeps one row per distinct token;
    it has spare room, and is compacted (rows no kept entry points to dropped) only when full, so adding a
    batch's rows costs what those rows cost, and it holds at most about 1.5 x (live rows + one batch's rows).
    """

    def __init__(
        self, n_slots: int, slots_per_neuron: int, d_model: int, n_proj: int, k: int, offsets: torch.Tensor,
        x_dtype: torch.dtype = torch.float32,
    ):
        self.n_slots, self.per_neuron, self.k, self.offsets = n_slots, slots_per_neuron, k, offsets
        self.keys = torch.full((n_slots, k), float("-inf"), dtype=torch.float64)
        self.values = torch.full((n_slots, k), float("-inf"))
        self.tokens = torch.full((n_slots, k), NO_TOKEN, dtype=torch.int64)
        self.pre = torch.zeros((n_slots, k, n_proj))
        self.context = torch.full((n_slots, k, offsets.numel()), float("nan"))
        self.xrow = torch.full((n_slots, k), -1, dtype=torch.int64)
        self.x_store = torch.zeros((0, d_model), dtype=x_dtype)  # held as stored: fp16 halves the RAM too

    @property
    def x_store(self) -> torch.Tensor:
        return self._store.rows()

    @x_store.setter
    def x_store(self, x: torch.Tensor) -> None:
        self._store = RowStore.holding(x)

    def kth_key(self) -> torch.Tensor:
        return self.keys[:, -1]

    @torch.inference_mode()
    def offer(self, batch: Batch, cand_row: torch.Tensor, cand_slot: torch.Tensor, cand_key: torch.Tensor) -> None:
        """Merge candidate entries (rows into batch.act_flat, their slots and keys) into the kept set: each
        touched slot keeps its k best by the canonical ranking.

        Only the slots that have candidates are re-ranked and rewritten: once the sets are full that is a few
        slots per batch, so the cost follows the candidates, not the size of the sets.
        """
        if cand_row.numel() == 0:
            return
        cand_row, cand_slot, cand_key = cand_row.cpu(), cand_slot.cpu(), cand_key.cpu()
        k = self.k
        touched, local = torch.unique(cand_slot, return_inverse=True)
        n_old = touched.numel() * k
        slot = torch.cat([torch.arange(touched.numel()).repeat_interleave(k), local])
        key = torch.cat([self.keys[touched].reshape(-1), cand_key.double()])
        token = torch.cat([self.tokens[touched].reshape(-1), batch.tok_flat[cand_row.to(batch.act.device)].cpu()])
        keep = canonical_topk(slot, key, token, touched.numel(), k)  # [touched, k] positions into key/token
        is_new = keep >= n_old
        if not bool(is_new.any()):
            return
        pick = keep[is_new] - n_old
        new_values, new_pre, new_ctx, new_xrow = self._capture(batch, cand_row[pick], cand_slot[pick])

        old = torch.where(is_new, 0, keep)  # an old entry at local position p sits at (touched[p // k], p % k)
        old_slot, old_col = touched[old // k], old % k
        values = self.values[old_slot, old_col]
        pre = self.pre[old_slot, old_col]
        ctx = self.context[old_slot, old_col]
        xrow = self.xrow[old_slot, old_col]
        values[is_new], pre[is_new], ctx[is_new], xrow[is_new] = new_values, new_pre, new_ctx, new_xrow

        self.keys[touched] = key[keep]
        self.tokens[touched] = token[keep]
        self.values[touched] = values
        self.pre[touched] = pre
        self.context[touched] = ctx
        self.xrow[touched] = xrow

    def _capture(self, batch: Batch, cand_row: torch.Tensor, cand_slot: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the sets keep of new entries (rows into batch.act_flat, their slots): value, pre-activations,
        context and a store row, the batch's x rows appended to the store. Call before reading self.xrow: making
        room may compact the store, which renumbers it."""
        device = batch.act.device
        B, T, N = batch.act.shape
        sel_flat = cand_row.to(device)  # rows into act_flat
        sel_row = batch.rows[sel_flat]  # rows into the [B*T] batch
        sel_neuron = (cand_slot // self.per_neuron).to(device)
        unique_rows, inverse = torch.unique(sel_row, return_inverse=True)
        self._reserve(unique_rows.numel())
        values = batch.act_flat[sel_flat, sel_neuron].cpu()
        # torch.take reads by flat position, strided or not: no copy of a [B, T, N] view (a fused projection's
        # halves are views), and one index instead of three for the context windows.
        at = sel_row * N + sel_neuron
        pre = torch.stack([torch.take(p, at) for p in batch.pre], dim=-1).float().cpu()
        b, p = sel_row // T, sel_row % T
        pos = p[:, None] + self.offsets.to(device)[None, :]
        inside = (pos >= 0) & (pos < T)
        window_row = b[:, None] * T + pos.clamp(0, T - 1)
        around = torch.take(batch.act, window_row * N + sel_neuron[:, None]).float()
        ok = inside & torch.take(batch.valid, window_row)
        ctx = torch.where(ok, around, torch.full_like(around, float("nan"))).cpu()
        xrow = self._store.n + inverse.cpu()
        self._store.append(batch.x.reshape(B * T, -1)[unique_rows].to(self._store.dtype).cpu())
        return values, pre, ctx, xrow

    def _live_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The store rows kept entries point to, and xrow renumbered to index them."""
        live = self.xrow >= 0
        # torch.unique would sort every pointer; marking the rows in use costs one pass over them instead.
        hit = torch.zeros(self._store.n, dtype=torch.bool)
        hit[self.xrow[live]] = True
        renumber = torch.cumsum(hit, 0) - 1
        xrow = torch.where(live, renumber[self.xrow.clamp(min=0)] if self._store.n else self.xrow, -1)
        return hit.nonzero(as_tuple=True)[0], xrow

    def _reserve(self, rows: int) -> None:
        """Room for `rows` more store rows: when the store is full, compact it in place and add segments."""
        if self._store.n + rows <= self._store.capacity:
            return
        used, self.xrow = self._live_rows()
        self._store.compact(used)
        # Half again what is needed: compaction then comes every ~(live rows / 2) new rows.
        self._store.reserve(3 * (used.numel() + rows) // 2)

    def compact(self) -> None:
        """Drop store rows no kept entry points to (x_store then holds only the live rows)."""
        used, self.xrow = self._live_rows()
        self._store.compact(used)

    def state(self, prefix: str = "") -> dict[str, torch.Tensor]:
        self.compact()
        return {
            f"{prefix}keys": self.keys, f"{prefix}values": self.values, f"{prefix}tokens": self.tokens,
            f"{prefix}pre": self.pre, f"{prefix}context": self.context, f"{prefix}xrow": self.xrow,
            f"{prefix}x": self.x_store,
        }


def merge_sets(states: list[dict[str, torch.Tensor]], k: int, prefix: str = "", pad: bool = False) -> dict[str, torch.Tensor]:
    """Merge one example set across shards: the same canonical ranking, x stores joined and compacted. With `pad`,
    sets narrower than k together are padded with empty entries (else that is an error: caches too shallow)."""
    get = lambda s, name: s[f"{prefix}{name}"]  # noqa: E731
    width = sum(get(s, "keys").shape[1] for s in states)
    if width < k:
        if not pad:
            raise PipelineError(f"selection asks {k} examples per neuron, but the caches hold only {width}")
        states = [*states, empty_set(get(states[0], "keys").shape[0], k - width, get(states[0], "pre").shape[2],
                                     get(states[0], "context").shape[2], get(states[0], "x"), prefix)]
    keys = torch.cat([get(s, "keys") for s in states], dim=1)
    n_slots, width = keys.shape
    slot = torch.arange(n_slots).repeat_interleave(width)
    tokens = torch.cat([get(s, "tokens") for s in states], dim=1)
    keep = canonical_topk(slot, keys.reshape(-1), tokens.reshape(-1), n_slots, k)
    offset, xrows = 0, []
    for s in states:
        xrows.append(torch.where(get(s, "xrow") >= 0, get(s, "xrow") + offset, get(s, "xrow")))
        offset += get(s, "x").shape[0]

    def take(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n_slots * width, *t.shape[2:])[keep]

    merged = ExampleSet.__new__(ExampleSet)
    merged.keys = take(keys)
    merged.tokens = take(tokens)
    merged.values = take(torch.cat([get(s, "values") for s in states], dim=1))
    merged.pre = take(torch.cat([get(s, "pre") for s in states], dim=1))
    merged.context = take(torch.cat([get(s, "context") for s in states], dim=1))
    merged.xrow = take(torch.cat(xrows, dim=1))
    merged.x_store = torch.cat([get(s, "x") for s in states])
    return merged.state(prefix)


def empty_set(n_slots: int, width: int, n_proj: int, n_context: int, like_x: torch.Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
    """An example set of `width` empty entries per slot."""
    shapes = {"pre": (n_proj,), "context": (n_context,)}
    dtypes = {"keys": torch.float64, "tokens": torch.int64, "xrow": torch.int64}
    out = {f"{prefix}{name}": torch.full((n_slots, width, *shapes.get(name, ())), filler,
                                         dtype=dtypes.get(name, torch.float32)) for name, filler in EMPTY.items()}
    return {**out, f"{prefix}x": like_x[:0]}


def empty_entries(state: dict[str, torch.Tensor], prefix: str, off: torch.Tensor) -> dict[str, torch.Tensor]:
    """Empty the entries of one example set where `off` is true: they rank last and no later stage sees them."""
    out = dict(state)
    for name, filler in EMPTY.items():
        value = state[f"{prefix}{name}"]
        out[f"{prefix}{name}"] = torch.where(off.reshape(*off.shape, *([1] * (value.dim() - off.dim()))),
                                             torch.tensor(filler, dtype=value.dtype), value)
    return out


class TopKAccumulator:
    """top_k mode: each neuron's k strongest examples, plus statistics, in one pass."""

    def __init__(
        self, n_neurons: int, d_model: int, n_proj: int, k: int, context_before: int, context_after: int,
        histogram_stride: int = 8, x_dtype: torch.dtype = torch.float32, sign: str = "positive",
    ):
        self.k, self.sign = k, sign
        self.stats = Stats(n_neurons, histogram_stride)
        offsets = torch.arange(-context_before, context_after + 1)
        self.examples = ExampleSet(n_neurons, 1, d_model, n_proj, k, offsets, x_dtype)

    def update(self, act, pre, x, valid, token_index, where: str = "", unit_valid=None) -> None:
        batch = make_batch(act, pre, x, valid, token_index, where, self.sign, unit_valid)
        if batch is None:
            return
        self.stats.update(batch, where)
        a = batch.score_flat
        # Only entries at or above the kept k-th value can enter. Once the sets are full that is a handful per
        # batch; before (or when it would still admit many), the batch's own k-th value bounds them too.
        threshold = self.examples.kth_key().float().to(a.device)
        if batch.masked:  # an entry that cannot be an example (-inf) must not fill an empty slot
            threshold = threshold.clamp(min=torch.finfo(torch.float32).min)
        cand_row, cand_neuron = batch.at_least(threshold, self.sign)
        if cand_row.numel() > 4 * self.examples.keys.numel():
            batch_kth = torch.topk(a, min(self.k, a.shape[0]), dim=0).values[-1]
            cand_row, cand_neuron = batch.at_least(torch.maximum(batch_kth, threshold), self.sign)
        self.examples.offer(batch, cand_row, cand_neuron, a[cand_row, cand_neuron])

    def state(self) -> dict[str, torch.Tensor]:
        return {**self.examples.state(), **self.stats.state()}


def eligibility_floor(max_activation: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha x max for a positive max; for a neuron whose max is negative, max - (1 - alpha) x |max|."""
    return max_activation - (1.0 - alpha) * max_activation.abs()


class ThresholdAccumulator:
    """threshold mode (pass 2): a capped uniform sample of each neuron's entries >= alpha x max, and optionally
    per_bin samples from each of `bins` equal bins of activation in [0, alpha x max)."""

    def __init__(
        self, max_activation: torch.Tensor, d_model: int, n_proj: int, alpha: float, cap: int,
        context_before: int, context_after: int, seed: int = 0, bins: int = 0, per_bin: int = 0,
        histogram_stride: int = 8, x_dtype: torch.dtype = torch.float32, sign: str = "positive",
    ):
        """`max_activation` is each neuron's largest score over the corpus (score_max of pass 1's statistics)."""
        n = max_activation.numel()
        offsets = torch.arange(-context_before, context_after + 1)
        self.alpha, self.seed, self.bins, self.sign = alpha, seed, bins, sign
        self.max = max_activation.float()
        self.floor = eligibility_floor(self.max, alpha)
        self.stats = Stats(n, histogram_stride)
        self.examples = ExampleSet(n, 1, d_model, n_proj, cap, offsets, x_dtype)
        self.quantiles = ExampleSet(n * bins, bins, d_model, n_proj, per_bin, offsets, x_dtype) if bins and per_bin else None

    def update(self, act, pre, x, valid, token_index, where: str = "", unit_valid=None) -> None:
        batch = make_batch(act, pre, x, valid, token_index, where, self.sign, unit_valid)
        if batch is None:
            return
        self.stats.update(batch, where)
        a = batch.score_flat
        if self.floor.device != a.device:
            self.floor = self.floor.to(a.device)
        floor = self.floor.clamp(min=torch.finfo(torch.float32).min) if batch.masked else self.floor
        row, neuron = batch.at_least(floor, self.sign)
        self._offer_sampled(self.examples, batch, row, neuron)
        if self.quantiles is not None:
            top = self.floor.clamp(min=0)
            frac = a / torch.where(top > 0, top, torch.ones_like(top))[None, :]
            inside = (a >= 0) & (a < top[None, :])
            row, neuron = inside.nonzero(as_tuple=True)
            which = (frac[row, neuron] * self.bins).long().clamp(0, self.bins - 1)
            self._offer_sampled(self.quantiles, batch, row, neuron * self.bins + which)

    def _offer_sampled(self, target: ExampleSet, batch: Batch, row: torch.Tensor, slot: torch.Tensor) -> None:
        if row.numel() == 0:
            return
        key = -priority(batch.tok_flat[row], slot, self.seed)  # highest key = lowest priority number
        worth = key >= target.kth_key().to(key.device)[slot]
        target.offer(batch, row[worth], slot[worth], key[worth])

    def state(self) -> dict[str, torch.Tensor]:
        state = {**self.examples.state(), **self.stats.state()}
        if self.quantiles is not None:
            state.update(self.quantiles.state("quantile."))
        return state


def entry_scores(values: torch.Tensor, sign: str) -> torch.Tensor:
    """What a selection of `sign` ranks stored entries by; -inf for an empty entry (its value is -inf)."""
    return torch.where(torch.isfinite(values), score(values, sign), float("-inf"))


INITIAL_WIDTH = 8
LEVELS = 10  # rank levels of the hopeless table: cap, 1.5 cap, 2.25 cap, ... (about 38 cap)
DENSE_CHUNK = 1 << 22  # elements of the dense comparison matrices built at a time (a few MB)


def dominators(score: torch.Tensor, cap: int) -> torch.Tensor:
    """The scores of [slots, m] entries, each slot in canonical order (key descending, then token): how many
    entries before each one in its slot have a score at least as high, counted up to `cap`.

    An entry with `cap` such dominators can never be in the final sample: whenever its score clears the final
    floor, theirs do too, and they come first."""
    n_slots, m = score.shape
    counts = torch.zeros((n_slots, m), dtype=torch.int64)
    if m == 0:
        return counts
    earlier = torch.ones((m, m), dtype=torch.bool).tril(-1)  # [j, j']: j' ranks before j
    step = max(1, DENSE_CHUNK // (m * m))
    for lo in range(0, n_slots, step):
        s = score[lo : lo + step]
        counts[lo : lo + step] = ((s[:, None, :] >= s[:, :, None]) & earlier).sum(-1)
    return counts.clamp(max=cap)


def skyline(slot: torch.Tensor, key: torch.Tensor, token: torch.Tensor, score: torch.Tensor, n_slots: int, cap: int,
            floor: torch.Tensor) -> torch.Tensor:
    """Positions into the flat inputs of each slot's entries that may still be in the final sample, [n_slots, width]
    in canonical order, -1 past a slot's last: those with score >= floor (the running alpha x max) and fewer than
    `cap` entries of higher rank and at least their score. Dropping the others never changes the final sample,
    whatever comes later (see `OnePassAccumulator`)."""
    order = torch.argsort(token, stable=True)
    order = order[torch.argsort(-key[order], stable=True)]
    order = order[torch.argsort(slot[order], stable=True)]
    counts = torch.bincount(slot, minlength=n_slots)
    starts = torch.cumsum(counts, 0) - counts
    m = int(counts.max()) if counts.numel() else 0
    col = torch.arange(order.numel()) - starts[slot[order]]
    scores = torch.full((n_slots, m), float("-inf"))
    scores[slot[order], col] = score[order].float()
    where = torch.full((n_slots, m), -1, dtype=torch.int64)
    where[slot[order], col] = order
    alive = (where >= 0) & (scores >= floor[:, None])
    crowded = (counts > cap).nonzero(as_tuple=True)[0]  # only a slot of more than cap entries can drop any
    if crowded.numel():
        alive[crowded] &= dominators(scores[crowded], cap) < cap
    width = int(alive.sum(1).max()) if m else 0
    keep = torch.full((n_slots, width), -1, dtype=torch.int64)
    rows = torch.arange(n_slots)[:, None].expand(n_slots, m)
    keep[rows[alive], (torch.cumsum(alive, 1) - 1)[alive]] = where[alive]
    return keep


class CandidateSet(ExampleSet):
    """The one-pass threshold selection's candidates: per neuron, every entry that may still be in the final
    sample (`skyline`), however many that is; slots widen as needed."""

    def __init__(self, n_neurons: int, d_model: int, n_proj: int, cap: int, offsets: torch.Tensor, sign: str,
                 x_dtype: torch.dtype = torch.float32):
        # Narrow to start with: most neurons keep a handful of candidates, and slots widen when one needs it.
        super().__init__(n_neurons, 1, d_model, n_proj, min(cap, INITIAL_WIDTH), offsets, x_dtype)
        self.cap, self.sign = cap, sign
        self.count = torch.zeros(n_neurons, dtype=torch.int64)  # candidates per neuron
        # The hopeless table (see `hopeless`): per neuron and level l, a key and a score such that `cap`
        # candidates have at least that key and at least that score. -inf keys make a level claim nothing.
        self.levels = [cap]
        while len(self.levels) < LEVELS:
            self.levels.append(-(-self.levels[-1] * 3 // 2))
        self.table_key = torch.full((n_neurons, LEVELS), float("-inf"), dtype=torch.float64)
        self.table_score = torch.full((n_neurons, LEVELS), float("-inf"))
        self.arrived = torch.zeros(n_neurons, dtype=torch.int64)  # candidates added since the neuron's table

    def hopeless(self, neuron: torch.Tensor, key: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Entries the table proves hopeless: `cap` candidates rank before them and score at least as high.

        A level holds a key K and a score S such that at least `cap` candidates have key >= K and score >= S: an
        entry with key < K and score <= S has `cap` dominators. That stays true however old the table is: a
        candidate that left since either scored below the floor (below the entry too, so it never counted) or
        was itself dominated by `cap` candidates that dominate the entry as well. A few comparisons per entry
        instead of one per candidate; what the table misses, the exact count in `offer_candidates` decides."""
        beaten = (key[:, None] < self.table_key[neuron]) & (score[:, None] <= self.table_score[neuron])
        return beaten.any(1)

    def _refresh_table(self, rows: torch.Tensor) -> None:
        """Rebuild the hopeless table of neurons `rows`: level l's key is that of the candidate ranked
        levels[l]-th by key, its score the cap-th highest among the candidates ranked up to there."""
        keys = self.keys[rows]
        order = torch.argsort(keys, dim=1, descending=True)
        keys, scores = keys.gather(1, order), self.scores(rows).gather(1, order)
        width, count = keys.shape[1], self.count[rows]
        table_key = torch.full((rows.numel(), LEVELS), float("-inf"), dtype=torch.float64)
        table_score = torch.full((rows.numel(), LEVELS), float("-inf"))
        best = scores[:, :0]  # the cap highest scores among the candidates ranked so far
        done = 0
        for level, rank in enumerate(self.levels):
            if rank > width:
                break
            best = torch.topk(torch.cat([best, scores[:, done:rank]], 1), self.cap, dim=1).values
            done = rank
            filled = count >= rank
            table_key[filled, level] = keys[filled, rank - 1]
            table_score[filled, level] = best[filled, -1]
        self.table_key[rows], self.table_score[rows] = table_key, table_score
        self.arrived[rows] = 0

    def scores(self, slots: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        return entry_scores(self.values[slots], self.sign)

    def drop_below(self, floor: torch.Tensor, risen: torch.Tensor) -> None:
        """Empty the candidates of the neurons `risen` (indices) whose score fell below their neuron's floor."""
        if risen.numel() == 0:
            return
        off = self.scores(risen) < floor[risen, None]
        off &= torch.isfinite(self.values[risen])
        if bool(off.any()):
            rows, cols = off.nonzero(as_tuple=True)
            self._empty_at(risen[rows], cols)

    @torch.inference_mode()
    def offer_candidates(self, batch: Batch, row: torch.Tensor, neuron: torch.Tensor, key: torch.Tensor,
                         score: torch.Tensor, floor: torch.Tensor) -> None:
        """Entries at or above the floor (rows into batch.act_flat, neurons, keys, scores) join the candidates,
        and whatever they make hopeless leaves."""
        row, neuron, key, score = row.cpu(), neuron.cpu(), key.cpu().double(), score.cpu().float()
        token = batch.tok_flat[row.to(batch.act.device)].cpu()
        # Most entries of a long stream are already hopeless against the kept candidates: drop those first,
        # against each neuron's few hundred candidates, before the denser ranking of what is left.
        hopeless = self.hopeless(neuron, key, score)
        width = self.keys.shape[1]
        if width >= self.cap:  # only a neuron with cap candidates can make an entry hopeless
            full = ((self.count >= self.cap)[neuron] & ~hopeless).nonzero(as_tuple=True)[0]
            step = max(1, DENSE_CHUNK // width)
            for lo in range(0, full.numel(), step):
                at = full[lo : lo + step]
                n, k, t = neuron[at], key[at, None], token[at, None]
                kept_key = self.keys[n]
                ahead = (kept_key > k) | ((kept_key == k) & (self.tokens[n] < t))
                hopeless[at] = ((self.scores(n) >= score[at, None]) & ahead).sum(1) >= self.cap
        live = ~hopeless
        if not bool(live.any()):
            return
        row, neuron, key, score, token = row[live], neuron[live], key[live], score[live], token[live]
        touched, local = torch.unique(neuron, return_inverse=True)
        width = self.keys.shape[1]
        # A neuron that will hold at most cap candidates drops none: its new entries simply join. Only the crowded
        # ones are ranked (`skyline`) over their candidates and new entries together.
        joins = (self.count[touched] + torch.bincount(local, minlength=touched.numel())) <= self.cap
        arriving = joins[local]
        crowded = (~joins).nonzero(as_tuple=True)[0]
        if crowded.numel():
            mine = (~arriving).nonzero(as_tuple=True)[0]  # the new entries of crowded neurons
            at = torch.full((touched.numel(),), -1, dtype=torch.int64)
            at[crowded] = torch.arange(crowded.numel())
            rows = touched[crowded]
            n_old = crowded.numel() * width
            union_score = torch.cat([self.scores(rows).reshape(-1), score[mine]])
            union_key = torch.cat([self.keys[rows].reshape(-1), key[mine]])
            union_token = torch.cat([self.tokens[rows].reshape(-1), token[mine]])
            slot = torch.cat([torch.arange(crowded.numel()).repeat_interleave(width), at[local[mine]]])
            present = torch.isfinite(union_score).nonzero(as_tuple=True)[0]  # a slot's empty entries stay out
            keep = skyline(slot[present], union_key[present], union_token[present], union_score[present],
                           crowded.numel(), self.cap, floor[rows])
            alive = torch.zeros(slot.numel(), dtype=torch.bool)
            alive[present[keep[keep >= 0]]] = True
            # In place: a candidate that stays never moves, one that leaves becomes an empty entry, and the new
            # ones fill empty entries of their slot, so the cost follows the entries that change, not the width.
            gone = (~alive[:n_old] & torch.isfinite(union_score[:n_old])).view(crowded.numel(), width)
            if bool(gone.any()):
                self._empty_at(rows[:, None].expand_as(gone)[gone], gone.nonzero(as_tuple=True)[1])
            arriving[mine] = alive[n_old:]
        arrive = arriving.nonzero(as_tuple=True)[0]
        if arrive.numel() == 0:
            return
        values, pre, ctx, xrow = self._capture(batch, row[arrive], neuron[arrive])
        # Only the slots that receive entries are searched for empty ones.
        need = torch.bincount(local[arrive], minlength=touched.numel())
        receiving = (need > 0).nonzero(as_tuple=True)[0]
        position = torch.full((touched.numel(),), -1, dtype=torch.int64)
        position[receiving] = torch.arange(receiving.numel())
        receivers, need = touched[receiving], need[receiving]
        free = ~torch.isfinite(self.values[receivers])
        short = int((need - free.sum(1)).max())
        if short > 0:
            self._widen(max(width + short, width + width // 2))  # by half again at least: widening copies all
            free = ~torch.isfinite(self.values[receivers])
        # the r-th arriving entry of a slot takes the slot's r-th empty entry
        free_rank = torch.cumsum(free, 1) - 1
        column = torch.full((receivers.numel(), int(need.max())), -1, dtype=torch.int64)
        usable_row, usable_col = (free & (free_rank < need[:, None])).nonzero(as_tuple=True)
        column[usable_row, free_rank[usable_row, usable_col]] = usable_col
        arrive_slot = position[local[arrive]]  # arrive is in input order; rank each within its slot
        order = torch.argsort(arrive_slot, stable=True)
        starts = torch.cumsum(need, 0) - need
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel()) - starts[arrive_slot[order]]
        at_row, at_col = receivers[arrive_slot], column[arrive_slot, rank]
        self.keys[at_row, at_col] = key[arrive]
        self.tokens[at_row, at_col] = token[arrive]
        self.values[at_row, at_col] = values
        self.pre[at_row, at_col] = pre
        self.context[at_row, at_col] = ctx
        self.xrow[at_row, at_col] = xrow
        self.count[receivers] += need
        self.arrived[receivers] += need
        # A table misses only what arrived since it was built: rebuilt once a quarter of a neuron's candidates
        # are new, its cost stays a small share of the arrivals'.
        stale = receivers[(self.arrived[receivers] * 4 >= self.count[receivers]) & (self.count[receivers] >= self.cap)]
        if stale.numel():
            self._refresh_table(stale)

    def _widen(self, width: int) -> None:
        """Room for `width` entries in every slot."""
        for name, filler in EMPTY.items():
            old = getattr(self, name)
            wide = torch.full((old.shape[0], width, *old.shape[2:]), filler, dtype=old.dtype)
            wide[:, : old.shape[1]] = old
            setattr(self, name, wide)

    def _empty_at(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        self.count -= torch.bincount(rows, minlength=self.count.numel())
        for name, filler in EMPTY.items():
            getattr(self, name)[rows, cols] = filler

    def state(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The candidates, each slot in canonical order, as narrow as the fullest slot allows."""
        width = int(torch.isfinite(self.values).sum(1).max()) if self.values.numel() else 0
        n = self.keys.shape[0]
        slot = torch.arange(n).repeat_interleave(self.keys.shape[1])
        keep = canonical_topk(slot, self.keys.reshape(-1), self.tokens.reshape(-1), n, max(width, 1))
        for name in EMPTY:
            value = getattr(self, name)
            setattr(self, name, value.reshape(-1, *value.shape[2:])[keep])
        return super().state(prefix)


class OnePassAccumulator:
    """threshold mode in one pass: the same sample as the two passes (ThresholdAccumulator after pass 1's max),
    exactly, with the statistics of pass 1 computed alongside.

    The final sample of a neuron is the `cap` entries of highest key (lowest priority, then lowest token) among
    those with score >= alpha x the final max. While streaming, an entry is dropped for good once it is below
    alpha x the running max (the final floor is at least that), or once `cap` other candidates both rank above it
    and score at least as high: whenever it would clear the final floor, they would too, and come first. An entry
    dropped for the second reason has `cap` dominators that stay candidates (each dropped dominator has `cap` of
    its own, which dominate it too), so the survivors always hold the final sample. What survives depends only on
    the entries (not their order or batching), and each shard's survivors merge exactly (`merge_candidates`).

    The candidates of a neuron whose scores and priorities are independent number about cap x (1 + ln(n / cap))
    for n eligible entries: a few times cap, against the two passes' cap but a second forward pass.
    """

    def __init__(
        self, n_neurons: int, d_model: int, n_proj: int, alpha: float, cap: int, context_before: int,
        context_after: int, seed: int = 0, histogram_stride: int = 8, x_dtype: torch.dtype = torch.float32,
        sign: str = "positive",
    ):
        offsets = torch.arange(-context_before, context_after + 1)
        self.alpha, self.seed, self.sign = alpha, seed, sign
        self.stats = Stats(n_neurons, histogram_stride)
        self.examples = CandidateSet(n_neurons, d_model, n_proj, cap, offsets, sign, x_dtype)
        self.last_floor = torch.full((n_neurons,), float("-inf"))

    def floor(self) -> torch.Tensor:
        running = score_max({"stat_max": self.stats.max, "stat_min": self.stats.min}, self.sign)
        return eligibility_floor(running, self.alpha)

    @torch.inference_mode()
    def update(self, act, pre, x, valid, token_index, where: str = "", unit_valid=None) -> None:
        batch = make_batch(act, pre, x, valid, token_index, where, self.sign, unit_valid)
        if batch is None:
            return
        self.stats.update(batch, where)
        floor = self.floor()
        # a neuron's max changes rarely after the first batches: only those whose floor rose are checked
        self.examples.drop_below(floor, (floor > self.last_floor).nonzero(as_tuple=True)[0])
        self.last_floor = floor
        a = batch.score_flat
        on_device = floor.to(a.device)
        if batch.masked:  # an entry that cannot be an example (-inf) never qualifies
            on_device = on_device.clamp(min=torch.finfo(torch.float32).min)
        row, neuron = batch.at_least(on_device, self.sign)
        if row.numel() == 0:
            return
        key = -priority(batch.tok_flat[row], neuron, self.seed)  # the two passes' key: lowest priority first
        self.examples.offer_candidates(batch, row, neuron, key, a[row, neuron], floor)

    def state(self) -> dict[str, torch.Tensor]:
        return {**self.examples.state(), **self.stats.state()}


def merge_candidates(states: list[dict[str, torch.Tensor]], cap: int, alpha: float, sign: str) -> dict[str, torch.Tensor]:
    """The one-pass shards of a layer merged into the final sample: every shard's candidates below the final
    floor (alpha x the merged max) dropped, then the cap of highest key. Equal to the two passes' merge."""
    stats = merge_stats(states)
    floor = eligibility_floor(score_max(stats, sign), alpha)
    qualified = []
    for state in states:
        below = (entry_scores(state["values"], sign) < floor[:, None]) & torch.isfinite(state["values"])
        qualified.append(empty_entries(state, "", below))
    return {**merge_sets(qualified, cap, pad=True), **stats}


def merge_states(states: list[dict[str, torch.Tensor]], k: int, quantile_k: int | None = None) -> dict[str, torch.Tensor]:
    """Merge per-shard states of one layer: example sets by the canonical ranking, statistics summed."""
    merged = {**merge_sets(states, k), **merge_stats(states)}
    if quantile_k and all("quantile.keys" in s for s in states):
        merged.update(merge_sets(states, quantile_k, "quantile."))
    return merged
