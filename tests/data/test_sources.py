"""Sources: stdlib, local files in the Hub datasets' schemas, slots, resume positions, bad inputs."""

from __future__ import annotations

import json

import pytest

from data_helpers import make_docs, write_jsonl, write_parquet
from tokenmill.data.sources import HUB_SHORTCUTS, ArrowSource, StdlibSource, open_source
from tokenmill.data.streams import StreamSource
from tokenmill.errors import UserError


def read_all(source, slot=0, n_slots=1, epoch=0, seed=None, position=None):
    reader = source.reader(epoch, slot, n_slots, position, seed)
    return list(reader), reader


def test_stdlib_is_sorted_python_files_one_doc_each():
    src = open_source("stdlib")
    assert isinstance(src, StdlibSource)
    assert len(src) > 100 and src.files == sorted(src.files)
    assert all(f.suffix == ".py" for f in src.files)
    assert not any(part in ("site-packages", "test", "tests") for f in src.files for part in f.parts[-4:-1])
    first = src.files[0].read_text(encoding="utf-8", errors="replace")
    assert next(iter(src.reader(0, 0, 1, None, None))) == first


def test_stdlib_slots_are_disjoint_and_cover_everything():
    src = StdlibSource()
    every, _ = read_all(src, seed=7)
    parts = [read_all(src, slot, 3, seed=7)[0] for slot in range(3)]
    assert sum(map(len, parts)) == len(every)
    assert sorted(d for p in parts for d in p) == sorted(every)
    assert parts[1][0] == every[1]  # slot s reads raw indices s, s+3, ...
    other_epoch, _ = read_all(src, epoch=1, seed=7)
    assert other_epoch != every and sorted(other_epoch) == sorted(every)  # each epoch has its own order


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", ["jsonl", "parquet", "disk", "txt-folder"])
def test_local_formats_read_every_document_in_order(tmp_path, kind, stream):
    docs = make_docs(50)
    if kind == "jsonl":
        path = write_jsonl(tmp_path / "fineweb.jsonl", docs)
    elif kind == "parquet":
        path = write_parquet(tmp_path / "fineweb.parquet", docs)
    elif kind == "disk":
        import datasets

        path = tmp_path / "saved"
        datasets.Dataset.from_list([{"text": d, "id": i} for i, d in enumerate(docs)]).save_to_disk(str(path))
    else:
        path = tmp_path / "txt"
        path.mkdir()
        for i, d in enumerate(docs):
            (path / f"{i:03d}.txt").write_text(d + "\nsecond line\n")
        docs = [d + "\nsecond line\n" for d in docs]
    src = open_source(str(path), stream_local=stream)
    assert isinstance(src, StreamSource if stream and kind != "disk" else ArrowSource)
    got, reader = read_all(src)
    assert got == docs
    assert reader.position["index"] == len(docs)
    assert reader.counts.read == len(docs) and reader.counts.null == 0


@pytest.mark.parametrize("stream", [False, True])
def test_single_txt_file_is_one_document_per_line(tmp_path, stream):
    (tmp_path / "lines.txt").write_text("first doc\n\nsecond doc\nthird doc\n")
    got, reader = read_all(open_source(str(tmp_path / "lines.txt"), stream_local=stream))
    assert got == ["first doc", "second doc", "third doc"]
    assert reader.counts.empty == 1


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_stream_position_resumes_exactly_and_slots_split(tmp_path, kind):
    docs = make_docs(300)
    path = (
        write_jsonl(tmp_path / "d.jsonl", docs)
        if kind == "jsonl"
        else write_parquet(tmp_path / "d.parquet", docs, row_group_size=37)
    )
    src = open_source(str(path), stream_local=True)
    reader = src.reader(0, 1, 2, None, None)
    head = [next(reader) for _ in range(40)]
    position = json.loads(json.dumps(reader.position))  # plain data
    rest = list(reader)
    if kind == "jsonl":  # one file for two slots: slot 1 keeps every second document
        assert head + rest == docs[1::2]
    else:  # 9 row groups of 37 rows for two slots: slot 1 reads row groups 1, 3, 5, 7 whole
        assert head + rest == [d for i, d in enumerate(docs) if (i // 37) % 2 == 1]
    resumed = src.reader(0, 1, 2, position, None)
    assert list(resumed) == rest
    again = src.reader(0, 1, 2, position, None)  # resuming twice from the same point
    [next(again) for _ in range(10)]
    third = src.reader(0, 1, 2, again.position, None)
    assert list(third) == rest[10:]


def test_streamed_multi_file_folder_reshuffles_file_order_per_epoch(tmp_path):
    for i in range(4):
        write_parquet(tmp_path / f"part{i}.parquet", make_docs(5, prefix=f"f{i}x"))
    src = open_source(str(tmp_path), stream_local=True)
    natural, _ = read_all(src)
    epoch0, _ = read_all(src, epoch=0, seed=3)
    epoch1, _ = read_all(src, epoch=1, seed=3)
    assert sorted(epoch0) == sorted(natural) == sorted(epoch1)
    assert epoch0 == read_all(src, epoch=0, seed=3)[0]
    assert epoch0 != epoch1  # a new file order each epoch (from seed, epoch)


def test_text_field_is_configurable(tmp_path):
    docs = make_docs(5)
    path = write_jsonl(tmp_path / "c.jsonl", docs, field="content")
    assert read_all(open_source(str(path), "content"))[0] == docs


def test_missing_text_field_lists_the_fields(tmp_path):
    path = write_parquet(tmp_path / "fw.parquet", make_docs(5))
    with pytest.raises(UserError) as err:
        open_source(str(path), "body")
    msg = str(err.value)
    assert "no text field 'body'" in msg and "\n" not in msg
    for column in ("text", "id", "dump", "url", "language_score", "int_score"):
        assert column in msg
    with pytest.raises(UserError, match="holds int, not text"):
        open_source(str(path), "int_score")


@pytest.mark.parametrize("stream", [False, True])
def test_non_utf8_bytes_are_replaced_and_counted(tmp_path, stream):
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok one"}\n{"text": "bad \xff\xfe here"}\n{"text": "ok"}\n')
    got, reader = read_all(open_source(str(tmp_path / "bad.jsonl"), stream_local=stream))
    assert len(got) == 3 and "\ufffd" in got[1]
    assert reader.counts.replaced_docs == 1 and reader.counts.replaced_chars >= 1
    (tmp_path / "bad.txt").write_bytes(b"fine\nbroken \xff line\n")
    got, reader = read_all(open_source(str(tmp_path / "bad.txt"), stream_local=stream))
    assert got == ["fine", "broken \ufffd line"] and reader.counts.replaced_chars == 1


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing.jsonl", "no such file or folder"),
        (lambda p: (p / "empty.jsonl").write_text("") and p / "empty.jsonl" or p / "empty.jsonl", "empty"),
        (lambda p: (p / "emptydir").mkdir() or p / "emptydir", "no .txt, .jsonl or .parquet files"),
        (lambda p: (p / "x.csv").write_text("a,b\n") and p / "x.csv", "unknown file type"),
    ],
)
def test_bad_local_sources_give_one_line(tmp_path, make, message):
    with pytest.raises(UserError, match=message) as err:
        open_source(str(make(tmp_path)))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["fineweb-edu", "smollm-cosmopedia", "HuggingFaceFW/fineweb-edu@sample-10BT"])
def test_hub_sources_offline_give_one_line(name):
    with pytest.raises(UserError, match="offline") as err:
        open_source(name)
    assert "\n" not in str(err.value) and "local path" in str(err.value)


def test_hub_shortcuts_name_real_datasets():
    assert HUB_SHORTCUTS["fineweb-edu"].repo == "HuggingFaceFW/fineweb-edu"
    assert HUB_SHORTCUTS["fineweb-edu"].config == "sample-10BT"
    assert HUB_SHORTCUTS["fineweb-edu-100b-shuffle"].repo == "karpathy/fineweb-edu-100b-shuffle"
    assert all("/" in hub.repo for hub in HUB_SHORTCUTS.values())


def test_shards_folder_is_not_a_text_source(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(UserError, match="pre-tokenized shards"):
        open_source(str(tmp_path))
