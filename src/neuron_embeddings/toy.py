"""Toy models of superposition with known features: the neuron-embedding measure checked where the truth is known.

The model (Elhage et al. 2022, "Toy Models of Superposition", the privileged-basis ReLU model; Jermyn et al. 2022):
n sparse features f in [0, 1]^n, feature i present with probability 1 - sparsity and then uniform in [0, 1],
importance I_i = decay^i; m < n ReLU neurons h = ReLU(W f) with W [m, n], and the reconstruction
f' = ReLU(W^T h + b) (tied weights); loss sum_i I_i (f_i - f'_i)^2. Trained with Adam, seconds on a CPU.
Optionally (input_dim d) the neurons read x = E f, E a fixed random map with unit-norm columns, and W = W_in E:
features are then directions of the neurons' input space rather than its axes, as in a transformer.

A neuron here is a unit exactly like a transformer's MLP neuron: its "MLP input" is x (= f without input_dim),
its input weights W_in[j] and its bias 0, so its embedding at an example is x * W_in[j] and sums to its
pre-activation. The ground truth of
neuron j, read from the trained weights (`true_features`): the features whose weight into it is at least
`truth_share` of its largest weight, W[j, i] >= truth_share x max_i' W[j, i'] (with W[j, i] > 0): the features
that on their own drive it to at least that share of what its strongest feature does. The true feature of one
example for neuron j is the feature contributing most to its pre-activation, argmax_i W[j, i] f_i.

Examples: a pool of single-feature inputs (every feature, values uniform in (0, 1]) and sparse multi-feature
inputs (`multi_features` distinct random features), selected per neuron with the pipeline's own threshold
selection (topk.ThresholdAccumulator: activation >= alpha x the neuron's max over the pool, a capped uniform
sample), embedded, clustered (clustering.cluster_neuron) and measured (metrics.neuron_metrics) with the package's
code; then scored against the truth: adjusted Rand index between the clusters and the examples' true features,
and the error in features per neuron (clusters minus true features).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from .errors import PipelineError
from .tables import selected_entries

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ToySettings:
    n_features: int = 20
    n_neurons: int = 5
    importance_decay: float = 0.9
    sparsity: float = 0.9
    steps: int = 3000
    batch_size: int = 1024
    lr: float = 1e-2
    input_dim: int | None = None  # None: x is the features themselves; d: x = E f, E a fixed random [d, n_features]
    seed: int = 0


@dataclass(frozen=True)
class ProbeSettings:
    """How a trained toy model's neurons are probed and scored."""

    truth_share: float = 0.3  # feature i is one of neuron j's if W[j, i] >= truth_share x max W[j, :]
    single_per_feature: int = 40  # single-feature inputs per feature in the example pool
    multi: int = 800  # multi-feature inputs in the pool
    multi_features: int = 2  # features present in each multi-feature input
    alpha: float = 0.3  # selection: activation >= alpha x the neuron's max over the pool
    cap: int = 100  # at most this many examples per neuron (uniform sample)
    seed: int = 0


# ---------------------------------------------------------------------------------------------------------------
# The model.


def input_map(settings: ToySettings) -> np.ndarray:
    """E [d, n]: how features become the neurons' input x = E f. The identity, or (input_dim d) a fixed random map
    with unit-norm columns, seeded by the model's seed: features are then directions in x, not its axes, as in a
    transformer's residual stream (and with d < n, superposed there too)."""
    if not settings.input_dim:
        return np.eye(settings.n_features, dtype=np.float32)
    rng = np.random.default_rng(10_000 + settings.seed)
    E = rng.standard_normal((settings.input_dim, settings.n_features)).astype(np.float32)
    return E / np.linalg.norm(E, axis=0, keepdims=True)


def train_toy(settings: ToySettings) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train one toy model; return its tensors and a training record. Tensors: W_in [m, d] (the neurons' input
    weights), E [d, n] (input_map), W = W_in E [m, n] (each neuron's weight on each feature; the reconstruction is
    ReLU(W^T h + b), tied), b [n], importance [n]."""
    import torch

    s = settings
    if not 0 <= s.sparsity < 1:
        raise PipelineError(f"toy.sparsity: {s.sparsity} is outside [0, 1)")
    if s.n_neurons >= s.n_features:
        raise PipelineError(f"toy: n_neurons ({s.n_neurons}) must be fewer than n_features ({s.n_features})")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small run fastest on one thread; more only contend
    try:
        return _train(s, torch)
    finally:
        torch.set_num_threads(threads)


def _train(s: ToySettings, torch: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    gen = torch.Generator().manual_seed(s.seed)
    torch.manual_seed(s.seed)
    E = torch.from_numpy(input_map(s))
    W_in = (torch.randn(s.n_neurons, E.shape[0], generator=gen) / np.sqrt(s.n_features)).requires_grad_()
    b = torch.zeros(s.n_features, requires_grad=True)
    importance = s.importance_decay ** torch.arange(s.n_features, dtype=torch.float32)
    opt = torch.optim.Adam([W_in, b], lr=s.lr)
    losses = []
    for step in range(s.steps):
        present = torch.rand(s.batch_size, s.n_features, generator=gen) < (1.0 - s.sparsity)
        f = torch.rand(s.batch_size, s.n_features, generator=gen) * present
        W = W_in @ E
        recon = torch.relu(torch.relu(f @ W.T) @ W + b)
        loss = (importance * (f - recon) ** 2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 99:
            losses.append(loss.item())
    W_in = W_in.detach()
    tensors = {"W_in": W_in.numpy().copy(), "E": E.numpy().copy(), "W": (W_in @ E).numpy().copy(),
               "b": b.detach().numpy().copy(), "importance": importance.numpy()}
    return tensors, {"final_loss": float(np.mean(losses[-5:])) if losses else None, "loss_every_100": losses}


def true_features(W: np.ndarray, share: float) -> list[np.ndarray]:
    """Per neuron, the features it represents: W[j, i] > 0 and W[j, i] >= share x max_i' W[j, i']."""
    out = []
    for row in W:
        top = row.max()
        out.append(np.flatnonzero((row > 0) & (row >= share * top)) if top > 0 else np.zeros(0, dtype=np.int64))
    return out


def example_pool(n_features: int, probe: ProbeSettings) -> np.ndarray:
    """Inputs the neurons are probed with: single-feature ones for every feature, then sparse multi-feature ones."""
    rng = np.random.default_rng(probe.seed)
    single = np.zeros((n_features * probe.single_per_feature, n_features), dtype=np.float32)
    rows = np.arange(single.shape[0])
    single[rows, rows // probe.single_per_feature] = rng.uniform(0.05, 1.0, size=rows.size)
    k = min(probe.multi_features, n_features)
    multi = np.zeros((probe.multi, n_features), dtype=np.float32)
    for r in range(probe.multi):
        multi[r, rng.choice(n_features, size=k, replace=False)] = rng.uniform(0.05, 1.0, size=k)
    return np.concatenate([single, multi])


# ---------------------------------------------------------------------------------------------------------------
# Probing with the pipeline's own selection, embedding, clustering and metrics code.


def select_examples(tensors: dict[str, np.ndarray], pool: np.ndarray, probe: ProbeSettings) -> dict[str, np.ndarray]:
    """Each neuron's examples from the pool (features f; the neurons see x = E f), chosen as the pipeline chooses a
    neuron's examples (threshold mode), embedded as x * W_in[j] (checked: sum = pre-activation). Returns
    selected_entries' arrays plus `embedding` and `f`; only entries where the neuron fires."""
    import torch

    from .embeddings import check_invariant
    from .topk import ThresholdAccumulator

    W_in = tensors["W_in"]
    x = torch.from_numpy(pool @ tensors["E"].T)[None]  # one "window" of P tokens
    pre = x @ torch.from_numpy(W_in).T
    act = torch.relu(pre)
    top = act[0].max(0).values
    top = torch.where(top > 0, top, torch.finfo(torch.float32).max / 2)  # a neuron that never fires gets nothing
    acc = ThresholdAccumulator(top, x.shape[-1], 1, probe.alpha, probe.cap, 0, 0, probe.seed, histogram_stride=1)
    acc.update(act, [pre], x, torch.ones(1, pool.shape[0], dtype=torch.bool), torch.arange(pool.shape[0])[None])
    state = {k: v.numpy() for k, v in acc.state().items()}
    entries = selected_entries(state, "threshold")
    keep = entries["value"] > 0
    entries = {k: v[keep] for k, v in entries.items()}
    entries["embedding"] = entries["x"] * W_in[entries["neuron"]]
    check_invariant(entries["embedding"], np.zeros((keep.sum(), 1)), entries["pre"].astype(np.float64), "float32",
                    "toy embeddings")
    entries["f"] = pool[entries["token"]]
    return entries


def score_neurons(W: np.ndarray, entries: dict[str, np.ndarray], truth: list[np.ndarray],
                  thresholds: list[float], methods: list[str]) -> list[dict[str, Any]]:
    """One row per (method, threshold, neuron): true features, clusters, ARI against the examples' true features."""
    from sklearn.metrics import adjusted_rand_score

    from .clustering import cluster_neuron, neuron_groups
    from .metrics import neuron_metrics

    rows = []
    groups = {n: (a, b) for n, a, b in neuron_groups(entries["neuron"])}
    for neuron in range(W.shape[0]):
        start, stop = groups.get(neuron, (0, 0))
        emb = entries["embedding"][start:stop]
        f = entries["f"][start:stop]
        true_label = np.argmax(f * W[neuron], axis=1) if stop > start else np.zeros(0, dtype=np.int64)
        for method in methods:
            for threshold in thresholds:
                base = {"neuron": neuron, "method": method, "threshold": float(threshold), "size": int(stop - start),
                        "n_true": int(len(truth[neuron])), "n_example_features": int(len(np.unique(true_label)))}
                if stop - start == 0:
                    rows.append({**base, "n_clusters": 0, "ari": None, "mean_distance": None})
                    continue
                labels = cluster_neuron(emb, threshold, method)["cluster"]
                metrics = neuron_metrics(emb, labels)
                rows.append({**base, "n_clusters": metrics["n_clusters"], "mean_distance": metrics["mean_distance"],
                             "ari": float(adjusted_rand_score(true_label, labels))})
    return rows


TOY_SCORES = pa.schema(
    [
        pa.field("input_dim", pa.int32(), nullable=False),  # 0: the neurons read the features themselves
        pa.field("sparsity", pa.float32(), nullable=False),
        pa.field("seed", pa.int32(), nullable=False),
        pa.field("neuron", pa.int32(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("threshold", pa.float32(), nullable=False),
        pa.field("size", pa.int32(), nullable=False),  # examples selected
        pa.field("n_true", pa.int32(), nullable=False),  # true features (from the weights)
        pa.field("n_example_features", pa.int32(), nullable=False),  # distinct true features among its examples
        pa.field("n_clusters", pa.int32(), nullable=False),  # the measure
        pa.field("ari", pa.float32(), nullable=True),  # clusters vs examples' true features; null without examples
        pa.field("mean_distance", pa.float32(), nullable=True),
    ]
)


def run_toy(settings: ToySettings, probe: ProbeSettings, thresholds: list[float], methods: list[str],
            model_path: str | os.PathLike, scores_path: str | os.PathLike) -> dict[str, Any]:
    """Train one toy model, probe and score it; write the model (safetensors) and the scores (Parquet)."""
    from .storage import provenance, save_tensors, write_parquet

    tensors, record = train_toy(settings)
    truth = true_features(tensors["W"], probe.truth_share)
    tensors["n_true"] = np.array([len(t) for t in truth], dtype=np.int64)
    meta = provenance("toy_model", asdict(settings), probe=asdict(probe), training=record)
    save_tensors(tensors, model_path, meta)
    entries = select_examples(tensors, example_pool(settings.n_features, probe), probe)
    rows = score_neurons(tensors["W"], entries, truth, thresholds, methods)
    common = {"input_dim": settings.input_dim or 0, "sparsity": settings.sparsity, "seed": settings.seed}
    table = pa.Table.from_pylist([{**r, **common} for r in rows], schema=TOY_SCORES)
    write_parquet(table, scores_path, provenance("toy_scores", {"thresholds": thresholds, "methods": methods},
                                                 model=asdict(settings), probe=asdict(probe)))
    n_true = tensors["n_true"]
    return {"final_loss": record["final_loss"], "features_per_neuron": n_true.tolist(),
            "polysemantic": float((n_true > 1).mean())}


# ---------------------------------------------------------------------------------------------------------------
# Over the sparsity grid: choose the clustering default, tabulate recovery against sparsity.


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    return float(np.mean(values)) if values else None


def summarize_toys(scores_paths: list[str | os.PathLike], out_table: str | os.PathLike, out_choice: str | os.PathLike,
                   out_png: str | os.PathLike) -> dict[str, Any]:
    """Choose the clustering method and threshold that recover the true features best over every toy model
    (highest mean ARI over neurons with at least two examples; ties, within 0.005, to the smaller mean absolute
    error in features per neuron, then to the lower threshold), and tabulate recovery against sparsity with it."""
    from .storage import read_parquet, write_json, write_parquet, provenance

    table = pa.concat_tables([read_parquet(p, TOY_SCORES) for p in scores_paths])
    rows = table.to_pylist()
    scored = [r for r in rows if r["size"] >= 2]
    grid: dict[tuple[str, float], dict[str, Any]] = {}
    for r in scored:
        key = (r["method"], round(r["threshold"], 4))
        cell = grid.setdefault(key, {"ari": [], "abs_error": [], "agree": []})
        cell["ari"].append(r["ari"])
        cell["abs_error"].append(abs(r["n_clusters"] - r["n_true"]))
        cell["agree"].append(float((r["n_clusters"] > 1) == (r["n_true"] > 1)))
    candidates = [{"method": m, "threshold": t, "mean_ari": _mean(c["ari"]), "mean_abs_error": _mean(c["abs_error"]),
                   "polysemantic_agreement": _mean(c["agree"]), "neurons": len(c["ari"])}
                  for (m, t), c in sorted(grid.items())]
    if not candidates:
        raise PipelineError("toy: no neuron had two examples to cluster")
    best_ari = max(c["mean_ari"] for c in candidates)
    near = [c for c in candidates if c["mean_ari"] >= best_ari - 0.005]
    choice = min(near, key=lambda c: (c["mean_abs_error"], c["threshold"]))

    per_sparsity = []
    for input_dim, sparsity in sorted({(r["input_dim"], r["sparsity"]) for r in rows}):
        at = [r for r in rows if r["input_dim"] == input_dim and r["sparsity"] == sparsity
              and r["method"] == choice["method"] and round(r["threshold"], 4) == choice["threshold"]]
        with_examples = [r for r in at if r["size"] >= 2]
        per_sparsity.append({
            "input_dim": int(input_dim),
            "sparsity": round(float(sparsity), 4),
            "models": len({r["seed"] for r in at}),
            "neurons": len(at),
            "true_features_per_neuron": _mean([r["n_true"] for r in at]),
            "clusters_per_neuron": _mean([r["n_clusters"] for r in at]),
            "polysemantic_true": _mean([float(r["n_true"] > 1) for r in at]),
            "polysemantic_measured": _mean([float(r["n_clusters"] > 1) for r in at]),
            "mean_ari": _mean([r["ari"] for r in with_examples]),
            "mean_abs_error": _mean([abs(r["n_clusters"] - r["n_true"]) for r in with_examples]),
            "mean_error": _mean([r["n_clusters"] - r["n_true"] for r in with_examples]),
        })
    out = pa.Table.from_pylist(per_sparsity)
    write_parquet(out, out_table, provenance("toy_recovery", {"method": choice["method"],
                                                              "threshold": choice["threshold"]}))
    result = {"choice": choice, "candidates": candidates, "by_sparsity": per_sparsity,
              "rule": "highest mean ARI over every toy neuron with >= 2 examples; ties (within 0.005) to the smaller "
                      "mean |clusters - true features|, then to the lower threshold"}
    write_json(result, out_choice)
    _plot_toys(candidates, per_sparsity, choice, out_png)
    return {"method": choice["method"], "threshold": choice["threshold"], "mean_ari": choice["mean_ari"]}


def _plot_toys(candidates, per_sparsity, choice, out_png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .storage import atomic_path

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6), dpi=100)
    for method, colour in (("threshold_graph", "#4c72b0"), ("agglomerative", "#dd8452")):
        pts = [c for c in candidates if c["method"] == method]
        if pts:
            axes[0].plot([c["threshold"] for c in pts], [c["mean_ari"] for c in pts], "o-", color=colour, label=f"{method}: ARI")
            axes[0].plot([c["threshold"] for c in pts], [c["polysemantic_agreement"] for c in pts], "x--", color=colour,
                         alpha=0.6, label=f"{method}: poly. agreement")
    axes[0].axvline(choice["threshold"], color="#888", linestyle=":")
    axes[0].set(title="recovery against the clustering threshold", xlabel="cosine-similarity threshold", ylim=(-0.05, 1.05))
    axes[0].legend(fontsize=7)
    styles = ["-", "--", ":", "-."]
    for index, input_dim in enumerate(sorted({r["input_dim"] for r in per_sparsity})):
        rows = [r for r in per_sparsity if r["input_dim"] == input_dim]
        s, ls = [r["sparsity"] for r in rows], styles[index % len(styles)]
        kind = "x = f" if input_dim == 0 else f"x = E f, {input_dim} dims"
        axes[1].plot(s, [r["mean_ari"] for r in rows], "o" + ls, color="#4c72b0", label=f"ARI ({kind})")
        axes[1].plot(s, [r["mean_abs_error"] for r in rows], "s" + ls, color="#c44e52", label=f"|error| ({kind})")
        axes[2].plot(s, [r["polysemantic_true"] for r in rows], "o" + ls, color="#55a868", label=f"true ({kind})")
        axes[2].plot(s, [r["polysemantic_measured"] for r in rows], "s" + ls, color="#8172b2", alpha=0.7,
                     label=f"measured ({kind})")
    axes[1].set(title=f"recovery against sparsity ({choice['method']}, {choice['threshold']})", xlabel="input sparsity",
                ylabel="ARI; |clusters - true features|")
    axes[1].legend(fontsize=7)
    axes[2].set(title="polysemantic neurons against sparsity", xlabel="input sparsity", ylabel="share of neurons",
                ylim=(-0.05, 1.05))
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
