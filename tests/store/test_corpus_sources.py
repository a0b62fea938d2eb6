"""Every source kind yields exactly its documents, from any start, with one fingerprint per content."""

import gzip
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from neox_lab.store.sources import Documents, DocumentStream, load_documents

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")
datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()

# Lines of a .txt file cannot hold newlines and blank ones are skipped; other formats take any text.
line_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x0b\x0c\x1c\x1d\x1e"
                                  "\x85\u2028\u2029"), min_size=1, max_size=12).filter(str.strip)
any_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


def write_jsonl(path, texts, opener):
    with opener(path) as fh:
        for t in texts:
            fh.write((json.dumps({"text": t, "id": 1}) + "\n").encode())


def zst_writer(path):
    # Two frames, as the Pile's files and `zstd --rsyncable` have.
    class TwoFrames:
        def __init__(self):
            self.parts = []

        def write(self, data):
            self.parts.append(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            half = len(self.parts) // 2
            c = zstandard.ZstdCompressor()
            with open(path, "wb") as fh:
                fh.write(c.compress(b"".join(self.parts[:half])))
                fh.write(c.compress(b"".join(self.parts[half:])))
    return TwoFrames()


def write_parquet_folder(folder, texts, per_file=5, row_group=2):
    folder.mkdir()
    for n, a in enumerate(range(0, max(len(texts), 1), per_file)):
        table = pa.table({"text": texts[a : a + per_file], "n": list(range(len(texts[a : a + per_file])))})
        pq.write_table(table, folder / f"part-{n:03d}.parquet", row_group_size=row_group)


def sources(tmp_path, texts):
    """Every streamed kind holding `texts` (those a .txt file can hold, for the .txt kinds)."""
    out = {}
    write_jsonl(tmp_path / "a.jsonl", texts, lambda p: open(p, "wb"))
    out["jsonl"] = tmp_path / "a.jsonl"
    write_jsonl(tmp_path / "a.jsonl.gz", texts, lambda p: gzip.open(p, "wb"))
    out["jsonl.gz"] = tmp_path / "a.jsonl.gz"
    write_jsonl(tmp_path / "a.jsonl.zst", texts, zst_writer)
    out["jsonl.zst"] = tmp_path / "a.jsonl.zst"
    write_parquet_folder(tmp_path / "pq", texts)
    out["parquet"] = tmp_path / "pq"
    for n, a in enumerate(range(0, len(texts), 4)):  # the Pile's layout: a folder of .jsonl.zst files
        name = f"{n:02d}/part.jsonl.zst" if n % 2 else f"{n:02d}.jsonl.zst"  # sorted by path, subfolders too
        (tmp_path / "shards" / name).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(tmp_path / "shards" / name, texts[a : a + 4], zst_writer)
    out["jsonl.zst folder"] = tmp_path / "shards"
    ds = datasets.Dataset.from_dict({"text": texts})
    out["dataset"] = ds
    ds.save_to_disk(str(tmp_path / "saved"))
    out["dataset dir"] = tmp_path / "saved"
    out["iterable_dataset"] = ds.to_iterable_dataset(num_shards=min(3, max(len(texts), 1)))
    return out


@given(texts=st.lists(any_text, min_size=1, max_size=9), start=st.integers(0, 10))
def test_every_streamed_kind_yields_exactly_its_documents(tmp_path_factory, texts, start):
    tmp_path = tmp_path_factory.mktemp("src")
    want = Documents("texts", texts).sha256()
    for kind, source in sources(tmp_path, texts).items():
        docs = load_documents(source)
        assert isinstance(docs, DocumentStream), kind
        assert docs.n_documents == len(texts), kind
        assert docs.sha256() == want, kind  # the parsed content, whatever the format
        assert [t for _, t in docs.iter_docs()] == texts, kind
        assert list(docs.iter_docs(start)) == list(enumerate(texts))[start:], kind
        stop = start + 2
        assert list(docs.iter_docs(start, stop)) == list(enumerate(texts))[start:stop], kind


@given(texts=st.lists(line_text, min_size=1, max_size=9), start=st.integers(0, 10))
def test_text_lines_plain_and_compressed(tmp_path_factory, texts, start):
    tmp_path = tmp_path_factory.mktemp("txt")
    body = "\n\n".join(texts) + "\n"  # blank lines between documents are not documents
    (tmp_path / "a.txt").write_text(body, encoding="utf-8")
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as fh:
        fh.write(body)
    (tmp_path / "a.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(body.encode()))
    for name in ("a.txt", "a.txt.gz", "a.txt.zst"):
        docs = load_documents(tmp_path / name)
        assert docs.kind == name[2:]
        assert list(docs.iter_docs(start)) == list(enumerate(texts))[start:]
        assert docs.sha256() == Documents("texts", texts).sha256()


def test_an_iterator_is_read_once_from_its_start():
    docs = load_documents(iter(["a", "b", "c"]))
    assert docs.n_documents is None and docs.sha256() is None
    with pytest.raises(ValueError, match="read only once"):
        next(docs.iter_docs(1))
    assert list(docs.iter_docs()) == [(0, "a"), (1, "b"), (2, "c")]
    with pytest.raises(ValueError, match="read only once"):
        list(docs.iter_docs())
    with pytest.raises(ValueError, match="item 1 of the iterator is int"):
        list(load_documents(iter(["a", 5])).iter_docs())


def test_bad_records_name_file_row_and_field(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match=r"a\.parquet: no column 'text' \(columns: \['body'\]\)"):
        load_documents(tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": ["x", None]}), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match="row 1 of column 'text' is NoneType"):
        load_documents(tmp_path / "b.parquet")
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n{"text": 3}\n'))
    with pytest.raises(ValueError, match=r"c\.jsonl\.gz, line 2: field 'text' is int"):
        load_documents(tmp_path / "c.jsonl.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no \*\.parquet, \*\.jsonl"):
        load_documents(tmp_path / "empty")
    (tmp_path / "empty" / "a.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "empty" / "b.txt").write_text("a\n")
    with pytest.raises(ValueError, match="mixes corpus formats"):
        load_documents(tmp_path / "empty")
    with pytest.raises(ValueError, match="no column 'body'"):
        load_documents(datasets.Dataset.from_dict({"text": ["a"]}), text_field="body")


def test_every_kind_caches_the_same_store_as_a_list(tmp_path):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    from neox_lab import NeoXConfig, NeoXForCausalLM
    from neox_lab.store.writer import cache_dataset
    from neox_lab.tokenizer import NeoXTokenizer

    torch.manual_seed(0)
    model = NeoXForCausalLM(NeoXConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, max_position_embeddings=32)).eval()
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(30)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    model.tokenizer = NeoXTokenizer(backend, unk_token="[UNK]")
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{i}" for i in rng.integers(0, 30, rng.integers(1, 20))) for _ in range(11)]
    kw = dict(context_size=12, batch_size=3, shard_tokens=25, progress=False, packing=True)
    ref = cache_dataset(model, texts, ["blocks.0.hook_resid_post"], tmp_path / "ref", **kw)
    for kind, source in sources(tmp_path, texts).items():
        store = cache_dataset(model, source, ["blocks.0.hook_resid_post"], tmp_path / kind.replace(" ", "_"), **kw)
        for name in ("token_ids", "doc_ids", "positions", "blocks.0.hook_resid_post"):
            assert torch.equal(store[name][:], ref[name][:]), (kind, name)
        assert store.manifest["source"]["documents_sha256"] == ref.manifest["source"]["documents_sha256"]
