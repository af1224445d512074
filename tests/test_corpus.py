"""Corpus: documents from .txt / .jsonl / .parquet, cut into windows, written as deterministic shards."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from neuron_embeddings import corpus, schemas
from neuron_embeddings.corpus import CorpusSettings, build_corpus, cut_windows
from neuron_embeddings.errors import PipelineError

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a journey of a thousand miles begins with a single step",
    "def add ( a , b ) : return a + b",
    "to be or not to be that is the question",
    "all that glitters is not gold",
]

# ---------------------------------------------------------------------------------------------------------------
# fixtures: an offline tokenizer and a small corpus in three formats


def _make_tokenizer(with_bos: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator(SENTENCES, trainer)
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    if with_bos:
        special["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


@pytest.fixture(scope="module")
def tokenizer():
    tok = _make_tokenizer()
    assert tok.bos_token_id == 1 and tok.pad_token_id == 0
    return tok


def _write_sources(root: Path) -> list[dict]:
    txt = root / "txt"
    txt.mkdir(parents=True)
    # written out of name order: the glob is sorted, so creation order never matters
    (txt / "b.txt").write_text(" ".join(SENTENCES[:3]))
    (txt / "a.txt").write_text(SENTENCES[3] + " " + SENTENCES[4])
    (txt / "c.txt").write_text("  \n\t ")  # whitespace only: skipped
    (txt / "d.txt").write_text("the dog")  # two tokens
    lines = [
        json.dumps({"text": SENTENCES[1] + " " + SENTENCES[0], "id": 1}),
        "",  # blank lines are skipped
        json.dumps({"text": "the fox", "meta": {"x": 1}}),
        json.dumps({"text": "   "}),  # whitespace-only document: skipped
        json.dumps({"text": SENTENCES[2] * 1}),
    ]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(
        pa.table({"id": [0, 1, 2, 3], "text": [SENTENCES[4], "gold", None, SENTENCES[3] + " " + SENTENCES[4]]}),
        root / "docs.parquet",
    )
    return [
        {"path": str(txt / "*.txt")},
        {"path": str(root / "docs.jsonl")},
        {"path": str(root / "docs.parquet"), "text_field": "text"},
    ]


SETTINGS = CorpusSettings(window_tokens=6, n_shards=3, max_tokens=None, prepend_bos=True, min_window_tokens=2)
NAMES = ["0", "1", "2"]


def _read(out: Path, names=NAMES):
    docs = pq.read_table(out / "documents.parquet")
    shards = [pq.read_table(out / f"shard-{name}.parquet") for name in names]
    return docs, shards


# ---------------------------------------------------------------------------------------------------------------
# cut_windows


def test_cut_windows_with_bos():
    ids = list(range(10, 20))
    got = cut_windows(ids, window_tokens=4, bos=1, min_tokens=2)
    assert got == [(0, [1, 10, 11, 12]), (3, [1, 13, 14, 15]), (6, [1, 16, 17, 18])]  # tail [19] dropped
    got = cut_windows(ids, window_tokens=4, bos=1, min_tokens=1)
    assert got[-1] == (9, [1, 19])
    assert all(len(w) <= 4 for _, w in got)


def test_cut_windows_without_bos():
    ids = list(range(10))
    assert cut_windows(ids, 4, None, 2) == [(0, [0, 1, 2, 3]), (4, [4, 5, 6, 7]), (8, [8, 9])]
    assert cut_windows(ids, 4, None, 3) == [(0, [0, 1, 2, 3]), (4, [4, 5, 6, 7])]
    assert cut_windows(ids, 5, None, 5) == [(0, [0, 1, 2, 3, 4]), (5, [5, 6, 7, 8, 9])]


def test_cut_windows_short_and_empty():
    assert cut_windows([], 4, 1, 1) == []
    assert cut_windows([7], 4, 1, 2) == []
    assert cut_windows([7, 8], 4, 1, 2) == [(0, [1, 7, 8])]


def test_cut_windows_cover_the_document():
    ids = list(range(100, 137))
    for window, bos in ((8, 1), (8, None), (2, 1), (37, None)):
        got = cut_windows(ids, window, bos, 1)
        prefix = 1 if bos is not None else 0
        assert [i for _, w in got for i in w[prefix:]] == ids
        for offset, w in got:
            assert w[prefix:] == ids[offset : offset + len(w) - prefix]
            assert (w[0] == bos) if bos is not None else True
        assert [o for o, _ in got] == list(range(0, len(ids), window - prefix))


# ---------------------------------------------------------------------------------------------------------------
# build_corpus


def test_build_corpus_documents_and_windows(tmp_path, tokenizer):
    sources = _write_sources(tmp_path / "in")
    out = tmp_path / "out"
    summary = build_corpus(sources, tokenizer, SETTINGS, out, NAMES)
    docs, shards = _read(out)
    assert docs.schema.remove_metadata().equals(schemas.DOCUMENTS)
    for shard in shards:
        assert shard.schema.remove_metadata().equals(schemas.WINDOWS)

    root = tmp_path / "in"
    expected_docs = [
        ("path:" + str(root / "txt" / "*.txt"), str(root / "txt" / "a.txt"), SENTENCES[3] + " " + SENTENCES[4]),
        ("path:" + str(root / "txt" / "*.txt"), str(root / "txt" / "b.txt"), " ".join(SENTENCES[:3])),
        ("path:" + str(root / "txt" / "*.txt"), str(root / "txt" / "d.txt"), "the dog"),
        ("path:" + str(root / "docs.jsonl"), f"{root / 'docs.jsonl'}:1", SENTENCES[1] + " " + SENTENCES[0]),
        ("path:" + str(root / "docs.jsonl"), f"{root / 'docs.jsonl'}:3", "the fox"),
        ("path:" + str(root / "docs.jsonl"), f"{root / 'docs.jsonl'}:5", SENTENCES[2]),
        ("path:" + str(root / "docs.parquet"), f"{root / 'docs.parquet'}#0", SENTENCES[4]),
        # "#1" ("gold", one token) gives no window, so the run never sees it; "#3" is a copy of a.txt: dropped
    ]
    rows = docs.to_pylist()
    assert [r["document"] for r in rows] == list(range(len(expected_docs)))
    assert [(r["source"], r["origin"]) for r in rows] == [(s, o) for s, o, _ in expected_docs]
    doc_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for _, _, text in expected_docs]
    assert [r["n_tokens"] for r in rows] == [len(ids) for ids in doc_ids]
    assert 3 not in {i for ids in doc_ids for i in ids}  # every word is in the vocabulary: no <unk>

    windows = [w for shard in shards for w in shard.to_pylist()]
    # shards are contiguous blocks of the global window numbering, as even as possible
    assert [w["window"] for w in windows] == list(range(len(windows)))
    sizes = [shard.num_rows for shard in shards]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) > 0
    # each document's windows start with BOS and give back its tokens (a tail shorter than 2 is dropped)
    body = SETTINGS.window_tokens - 1
    for number, ids in enumerate(doc_ids):
        mine = [w for w in windows if w["document"] == number]
        assert all(w["n_prefix"] == 1 and w["input_ids"][0] == tokenizer.bos_token_id for w in mine)
        assert all(len(w["input_ids"]) <= SETTINGS.window_tokens for w in mine)
        assert [w["doc_start"] for w in mine] == list(range(0, body * len(mine), body))
        for w in mine:
            assert w["input_ids"][1:] == ids[w["doc_start"] : w["doc_start"] + body]
        rebuilt = [i for w in mine for i in w["input_ids"][1:]]
        kept = len(ids) if len(ids) % body == 0 or len(ids) % body >= 2 else len(ids) - len(ids) % body
        assert rebuilt == ids[:kept]
    assert [w["document"] for w in windows] == sorted(w["document"] for w in windows)  # corpus order

    assert {k: summary[k] for k in ("documents", "windows", "tokens", "duplicates_dropped", "sampled")} == {
        "documents": len(expected_docs),
        "windows": len(windows),
        "tokens": sum(len(w["input_ids"]) for w in windows),
        "duplicates_dropped": 1,
        "sampled": False,
    }
    assert summary["documents_read"] == len(expected_docs) + 2
    assert summary["sources"]["path:" + str(root / "docs.parquet")] == {"read": 3, "duplicates": 1, "documents": 1,
                                                                         "tokens": len(windows[-1]["input_ids"])}


def test_build_corpus_is_deterministic(tmp_path, tokenizer):
    sources = _write_sources(tmp_path / "in")
    build_corpus(sources, tokenizer, SETTINGS, tmp_path / "one", NAMES)
    build_corpus(sources, tokenizer, SETTINGS, tmp_path / "two", NAMES)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == ["documents.parquet", "shard-0.parquet", "shard-1.parquet", "shard-2.parquet", "summary.json"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == names  # no temporary files left behind
    for name in names:
        a, b = (tmp_path / "one" / name), (tmp_path / "two" / name)
        if name.endswith(".parquet"):
            assert pq.read_table(a).equals(pq.read_table(b))
            assert pq.read_schema(a).metadata == pq.read_schema(b).metadata
        assert a.read_bytes() == b.read_bytes()


def test_windows_do_not_depend_on_shard_count_or_file_times(tmp_path, tokenizer):
    sources = _write_sources(tmp_path / "in")
    build_corpus(sources, tokenizer, SETTINGS, tmp_path / "three", NAMES)
    single = CorpusSettings(**{**SETTINGS.__dict__, "n_shards": 1})
    build_corpus(sources, tokenizer, single, tmp_path / "one", ["all"])
    _, three = _read(tmp_path / "three")
    _, one = _read(tmp_path / "one", ["all"])
    assert [w for s in three for w in s.to_pylist()] == one[0].to_pylist()

    # rewrite the .txt inputs, same content, in another order: nothing changes
    txt = tmp_path / "in" / "txt"
    contents = {p.name: p.read_bytes() for p in txt.iterdir()}
    for name in sorted(contents, reverse=True):
        (txt / name).unlink()
        (txt / name).write_bytes(contents[name])
    build_corpus(sources, tokenizer, SETTINGS, tmp_path / "again", NAMES)
    for name in ("documents.parquet", "shard-0.parquet", "shard-1.parquet", "shard-2.parquet"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "three" / name).read_bytes()


def test_more_shards_than_windows_gives_empty_shards(tmp_path, tokenizer):
    (tmp_path / "one.txt").write_text("the dog")
    settings = CorpusSettings(window_tokens=6, n_shards=3, max_tokens=None, prepend_bos=True)
    summary = build_corpus([{"path": str(tmp_path / "one.txt")}], tokenizer, settings, tmp_path / "out", NAMES)
    assert summary["windows"] == 1
    _, shards = _read(tmp_path / "out")
    assert [s.num_rows for s in shards] == [1, 0, 0]


def test_prepend_bos_settings(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text(SENTENCES[0])
    source = [{"path": str(tmp_path / "a.txt")}]
    ids = tokenizer(SENTENCES[0], add_special_tokens=False)["input_ids"]
    for prepend, prefix in ((False, 0), ("auto", 1), (True, 1)):
        settings = CorpusSettings(window_tokens=4, n_shards=1, max_tokens=None, prepend_bos=prepend,
                                  min_window_tokens=1)
        out = tmp_path / f"out-{prepend}"
        build_corpus(source, tokenizer, settings, out, ["x"])
        rows = pq.read_table(out / "shard-x.parquet").to_pylist()
        assert {r["n_prefix"] for r in rows} == {prefix}
        assert [i for r in rows for i in r["input_ids"][prefix:]] == ids
        if prefix:
            assert {r["input_ids"][0] for r in rows} == {tokenizer.bos_token_id}
    no_bos = _make_tokenizer(with_bos=False)
    assert no_bos.bos_token_id is None
    auto = CorpusSettings(window_tokens=4, n_shards=1, max_tokens=None, prepend_bos="auto")
    build_corpus(source, no_bos, auto, tmp_path / "auto-none", ["x"])
    assert {r["n_prefix"] for r in pq.read_table(tmp_path / "auto-none" / "shard-x.parquet").to_pylist()} == {0}
    forced = CorpusSettings(window_tokens=4, n_shards=1, max_tokens=None, prepend_bos=True)
    with pytest.raises(PipelineError, match="prepend_bos"):
        build_corpus(source, no_bos, forced, tmp_path / "forced", ["x"])


def test_max_tokens_caps_the_corpus(tmp_path, tokenizer):
    sources = _write_sources(tmp_path / "in")
    settings = CorpusSettings(window_tokens=6, n_shards=2, max_tokens=20, prepend_bos=True)
    summary = build_corpus(sources, tokenizer, settings, tmp_path / "out", ["a", "b"])
    docs, shards = _read(tmp_path / "out", ["a", "b"])
    windows = [w for s in shards for w in s.to_pylist()]
    total = sum(len(w["input_ids"]) for w in windows)
    assert summary["tokens"] == total
    assert 20 <= total < 20 + settings.window_tokens  # stops at the first window that reaches the cap
    assert total - len(windows[-1]["input_ids"]) < 20
    assert docs.num_rows == max(w["document"] for w in windows) + 1  # no document read past the cap


def test_seed_and_max_documents(tmp_path, tokenizer):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i:02d}.txt").write_text(f"{SENTENCES[i % 5]} {SENTENCES[(i + 1 + i // 5) % 5]}")  # distinct
    source = {"path": str(folder / "*.txt"), "seed": 3, "max_documents": 5}
    settings = CorpusSettings(window_tokens=8, n_shards=1, max_tokens=None, prepend_bos=True)
    build_corpus([source], tokenizer, settings, tmp_path / "a", ["x"])
    build_corpus([dict(source)], tokenizer, settings, tmp_path / "b", ["x"])
    origins = pq.read_table(tmp_path / "a" / "documents.parquet").column("origin").to_pylist()
    assert origins == pq.read_table(tmp_path / "b" / "documents.parquet").column("origin").to_pylist()
    assert len(origins) == 5 and len(set(origins)) == 5
    assert origins != sorted(origins)  # shuffled (for this seed), not the first five in name order
    unseeded = {"path": str(folder / "*.txt"), "max_documents": 5}
    build_corpus([unseeded], tokenizer, settings, tmp_path / "c", ["x"])
    assert pq.read_table(tmp_path / "c" / "documents.parquet").column("origin").to_pylist() == [
        str(folder / f"{i:02d}.txt") for i in range(5)
    ]


def test_jsonl_custom_text_field(tmp_path, tokenizer):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"body": SENTENCES[0]}) + "\n" + json.dumps({"body": SENTENCES[1]}) + "\n")
    settings = CorpusSettings(window_tokens=8, n_shards=1, max_tokens=None, prepend_bos=True)
    summary = build_corpus([{"path": str(path), "text_field": "body"}], tokenizer, settings, tmp_path / "o", ["x"])
    assert summary["documents"] == 2


# ---------------------------------------------------------------------------------------------------------------
# errors: one PipelineError naming the file or key at fault, and nothing written


def _fails(tmp_path, tokenizer, sources, *fragments):
    out = tmp_path / "out"
    with pytest.raises(PipelineError) as info:
        build_corpus(sources, tokenizer, SETTINGS, out, NAMES)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "\n" not in message
    assert not out.exists() or not any(out.iterdir())
    return message


def test_glob_matching_nothing(tmp_path, tokenizer):
    pattern = str(tmp_path / "nothing" / "*.txt")
    _fails(tmp_path, tokenizer, [{"path": pattern}], "corpus.sources[0].path", pattern, "matches no file")


def test_missing_plain_path(tmp_path, tokenizer):
    good = tmp_path / "good.txt"
    good.write_text(SENTENCES[0])
    missing = str(tmp_path / "missing.txt")
    _fails(tmp_path, tokenizer, [{"path": str(good)}, {"path": missing}], "corpus.sources[1].path", missing)


def test_undecodable_txt(tmp_path, tokenizer):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"the dog \xff\xfe jumps")
    _fails(tmp_path, tokenizer, [{"path": str(bad)}], str(bad), "offset 8", "utf-8")


def test_undecodable_jsonl(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xc3\x28"}\n')
    _fails(tmp_path, tokenizer, [{"path": str(bad)}], str(bad), "utf-8")


def test_jsonl_line_that_is_not_json(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "the dog"}) + "\n\n" + '{"text": "the fox",\n')
    _fails(tmp_path, tokenizer, [{"path": str(bad)}], f"{bad}:3", "not valid JSON")


@pytest.mark.parametrize("line", ['{"body": "the dog"}', '{"text": 5}', '["the dog"]', '"the dog"'])
def test_jsonl_line_without_text_field(tmp_path, tokenizer, line):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "the fox"}) + "\n" + line + "\n")
    _fails(tmp_path, tokenizer, [{"path": str(bad)}], f"{bad}:2", "'text'")


def test_parquet_without_text_column(tmp_path, tokenizer):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"content": ["the dog"], "id": [1]}), bad)
    _fails(tmp_path, tokenizer, [{"path": str(bad)}], str(bad), "no column 'text'", "content")


def test_file_that_is_not_parquet(tmp_path, tokenizer):
    bad = tmp_path / "bad.parquet"
    bad.write_text("this is not parquet")
    _fails(tmp_path, tokenizer, [{"path": str(bad)}], str(bad), "not a readable Parquet file")


def test_unknown_file_format(tmp_path, tokenizer):
    bad = tmp_path / "data.csv"
    bad.write_text("text\nthe dog\n")
    _fails(tmp_path, tokenizer, [{"path": str(bad)}], "corpus.sources[0]", str(bad), "csv")


def test_whitespace_only_corpus(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("   \n\n\t")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": " \n "}) + "\n")
    sources = [{"path": str(tmp_path / "a.txt")}, {"path": str(tmp_path / "b.jsonl")}]
    _fails(tmp_path, tokenizer, sources, "corpus:", "no tokens")


def test_documents_all_shorter_than_min_window(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("dog")
    settings = CorpusSettings(window_tokens=6, n_shards=1, max_tokens=None, prepend_bos=True, min_window_tokens=2)
    with pytest.raises(PipelineError, match="min_window_tokens=2"):
        build_corpus([{"path": str(tmp_path / "a.txt")}], tokenizer, settings, tmp_path / "out", ["x"])


def test_unknown_builtin(tmp_path, tokenizer):
    _fails(tmp_path, tokenizer, [{"builtin": "no-such-corpus"}], "corpus.sources[0].builtin", "no-such-corpus",
           "fortunes", "python-stdlib")


def test_source_without_a_kind(tmp_path, tokenizer):
    _fails(tmp_path, tokenizer, [{"text_field": "text"}], "corpus.sources[0]", "'path'", "'builtin'")


def test_iter_documents_is_lazy_and_ordered(tmp_path):
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b.txt").write_text("second")
    docs = list(corpus.iter_documents([{"path": str(tmp_path / "b.txt")}, {"path": str(tmp_path / "*.txt")}]))
    assert [(d.source, d.text) for d in docs] == [
        (f"path:{tmp_path / 'b.txt'}", "second"),
        (f"path:{tmp_path / '*.txt'}", "first"),
        (f"path:{tmp_path / '*.txt'}", "second"),
    ]


@pytest.mark.parametrize(
    "separator", ["\u2028", "\u2029", "\x85"], ids=["U+2028", "U+2029", "U+0085"]
)
def test_jsonl_text_with_unicode_line_separators(tmp_path, separator):
    """JSON allows raw U+2028, U+2029 and U+0085 inside strings (json.dumps(..., ensure_ascii=False) writes
    them unescaped); JSON Lines records are separated by '\\n' only, so such a record is one document."""
    path = tmp_path / "u.jsonl"
    first = f"the dog{separator}the fox"
    path.write_text(
        json.dumps({"text": first}, ensure_ascii=False) + "\n" + json.dumps({"text": "gold"}) + "\n",
        encoding="utf-8",
    )
    docs = list(corpus.iter_documents([{"path": str(path)}]))
    assert [(d.origin, d.text) for d in docs] == [(f"{path}:1", first), (f"{path}:2", "gold")]
