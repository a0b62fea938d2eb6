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


# ------------------------------------------------------------------ damaged files, links, exhausted iterators
def corpus_lines(n=20000):
    return "".join(json.dumps({"text": f"document {i} " * 4}) + "\n" for i in range(n)).encode()


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".txt.zst"])
def test_a_truncated_zst_names_the_file_and_the_byte(tmp_path, suffix):
    """zstandard's stream reader ends quietly inside a cut frame: the corpus read as a shorter one (a
    .txt.zst even without a broken last line), and a small cut file as "holds no documents"."""
    raw = corpus_lines()
    if suffix == ".txt.zst":
        raw = b"".join(json.loads(line)["text"].encode() + b"\n" for line in raw.splitlines())
    c = zstandard.ZstdCompressor()
    whole = c.compress(raw[: len(raw) // 2]) + c.compress(raw[len(raw) // 2 :])  # two frames
    path = tmp_path / f"cut{suffix}"
    cut = len(whole) - 1000
    path.write_bytes(whole[:cut])
    second_frame = len(c.compress(raw[: len(raw) // 2]))
    with pytest.raises(ValueError, match=rf"cut{suffix}.* truncated: it ends at byte {cut} inside the zstd frame "
                                         rf"that starts at byte {second_frame}"):
        load_documents(path)
    small = tmp_path / f"small{suffix}"
    small.write_bytes(c.compress(raw[:500])[:30])
    with pytest.raises(ValueError, match=rf"small{suffix}.* truncated: it ends at byte 30"):
        load_documents(small)
    # Damage inside a frame shows where the frame has a content checksum (zstd's command line writes one).
    checked = zstandard.ZstdCompressor(write_checksum=True).compress(raw)
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(checked[:100] + bytes(b ^ 0xA5 for b in checked[100:164]) + checked[164:])
    with pytest.raises(ValueError, match=rf"garbage{suffix} is corrupt: zstd cannot decode the frame that starts "
                                         r"at byte 0 \(.*checksum"):
        load_documents(garbage)


def test_a_truncated_or_corrupt_gz_names_the_file_and_the_byte(tmp_path):
    data = gzip.compress(corpus_lines())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"cut\.jsonl\.gz is truncated \(reading stopped at byte {len(data) // 2}\)"):
        load_documents(cut)
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(data[:2000] + bytes(b ^ 0x55 for b in data[2000:2100]) + data[2100:])
    with pytest.raises(ValueError, match=r"bad\.txt\.gz is corrupt \(reading stopped at byte \d+\)"):
        load_documents(bad)


def test_a_truncated_or_corrupt_parquet_names_the_file_and_the_row_group(tmp_path):
    pq.write_table(pa.table({"text": [f"document {i} " * 8 for i in range(5000)]}), tmp_path / "ok.parquet",
                   row_group_size=1000)
    raw = (tmp_path / "ok.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=rf"cut\.parquet \({len(raw) // 2} bytes\) is not a readable Parquet file"):
        load_documents(tmp_path / "cut.parquet")
    meta = pq.ParquetFile(tmp_path / "ok.parquet").metadata.row_group(2).column(0)
    first = meta.dictionary_page_offset if meta.has_dictionary_page else meta.data_page_offset
    at = first + meta.total_compressed_size // 2
    damaged = bytearray(raw)
    damaged[at : at + 64] = b"\xff" * 64
    (tmp_path / "bad.parquet").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=rf"bad\.parquet is corrupt: row group 2, column 'text' \(bytes {first}\.\."
                                         rf"{first + meta.total_compressed_size}\)"):
        load_documents(tmp_path / "bad.parquet")


def test_symlinked_folders_and_files_are_read_alike_and_what_is_left_out_is_named(tmp_path):
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    for i in range(5):
        (outside / "sub" / f"d{i}.txt").write_text(f"linked folder document {i}\n")
    (outside / "single.txt").write_text("linked file document\n")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"a{i}.txt").write_text(f"own document {i}\n")
    (corpus / "linked_dir").symlink_to(outside / "sub", target_is_directory=True)
    (corpus / "linked_file.txt").symlink_to(outside / "single.txt")
    docs = load_documents(corpus)
    assert docs.n_documents == 11  # 5 own + 5 through the linked folder + 1 through the linked file
    (corpus / "again").symlink_to(outside / "sub", target_is_directory=True)  # the same folder twice
    (corpus / "README.md").write_text("not a corpus file\n")
    with pytest.warns(UserWarning, match=r"reading 11 txt file\(s\); 2 entries are left out: .*(again|linked_dir) "
                                         r"\(the folder .*sub again\); .*README\.md \(not a corpus file\)"):
        assert load_documents(corpus).n_documents == 11
    (corpus / "dangling.txt").symlink_to(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match=r"dangling\.txt is a symbolic link to .*missing\.txt.*does not exist"):
        load_documents(corpus)


def test_an_exhausted_iterator_is_refused_like_an_empty_list(tmp_path):
    from neox_lab import NeoXConfig, NeoXForCausalLM
    from neox_lab.store.writer import cache_dataset
    from neox_lab.tokenizer import NeoXTokenizer

    model = NeoXForCausalLM(NeoXConfig(vocab_size=50304, hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32)).eval()
    texts = iter(["def f(x):", "return x"])
    list(texts)
    with pytest.raises(ValueError, match=r"iterator yields no documents \(is it already exhausted\?\)"):
        cache_dataset(model, texts, ["hook_embed"], tmp_path / "out", tokenizer=NeoXTokenizer.default(),
                      progress=False)
    assert not (tmp_path / "out").exists()
    store = cache_dataset(model, iter(["def f(x):", "return x"]), ["hook_embed"], tmp_path / "ok",
                          tokenizer=NeoXTokenizer.default(), progress=False)
    assert store.n_documents == 2


def test_the_cli_names_a_damaged_corpus_and_exits_2(tmp_path, capsys):
    from neox_lab.cli import main

    data = gzip.compress(corpus_lines(2000))
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "cut.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(corpus_lines(2000))[:-100])
    for name in ("cut.jsonl.gz", "cut.jsonl.zst"):
        args = ["cache", "--data", str(tmp_path / name), "--hooks", "hook_embed", "--out", str(tmp_path / name[4:]),
                "--no-progress"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("neox-lab cache: error: data file ") and f"{name} is truncated" in err, err
        assert "Traceback" not in err
