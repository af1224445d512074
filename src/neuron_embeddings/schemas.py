"""Every Parquet table the pipeline writes, defined once. The README's column tables mirror this file.

Fixed-size list columns (`embedding`, `pre_activations`, `biases`) take their width from the model, so the
schemas here fix the value type and the functions below fix the width for one file.
"""

from __future__ import annotations

import pyarrow as pa

# corpus/documents.parquet: one row per document that was read.
DOCUMENTS = pa.schema(
    [
        pa.field("document", pa.int64(), nullable=False),  # index in corpus order, 0-based
        pa.field("source", pa.string(), nullable=False),  # which config source it came from
        pa.field("origin", pa.string(), nullable=False),  # file path (and entry) or dataset row
        pa.field("n_tokens", pa.int32(), nullable=False),  # tokens of the document, without BOS
    ]
)

# corpus/shard-{shard}.parquet: the model's inputs, fixed-length windows cut from documents.
WINDOWS = pa.schema(
    [
        pa.field("window", pa.int64(), nullable=False),  # global window index; global token = window*T + pos
        pa.field("document", pa.int64(), nullable=False),
        pa.field("doc_start", pa.int32(), nullable=False),  # document token offset of the first real token
        pa.field("n_prefix", pa.int8(), nullable=False),  # 1 when a BOS token was put in front, else 0
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),  # unpadded; length <= window_tokens
    ]
)

_F32_LIST = pa.list_(pa.float32(), 1)  # placeholder width; see embeddings_schema

# embeddings/layer-{layer}.parquet: one row per (neuron, example).
EMBEDDINGS = pa.schema(
    [
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("neuron", pa.int32(), nullable=False),
        pa.field("expert", pa.int32(), nullable=True),  # mixture of experts: the unit's expert (n_experts = shared); null if dense
        pa.field("example_rank", pa.int16(), nullable=False),  # 0 = strongest example of this neuron
        pa.field("sample", pa.string(), nullable=False),  # which selection chose it: top_k, threshold, quantile-<bin>
        pa.field("token_index", pa.int64(), nullable=False),  # global token id = window*window_tokens + pos
        pa.field("document", pa.int64(), nullable=False),
        pa.field("doc_position", pa.int32(), nullable=False),  # token position inside the document
        pa.field("token_id", pa.int32(), nullable=False),
        pa.field("token", pa.string(), nullable=False),  # decoded text of the max-activating token
        pa.field("activation", pa.float32(), nullable=False),  # the neuron's activation there, with its sign
        pa.field("pre_activations", _F32_LIST, nullable=False),  # per input projection, as the model computed
        pa.field("biases", _F32_LIST, nullable=False),  # per input projection (0 where the layer has none)
        pa.field("embedding", _F32_LIST, nullable=False),  # x * w per projection, concatenated
        pa.field("context_tokens", pa.list_(pa.string()), nullable=False),  # window around the max token
        pa.field("context_activations", pa.list_(pa.float32()), nullable=False),  # the neuron, per context token
        pa.field("context_center", pa.int16(), nullable=False),  # index of the max token in the context
    ]
)

# clusters/layer-{layer}.parquet: one row per (neuron, example).
CLUSTERS = pa.schema(
    [
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("neuron", pa.int32(), nullable=False),
        pa.field("expert", pa.int32(), nullable=True),  # mixture of experts: the unit's expert (n_experts = shared); null if dense
        pa.field("example_rank", pa.int16(), nullable=False),
        pa.field("cluster", pa.int32(), nullable=False),  # 0 = largest cluster of this neuron; -1: none (dead unit)
        pa.field("cluster_size", pa.int32(), nullable=False),
        pa.field("is_central", pa.bool_(), nullable=False),  # highest mean similarity to its cluster
        pa.field("mean_similarity", pa.float32(), nullable=False),  # to the rest of its cluster (1 if alone; NaN: none)
    ]
)

# metrics/layer-{layer}.parquet: one row per unit of the layer (every neuron), with its status.
METRICS = pa.schema(
    [
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("neuron", pa.int32(), nullable=False),
        pa.field("expert", pa.int32(), nullable=True),  # mixture of experts: the unit's expert (n_experts = shared); null if dense
        pa.field("status", pa.string(), nullable=False),  # live, few_examples (< metrics.min_examples) or dead
        pa.field("size", pa.int32(), nullable=False),  # number of examples
        pa.field("duplicates", pa.int32(), nullable=False),  # examples dropped as copies of a kept context window
        pa.field("n_clusters", pa.int32(), nullable=False),  # 0 for a dead unit
        pa.field("largest_cluster_share", pa.float32(), nullable=False),
        pa.field("mean_distance", pa.float32(), nullable=True),  # mean pairwise cosine distance; null if size < 2
        pa.field("max_distance", pa.float32(), nullable=True),
        pa.field("mean_intra_distance", pa.float32(), nullable=True),  # null when no cluster has two examples
        pa.field("mean_inter_distance", pa.float32(), nullable=True),  # null when there is one cluster
        pa.field("ari_token", pa.float32(), nullable=True),  # ARI of the clusters with the max tokens' ids
        pa.field("single_token_cluster_share", pa.float32(), nullable=True),  # clusters whose examples share one token
        pa.field("n_clusters_input", pa.int32(), nullable=True),  # the same clustering of x alone (no weights)
        pa.field("ari_input", pa.float32(), nullable=True),  # ARI of the x * w clusters with the x-only clusters
        pa.field("stability", pa.float32(), nullable=True),  # mean ARI with reclustered subsets of the examples
        pa.field("max_activation", pa.float32(), nullable=False),  # over all cached tokens
        pa.field("min_activation", pa.float32(), nullable=False),  # over all cached tokens
        pa.field("mean_activation", pa.float32(), nullable=False),
        pa.field("frac_positive", pa.float32(), nullable=False),
    ]
)


def embeddings_schema(n_projections: int, d_model: int) -> pa.Schema:
    """EMBEDDINGS with the fixed-size list widths of one model."""
    widths = {"pre_activations": n_projections, "biases": n_projections, "embedding": n_projections * d_model}
    fields = [
        pa.field(f.name, pa.list_(pa.float32(), widths[f.name]), nullable=False) if f.name in widths else f
        for f in EMBEDDINGS
    ]
    return pa.schema(fields)

# importance/layer-{layer}.parquet: token importance, one row per (neuron, example) the explorer shows with it.
# List j is context position j of the embeddings row (context_tokens[j]), from its first token to the max token.
IMPORTANCE = pa.schema(
    [
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("neuron", pa.int32(), nullable=False),
        pa.field("example_rank", pa.int16(), nullable=False),
        pa.field("token_index", pa.int64(), nullable=False),
        pa.field("activation", pa.float32(), nullable=False),  # recomputed, nothing padded
        pa.field("masked_activations", pa.list_(pa.float32()), nullable=False),  # at the max token, token j padded
        pa.field("importance", pa.list_(pa.float32()), nullable=False),  # drop / normaliser, clipped to [0, 1]
        pa.field("normaliser", pa.float32(), nullable=False),  # the max token's own drop (see importance.py)
    ]
)

# similar/layer-{layer}.parquet: per feature cluster, the most similar clusters of other neurons of the layer.
SIMILAR = pa.schema(
    [
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("neuron", pa.int32(), nullable=False),
        pa.field("cluster", pa.int32(), nullable=False),
        pa.field("rank", pa.int16(), nullable=False),  # 0 = most similar
        pa.field("other_neuron", pa.int32(), nullable=False),
        pa.field("other_cluster", pa.int32(), nullable=False),
        pa.field("similarity", pa.float32(), nullable=False),  # cosine of the central examples' MLP inputs x
    ]
)

# sweep/layer-{layer}.parquet: clusters per neuron at each threshold of the sweep.
SWEEP = pa.schema(
    [
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("neuron", pa.int32(), nullable=False),
        pa.field("threshold", pa.float32(), nullable=False),
        pa.field("n_clusters", pa.int32(), nullable=False),
    ]
)
