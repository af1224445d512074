from transformers import AutoTokenizer

from neuron_embeddings.corpus import CorpusSettings, build_corpus
from neuron_embeddings.runner import run_stage

corpus = snakemake.params.corpus
settings = CorpusSettings(
    window_tokens=corpus["window_tokens"],
    n_shards=corpus["n_shards"],
    max_tokens=corpus.get("max_tokens"),
    prepend_bos=corpus["prepend_bos"],
    min_window_tokens=corpus["min_window_tokens"],
    seed=corpus["seed"],
)


def main():
    tokenizer = AutoTokenizer.from_pretrained(snakemake.input.model)
    out_dir = snakemake.output.documents.rsplit("/", 1)[0]
    return build_corpus(corpus["sources"], tokenizer, settings, out_dir, snakemake.params.shard_names)


run_stage("tokenize_corpus", main, snakemake.log[0])
