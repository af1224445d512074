"""Exact streaming top-k: every batching and sharding must give the brute-force answer, ties included."""

from __future__ import annotations

import math

import pytest
import torch

from neuron_embeddings import topk
from neuron_embeddings.errors import PipelineError

# ---------------------------------------------------------------------------------------------------------------
# canonical_topk


def _random_entries(seed: int, n_neurons: int, k: int, max_extra: int = 12):
    """Flat (neuron, value, token) entries, shuffled, with many exact ties and distinct tokens per neuron."""
    g = torch.Generator().manual_seed(seed)
    neuron, value, token = [], [], []
    for n in range(n_neurons):
        m = k + int(torch.randint(0, max_extra + 1, (1,), generator=g))
        neuron.append(torch.full((m,), n, dtype=torch.int64))
        value.append(torch.randint(0, 5, (m,), generator=g).float())
        token.append(torch.randperm(1000, generator=g)[:m].to(torch.int64))
    neuron, value, token = torch.cat(neuron), torch.cat(value), torch.cat(token)
    perm = torch.randperm(neuron.numel(), generator=g)
    return neuron[perm], value[perm], token[perm]


def _reference_topk(neuron, value, token, n_neurons, k):
    out = []
    for n in range(n_neurons):
        idx = [i for i in range(neuron.numel()) if int(neuron[i]) == n]
        idx.sort(key=lambda i: (-float(value[i]), int(token[i])))
        out.append(idx[:k])
    return torch.tensor(out, dtype=torch.int64)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 3, 6])
def test_canonical_topk_matches_brute_force(seed, k):
    n_neurons = 7
    neuron, value, token = _random_entries(seed, n_neurons, k)
    got = topk.canonical_topk(neuron, value, token, n_neurons, k)
    expected = _reference_topk(neuron, value, token, n_neurons, k)
    assert got.shape == (n_neurons, k)
    assert torch.equal(got, expected)
    # every kept entry belongs to its row's neuron, ranked by value desc then token asc
    assert torch.equal(neuron[got], torch.arange(n_neurons)[:, None].expand(n_neurons, k))
    v, t = value[got], token[got]
    assert bool((v[:, 1:] <= v[:, :-1]).all())
    tie = v[:, 1:] == v[:, :-1]
    assert bool((t[:, 1:][tie] > t[:, :-1][tie]).all())


def test_canonical_topk_independent_of_input_order():
    n_neurons, k = 5, 4
    neuron, value, token = _random_entries(11, n_neurons, k)
    base = topk.canonical_topk(neuron, value, token, n_neurons, k)
    for seed in range(3):
        perm = torch.randperm(neuron.numel(), generator=torch.Generator().manual_seed(seed))
        got = topk.canonical_topk(neuron[perm], value[perm], token[perm], n_neurons, k)
        assert torch.equal(value[perm][got], value[base])
        assert torch.equal(token[perm][got], token[base])


def test_canonical_topk_padding_slots_rank_last():
    # neuron 0: two real entries and two empty (-inf, NO_TOKEN) slots; neuron 1: all real, tied
    neuron = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    value = torch.tensor([float("-inf"), 2.0, float("-inf"), -3.0, 1.0, 1.0, 1.0, 1.0])
    token = torch.tensor([topk.NO_TOKEN, 9, topk.NO_TOKEN, 4, 8, 2, 6, 3])
    got = topk.canonical_topk(neuron, value, token, 2, 3)
    assert got.tolist() == [[1, 3, 0], [5, 7, 6]]


def test_canonical_topk_needs_k_entries_per_neuron():
    neuron = torch.tensor([0, 0, 1])
    value = torch.tensor([1.0, 2.0, 3.0])
    token = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError):
        topk.canonical_topk(neuron, value, token, 2, 2)


# ---------------------------------------------------------------------------------------------------------------
# TopKAccumulator and merge_states

W, T, N, D, NPROJ = 20, 8, 6, 5, 2
BEFORE, AFTER = 2, 3


def _data(seed: int = 0, rising: bool = False):
    g = torch.Generator().manual_seed(seed)
    act = (torch.randint(0, 6, (W, T, N), generator=g) - 2).float()  # integers in [-2, 3]: many ties
    if rising:
        # later windows win more often: kept examples keep being replaced, so the x store must be compacted
        act = act + (torch.arange(W) // 2).float()[:, None, None]
    pre = [torch.randn(W, T, N, generator=g) for _ in range(NPROJ)]  # distinct values: shows where rows come from
    x = torch.randn(W, T, D, generator=g)
    lengths = torch.randint(T // 2, T + 1, (W,), generator=g)
    lengths[3] = 1  # a window holding only its BOS token: nothing valid
    lengths[7] = T
    pos = torch.arange(T)
    valid = (pos[None, :] < lengths[:, None]) & (pos[None, :] >= 1)  # position 0 is BOS
    token_index = torch.arange(W)[:, None] * T + pos[None, :]
    return act, pre, x, valid, token_index


def _brute_force(act, pre, x, valid, token_index, k, sign="positive"):
    offsets = list(range(-BEFORE, AFTER + 1))
    out = {
        "values": torch.full((N, k), float("-inf")),
        "tokens": torch.full((N, k), topk.NO_TOKEN, dtype=torch.int64),
        "pre": torch.zeros((N, k, NPROJ)),
        "context": torch.full((N, k, len(offsets)), float("nan")),
        "x": torch.zeros((N, k, D)),
        "live": torch.zeros((N, k), dtype=torch.bool),
    }
    cells = [(w, p) for w in range(W) for p in range(T) if bool(valid[w, p])]
    for n in range(N):
        strength = {"positive": lambda a: a, "negative": lambda a: -a, "both": abs}[sign]
        ranked = sorted(cells, key=lambda c: (-strength(float(act[c[0], c[1], n])), int(token_index[c[0], c[1]])))[:k]
        for r, (w, p) in enumerate(ranked):
            out["values"][n, r] = act[w, p, n]
            out["tokens"][n, r] = token_index[w, p]
            out["pre"][n, r] = torch.stack([q[w, p, n] for q in pre])
            out["x"][n, r] = x[w, p]
            out["live"][n, r] = True
            for i, off in enumerate(offsets):
                q = p + off
                if 0 <= q < T and bool(valid[w, q]):
                    out["context"][n, r, i] = act[w, q, n]
    flat = act[valid]  # [n_valid, N]
    out["stat_max"] = flat.max(0).values
    out["stat_min"] = flat.min(0).values
    out["stat_sum"] = flat.double().sum(0)
    out["stat_positive"] = (flat > 0).sum(0)
    out["n_tokens"] = int(valid.sum())
    return out


def _run(act, pre, x, valid, token_index, k, batch, lo=0, hi=W, sign="positive"):
    acc = topk.TopKAccumulator(N, D, NPROJ, k, BEFORE, AFTER, sign=sign)
    for start in range(lo, hi, batch):
        stop = min(start + batch, hi)
        acc.update(act[start:stop], [q[start:stop] for q in pre], x[start:stop], valid[start:stop],
                   token_index[start:stop], where="test")
    return acc.state()


def _assert_matches(state, ref):
    assert torch.equal(state["values"], ref["values"])
    assert torch.equal(state["tokens"], ref["tokens"])
    live = ref["live"]
    assert torch.equal(state["xrow"] >= 0, live)
    assert torch.equal(state["pre"][live], ref["pre"][live])
    assert torch.equal(state["x"][state["xrow"][live]], ref["x"][live])
    # context: equal values, NaN in the same places (live slots only; empty slots are all NaN too)
    assert torch.equal(torch.isnan(state["context"]), torch.isnan(ref["context"]))
    both = ~torch.isnan(ref["context"])
    assert torch.equal(state["context"][both], ref["context"][both])
    # statistics over every valid token
    assert torch.equal(state["stat_max"], ref["stat_max"])
    assert torch.equal(state["stat_min"], ref["stat_min"])
    assert torch.allclose(state["stat_sum"], ref["stat_sum"], rtol=0, atol=1e-9)
    assert state["stat_sum"].dtype == torch.float64
    assert torch.equal(state["stat_positive"], ref["stat_positive"])
    assert state["n_tokens"].tolist() == [ref["n_tokens"]]
    # the store is compact: no row that no kept example points to, and bounded by n_neurons * k
    assert state["x"].shape[0] == torch.unique(state["xrow"][live]).numel()
    assert state["x"].shape[0] <= state["values"].numel()


@pytest.fixture(scope="module", params=["iid", "rising"])
def data(request):
    return _data(0, rising=request.param == "rising")


@pytest.fixture(params=["roomy", "tight"])
def store_room(request, monkeypatch):
    """tight: the x store's buffer has no spare room, so it is compacted (rows renumbered) on most batches."""
    if request.param == "tight":
        monkeypatch.setattr(topk, "STORE_SEGMENT_ROWS", 1)
    return request.param


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("batch", [1, 3, W])
def test_streaming_matches_brute_force(data, k, batch, store_room):
    ref = _brute_force(*data, k)
    assert ref["live"].all()  # enough valid tokens: every slot is filled
    _assert_matches(_run(*data, k, batch), ref)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("bounds", [(0, 9, W), (0, 5, 12, W), (0, 1, 4, W)])
def test_sharded_merge_matches_brute_force(data, k, bounds, store_room):
    ref = _brute_force(*data, k)
    states = [_run(*data, k, batch, lo, hi) for (lo, hi), batch in zip(zip(bounds[:-1], bounds[1:]), (2, 1, 5))]
    _assert_matches(topk.merge_states(states, k), ref)
    _assert_matches(topk.merge_states(states[::-1], k), ref)  # the merge order does not matter


def test_tight_store_compacts_while_streaming(monkeypatch):
    monkeypatch.setattr(topk, "STORE_SEGMENT_ROWS", 1)
    compactions = []
    live_rows = topk.ExampleSet._live_rows
    monkeypatch.setattr(topk.ExampleSet, "_live_rows", lambda self: compactions.append(1) or live_rows(self))
    data = _data(0, rising=True)
    _assert_matches(_run(*data, 2, 1), _brute_force(*data, 2))
    assert len(compactions) >= 5  # the renumbering path ran while streaming, not only in state()


@pytest.mark.parametrize("segment_rows", [1, 3, 1024])
def test_row_store_compacts_in_place_as_a_gather_would(monkeypatch, segment_rows):
    """The segmented x store against a plain tensor: appends across segment ends, then compactions keeping random
    sorted subsets (rows moving between segments, and within one), give the rows a gather of the kept ones gives."""
    monkeypatch.setattr(topk, "STORE_SEGMENT_ROWS", segment_rows)
    g = torch.Generator().manual_seed(0)
    store, reference = topk.RowStore(5, torch.float32), torch.zeros((0, 5))
    for step in range(12):
        rows = torch.randn((int(torch.randint(0, 9, (1,), generator=g)), 5), generator=g)
        store.reserve(store.n + rows.shape[0])
        store.append(rows)
        reference = torch.cat([reference, rows])
        if step % 3 == 2:
            used = torch.sort(torch.randperm(store.n, generator=g)[: store.n // 2]).values
            store.compact(used)
            reference = reference[used]
        assert store.n == len(reference) and torch.equal(store.rows(), reference)
        assert store.capacity >= store.n and all(s.shape[0] == store.segment_rows for s in store.segments)


def test_merge_of_merges_matches_brute_force(data):
    k = 3
    ref = _brute_force(*data, k)
    a, b, c = (_run(*data, k, 3, lo, hi) for lo, hi in ((0, 6), (6, 13), (13, W)))
    _assert_matches(topk.merge_states([topk.merge_states([a, b], k), c], k), ref)


def test_ties_break_on_smallest_token_index():
    # every activation equal: the top-k are the k earliest valid tokens, for every neuron, however batched
    k = 5
    act = torch.ones(W, T, N)
    pre = [torch.zeros(W, T, N)] * NPROJ
    x = torch.randn(W, T, D, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(T)
    valid = (pos >= 1)[None, :].expand(W, T).clone()
    token_index = torch.arange(W)[:, None] * T + pos[None, :]
    expected = [1, 2, 3, 4, 5]
    for batch in (1, 2, W):
        state = _run(act, pre, x, valid, token_index, k, batch)
        assert state["tokens"].tolist() == [expected] * N
    shards = [_run(act, pre, x, valid, token_index, k, 1, lo, hi) for lo, hi in ((0, 1), (1, W))]
    assert topk.merge_states(shards[::-1], k)["tokens"].tolist() == [expected] * N


def test_fewer_valid_tokens_than_k_leaves_empty_slots():
    act, pre, x, valid, token_index = _data(5)
    few = torch.zeros_like(valid)
    few[2, 1:3] = True
    few[9, 4] = True  # three valid tokens in all
    k = 5
    ref = _brute_force(act, pre, x, few, token_index, k)
    for batch in (1, W):
        state = _run(act, pre, x, few, token_index, k, batch)
        _assert_matches(state, ref)
        assert state["tokens"][:, 3:].eq(topk.NO_TOKEN).all()
        assert torch.isinf(state["values"][:, 3:]).all()
        assert (state["xrow"][:, 3:] == -1).all()
    merged = topk.merge_states([_run(act, pre, x, few, token_index, k, 4, lo, hi) for lo, hi in ((0, 5), (5, W))], k)
    _assert_matches(merged, ref)


def test_context_window_contents(data):
    act, pre, x, valid, token_index = data
    k = 4
    state = _run(*data, k, 3)
    offsets = range(-BEFORE, AFTER + 1)
    assert state["context"].shape == (N, k, BEFORE + AFTER + 1)
    for n in range(N):
        for r in range(k):
            w, p = divmod(int(state["tokens"][n, r]), T)
            assert bool(valid[w, p])
            ctx = state["context"][n, r]
            assert float(ctx[BEFORE]) == float(state["values"][n, r]) == float(act[w, p, n])
            for i, off in enumerate(offsets):
                q = p + off
                if 0 <= q < T and bool(valid[w, q]):
                    assert float(ctx[i]) == float(act[w, q, n])
                else:
                    assert math.isnan(float(ctx[i]))


def test_bos_is_never_an_example(data):
    act, pre, x, valid, token_index = data
    act = act.clone()
    act[:, 0, :] = 100.0  # BOS has the largest activations, but is not valid
    act[:, -1, :] = 100.0  # nor is padding (where a window is short)
    state = _run(act, pre, x, valid, token_index, 4, 3)
    w, p = state["tokens"] // T, state["tokens"] % T
    assert bool(valid[w, p].all())
    assert not bool((p == 0).any())
    # full-length windows (window 7) make the last position valid: those 100s are real and must be kept
    assert bool(valid[7, -1])
    assert torch.equal(state["stat_max"], torch.full((N,), 100.0))
    assert bool((state["values"][:, 0] == 100.0).all())
    assert bool((p[:, 0] == T - 1).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_raise(data, bad):
    act, pre, x, valid, token_index = data
    act = act.clone()
    act[4, 2, 1] = bad
    assert bool(valid[4, 2])
    acc = topk.TopKAccumulator(N, D, NPROJ, 3, BEFORE, AFTER)
    acc.update(act[:4], [q[:4] for q in pre], x[:4], valid[:4], token_index[:4], where="layer 0 shard s")
    with pytest.raises(PipelineError, match="layer 0 shard s"):
        acc.update(act[4:8], [q[4:8] for q in pre], x[4:8], valid[4:8], token_index[4:8], where="layer 0 shard s")


def test_streaming_under_inference_mode(data):
    """The activation cache runs the accumulator under torch.inference_mode(), compaction included."""
    k = 2
    ref = _brute_force(*data, k)
    with torch.inference_mode():
        state = _run(*data, k, 1)
        shards = [_run(*data, k, 2, lo, hi) for lo, hi in ((0, 7), (7, W))]
        merged = topk.merge_states(shards, k)
    _assert_matches(state, ref)
    _assert_matches(merged, ref)


def test_empty_batch_changes_nothing(data):
    act, pre, x, valid, token_index = data
    acc = topk.TopKAccumulator(N, D, NPROJ, 2, BEFORE, AFTER)
    acc.update(act[3:4], [q[3:4] for q in pre], x[3:4], valid[3:4], token_index[3:4])  # window 3: BOS only
    state = acc.state()
    assert state["n_tokens"].tolist() == [0]
    assert torch.isinf(state["values"]).all() and (state["xrow"] == -1).all()
    assert state["x"].shape == (0, D)
    assert torch.isinf(state["stat_max"]).all() and (state["stat_positive"] == 0).all()


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_batches_of_any_width_and_window_order(data, batch):
    """Windows fed in any order (here longest first), each batch cut to its longest window: same answer.

    token_index keeps the full window length T, while the tensors are only as wide as the batch needs.
    """
    act, pre, x, valid, token_index = data
    k = 3
    ref = _brute_force(act, pre, x, valid, token_index, k)
    lengths = valid.sum(1) + 1  # real tokens incl. BOS; windows end at their last valid position
    lengths[valid.sum(1) == 0] = 1
    order = torch.argsort(-lengths, stable=True)
    acc = topk.TopKAccumulator(N, D, NPROJ, k, BEFORE, AFTER)
    for start in range(0, W, batch):
        members = order[start : start + batch]
        width = int(lengths[members].max())
        acc.update(act[members, :width], [q[members, :width] for q in pre], x[members, :width],
                   valid[members, :width], token_index[members, :width])
    _assert_matches(acc.state(), ref)


@pytest.mark.parametrize("sign", ["negative", "both"])
@pytest.mark.parametrize("batch", [1, 5])
def test_signs_match_brute_force_and_keep_the_activation(data, sign, batch):
    """negative ranks by -a and both by |a|; what is stored is the activation with its sign."""
    act, pre, x, valid, token_index = data
    act = act.clone()
    act[..., ::2] *= -1  # neurons 0, 2, 4 now fire below zero
    k = 4
    state = _run(act, pre, x, valid, token_index, k, batch, sign=sign)
    ref = _brute_force(act, pre, x, valid, token_index, k, sign=sign)
    _assert_matches(state, ref)
    flipped = state["values"][::2]
    assert (flipped[torch.isfinite(flipped)] < 0).all()  # kept with their sign
    # merging shards in either order gives the same as one pass
    half = W // 2
    parts = [_run(act, pre, x, valid, token_index, k, batch, 0, half, sign=sign),
             _run(act, pre, x, valid, token_index, k, batch, half, W, sign=sign)]
    for merged in (topk.merge_states(parts, k), topk.merge_states(parts[::-1], k)):
        _assert_matches(merged, ref)


# ---------------------------------------------------------------------------------------------------------------
# the fast paths of the statistics and the candidate scan: each must equal the plain torch operation exactly


def test_hist_bins_equals_bucketize_at_every_edge():
    edges = topk.HIST_EDGES
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(2001, generator=g) * torch.logspace(-8, 8, 2001)  # every bin, under- and overflow
    at_edges = torch.cat([edges, torch.nextafter(edges, torch.tensor(math.inf)),
                          torch.nextafter(edges, torch.tensor(-math.inf))])
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, 3e38, -3e38, 1e-45, -1e-45, math.nan])
    values = torch.cat([spread, at_edges, special]).reshape(-1, 7)[:, torch.randperm(7, generator=g)]
    assert torch.equal(topk.hist_bins(values), torch.bucketize(values, edges))


@pytest.mark.parametrize("sign", topk.SIGNS)
@pytest.mark.parametrize("level", [-math.inf, 0.0, 2.2, 3.5, 9.0])
def test_at_least_equals_a_full_scan(sign, level):
    """Entries at or above a per-neuron threshold, found through the batch's max (few neurons reach it) or the
    full scan (many do): the same (row, neuron) pairs as torch's nonzero, in the same order."""
    g = torch.Generator().manual_seed(1)
    act = torch.randn(4, 16, 300, generator=g) * torch.linspace(0.5, 2, 300)
    valid = torch.ones(4, 16, dtype=torch.bool)
    valid[:, 0] = False
    batch = topk.make_batch(act, [act], act[..., :8], valid, torch.arange(64).view(4, 16), sign=sign)
    threshold = torch.full((300,), level)
    threshold[::7] = -math.inf  # some neurons take everything
    want = (batch.score_flat >= threshold[None, :]).nonzero(as_tuple=True)
    got = batch.at_least(threshold, sign)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
