"""Exact, order-independent top-k per neuron, in a streaming form that never holds more than k per neuron.

Entries are ranked by (activation descending, global token index ascending). Because the token index breaks
every tie the same way, the k kept per neuron do not depend on the batch size, the shard split, or the order
in which shards are merged: streaming over batches and merging shards give exactly the brute-force answer.
"""

from __future__ import annotations

import torch

from .errors import PipelineError

NO_TOKEN = torch.iinfo(torch.int64).max  # sentinel token index of an empty slot (ranks after every real one)


def canonical_topk(neuron: torch.Tensor, value: torch.Tensor, token: torch.Tensor, n_neurons: int, k: int) -> torch.Tensor:
    """Positions into the flat inputs of each neuron's k best entries, as [n_neurons, k] in rank order.

    Every neuron must have at least k entries (pad with -inf / NO_TOKEN slots).
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


class TopKAccumulator:
    """One layer's running state over a shard: top-k examples per neuron plus activation statistics.

    Per kept example it holds the activation, the pre-activation of each input projection, the neuron's
    activations over a context window around the token, and a pointer into a store of MLP inputs x. The store
    keeps one row per distinct token (several neurons often share one) and is compacted as entries drop out,
    so memory is bounded by n_neurons * k rows however long the corpus is.
    """

    def __init__(self, n_neurons: int, d_model: int, n_proj: int, k: int, context_before: int, context_after: int):
        self.n_neurons, self.d_model, self.n_proj, self.k = n_neurons, d_model, n_proj, k
        self.offsets = torch.arange(-context_before, context_after + 1)
        self.values = torch.full((n_neurons, k), float("-inf"))
        self.tokens = torch.full((n_neurons, k), NO_TOKEN, dtype=torch.int64)
        self.pre = torch.zeros((n_neurons, k, n_proj))
        self.context = torch.full((n_neurons, k, self.offsets.numel()), float("nan"))
        self.xrow = torch.full((n_neurons, k), -1, dtype=torch.int64)
        self.x_store = torch.zeros((0, d_model))
        self.stat_max = torch.full((n_neurons,), float("-inf"))
        self.stat_sum = torch.zeros(n_neurons, dtype=torch.float64)
        self.stat_positive = torch.zeros(n_neurons, dtype=torch.int64)
        self.n_tokens = 0

    def update(
        self,
        act: torch.Tensor,  # [B, T, N] neuron activations
        pre: list[torch.Tensor],  # per projection [B, T, N]
        x: torch.Tensor,  # [B, T, d] MLP inputs
        valid: torch.Tensor,  # [B, T] bool: real tokens that may be examples (no padding, no BOS)
        token_index: torch.Tensor,  # [B, T] int64 global token index
        where: str = "",
    ) -> None:
        B, T, N = act.shape
        act = act.float().cpu()
        rows = valid.reshape(-1).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            return
        act_flat = act.reshape(B * T, N)[rows]
        if not torch.isfinite(act_flat).all():
            raise PipelineError(f"{where}: NaN or inf activations (overflow in the model or its dtype?)")
        self.stat_max = torch.maximum(self.stat_max, act_flat.max(0).values)
        self.stat_sum += act_flat.sum(0, dtype=torch.float64)
        self.stat_positive += (act_flat > 0).sum(0)
        self.n_tokens += rows.numel()

        batch_kth = torch.topk(act_flat, min(self.k, rows.numel()), dim=0).values[-1]
        threshold = torch.maximum(batch_kth, self.values[:, -1])
        cand_row, cand_neuron = (act_flat >= threshold).nonzero(as_tuple=True)
        if cand_row.numel() == 0:
            return
        tok_flat = token_index.reshape(-1)[rows]
        n_old = self.n_neurons * self.k
        neuron = torch.cat([torch.arange(N).repeat_interleave(self.k), cand_neuron])
        value = torch.cat([self.values.reshape(-1), act_flat[cand_row, cand_neuron]])
        token = torch.cat([self.tokens.reshape(-1), tok_flat[cand_row]])
        keep = canonical_topk(neuron, value, token, N, self.k)
        is_new = keep >= n_old
        pick = keep[is_new] - n_old
        sel_row, sel_neuron = rows[cand_row[pick]], cand_neuron[pick]  # rows into the [B*T] batch

        new_pre = self.pre.reshape(-1, self.n_proj).clone()
        new_ctx = self.context.reshape(-1, self.offsets.numel()).clone()
        new_xrow = self.xrow.reshape(-1).clone()
        old_pick = keep.clone()
        old_pick[is_new] = 0
        new_pre, new_ctx, new_xrow = new_pre[old_pick], new_ctx[old_pick], new_xrow[old_pick]

        pre_cols = [p.float().cpu().reshape(B * T, N)[sel_row, sel_neuron] for p in pre]
        new_pre[is_new] = torch.stack(pre_cols, dim=-1)
        b, p = sel_row // T, sel_row % T
        pos = p[:, None] + self.offsets[None, :]
        inside = (pos >= 0) & (pos < T)
        pos_c = pos.clamp(0, T - 1)
        ctx = act[b[:, None], pos_c, sel_neuron[:, None]]
        ok = inside & valid[b[:, None], pos_c]
        new_ctx[is_new] = torch.where(ok, ctx, torch.full_like(ctx, float("nan")))
        unique_rows, inverse = torch.unique(sel_row, return_inverse=True)
        new_xrow[is_new] = self.x_store.shape[0] + inverse
        self.x_store = torch.cat([self.x_store, x.reshape(B * T, -1)[unique_rows].float().cpu()])

        self.values = value[keep]
        self.tokens = token[keep]
        self.pre = new_pre.view(N, self.k, self.n_proj)
        self.context = new_ctx.view(N, self.k, -1)
        self.xrow = new_xrow.view(N, self.k)
        if self.x_store.shape[0] > 2 * n_old:
            self.compact()

    def compact(self) -> None:
        """Drop store rows no kept example points to."""
        live = self.xrow >= 0
        used, inverse = torch.unique(self.xrow[live], return_inverse=True)
        self.x_store = self.x_store[used]
        self.xrow = self.xrow.clone()  # may be an inference-mode tensor, which cannot be updated in place
        self.xrow[live] = inverse

    def state(self) -> dict[str, torch.Tensor]:
        self.compact()
        return {
            "values": self.values,
            "tokens": self.tokens,
            "pre": self.pre,
            "context": self.context,
            "xrow": self.xrow,
            "x": self.x_store,
            "stat_max": self.stat_max,
            "stat_sum": self.stat_sum,
            "stat_positive": self.stat_positive,
            "n_tokens": torch.tensor([self.n_tokens], dtype=torch.int64),
        }


def merge_states(states: list[dict[str, torch.Tensor]], k: int) -> dict[str, torch.Tensor]:
    """Merge per-shard states into one: the same canonical top-k, statistics summed, x stores joined."""
    n_neurons = states[0]["values"].shape[0]
    values = torch.cat([s["values"] for s in states], dim=1)
    tokens = torch.cat([s["tokens"] for s in states], dim=1)
    width = values.shape[1]
    neuron = torch.arange(n_neurons).repeat_interleave(width)
    keep = canonical_topk(neuron, values.reshape(-1), tokens.reshape(-1), n_neurons, k)
    offsets, stores, xrows = 0, [], []
    for s in states:
        xrows.append(torch.where(s["xrow"] >= 0, s["xrow"] + offsets, s["xrow"]))
        stores.append(s["x"])
        offsets += s["x"].shape[0]

    def take(name_or_tensor: torch.Tensor) -> torch.Tensor:
        flat = name_or_tensor.reshape(n_neurons * width, *name_or_tensor.shape[2:])
        return flat[keep]

    merged = TopKAccumulator.__new__(TopKAccumulator)
    merged.n_neurons, merged.k = n_neurons, k
    merged.values = take(values)
    merged.tokens = take(tokens)
    merged.pre = take(torch.cat([s["pre"] for s in states], dim=1))
    merged.context = take(torch.cat([s["context"] for s in states], dim=1))
    merged.xrow = take(torch.cat(xrows, dim=1))
    merged.x_store = torch.cat(stores) if stores else torch.zeros((0, 0))
    merged.stat_max = torch.stack([s["stat_max"] for s in states]).max(0).values
    merged.stat_sum = torch.stack([s["stat_sum"] for s in states]).sum(0)
    merged.stat_positive = torch.stack([s["stat_positive"] for s in states]).sum(0)
    merged.n_tokens = int(sum(int(s["n_tokens"][0]) for s in states))
    return merged.state()
