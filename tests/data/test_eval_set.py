"""The eval set: data.eval_sources read whole and finite, the same windows on any world size, true byte counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data_helpers import doc_tags, make_cfg, make_docs, write_jsonl
from tokenmill.data.loader import BatchLoader, build_loader
from tokenmill.data.mixture import is_eval_doc
from tokenmill.data.packing import doc_ids_of
from tokenmill.data.prepare import prepare_documents
from tokenmill.data.tokenizer import Tokenizer, train_bpe
from tokenmill.errors import UserError
from tokenmill.model import build_model
from tokenmill.model.config import ModelConfig

TOK = Tokenizer.byte()
SEQ = 31


@pytest.fixture()
def corpus(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_docs(300, "t", max_words=20))
    val = write_jsonl(tmp_path / "val.jsonl", make_docs(60, "v", seed=9, max_words=20))
    return str(train), str(val)


def hand_windows(docs, world):
    """The eval set packed by hand: each document's bytes + EOS, cut into windows, whole groups of `world`."""
    stream = [t for d in docs for t in list(d.encode()) + [TOK.eos_id]]
    n = len(stream) // (SEQ + 1) // world * world
    return torch.tensor(stream[: n * (SEQ + 1)]).view(n, SEQ + 1)


def documents_in_order(loader):
    """The complete documents of an unshuffled stream, in order."""
    stream = [t for b in loader for row in b["tokens"].tolist() for t in row]
    docs, start = [], 0
    for i, t in enumerate(stream):
        if t == TOK.eos_id:
            docs.append(TOK.decode(stream[start:i]))
            start = i + 1
    return docs


def rows(loader):
    return [tuple(r) for b in loader for r in b["tokens"].tolist()]


def test_two_ranks_cover_the_eval_set_exactly_once(corpus):
    train, val = corpus
    cfg = make_cfg([train], seq_len=SEQ, batch=4, eval_sources=[val])
    expected = [tuple(r) for r in hand_windows(make_docs(60, "v", seed=9, max_words=20), 2).tolist()]
    per_rank = [list(build_loader(cfg, TOK, "eval", rank, 2)) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])  # the same number of batches: no rank waits alone
    got = [tuple(r) for batches in per_rank for b in batches for r in b["tokens"].tolist()]
    assert sorted(got) == sorted(expected) and len(set(got)) == len(got)  # every window once, none missing
    assert rows(per_rank[0]) == expected[0::2]  # rank r keeps window r of each group of 2
    single = rows(build_loader(cfg, TOK, "eval", 0, 1))
    assert single[: len(expected)] == expected and len(single) - len(expected) <= 1  # world size changes nothing
    loader = build_loader(cfg, TOK, "eval", 0, 2)
    assert isinstance(loader, BatchLoader)
    assert rows(loader) == rows(loader)  # finite, and every pass starts over


def test_eval_loss_over_the_loader_equals_the_loss_by_hand(corpus):
    train, val = corpus
    cfg = make_cfg([train], seq_len=SEQ, batch=4, eval_sources=[val])
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, vocab_size=TOK.vocab_size, max_seq_len=SEQ, ffn_hidden=48
        )
    ).eval()
    nats, targets = 0.0, 0
    with torch.no_grad():
        for rank in range(2):
            for batch in build_loader(cfg, TOK, "eval", rank, 2):
                nats += model.loss(batch["tokens"], batch["doc_ids"], reduction="sum").item()
                targets += batch["tokens"][:, 1:].numel()
        windows = hand_windows(make_docs(60, "v", seed=9, max_words=20), 2)
        doc_ids = doc_ids_of(windows, TOK.eos_id)
        logits = model(windows[:, :-1], doc_ids[:, :-1])
        by_hand = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    assert targets == windows[:, 1:].numel()
    assert nats / targets == pytest.approx(by_hand.item(), rel=1e-5)


def test_with_an_eval_set_training_reads_every_train_document_and_no_eval_one(corpus):
    train, val = corpus
    cfg = make_cfg([train], seq_len=SEQ, batch=4, eval_fraction=None, eval_sources=[val], shuffle=0)
    assert cfg.data.holdout_fraction() == 0.0  # unset: no hash split when an eval set is given
    read = documents_in_order(build_loader(cfg, TOK, "train", epochs=1))
    train_docs = make_docs(300, "t", max_words=20)
    assert set(read) <= set(train_docs)  # the training stream never holds an eval document ...
    assert len(read) == len(set(read)) >= 299  # ... and holds every train document (the cut-off tail aside)
    explicit = make_cfg([train], seq_len=SEQ, batch=4, eval_fraction=0.2, eval_sources=[val], shuffle=0)
    held = {f"t{i:05d}" for i, d in enumerate(make_docs(300, "t", max_words=20)) if is_eval_doc(d, 0.2)}
    tags = set().union(*(doc_tags(TOK.decode(r)) for r in rows(build_loader(explicit, TOK, "train", epochs=1))))
    assert held and not tags & held  # an explicit data.eval_fraction still holds those documents out
    assert {
        t[0] for t in set().union(*(doc_tags(TOK.decode(r)) for r in rows(build_loader(explicit, TOK, "eval"))))
    } == {"v"}  # ... while eval reads only the eval set


def test_without_an_eval_set_the_hash_split_is_the_eval_set(corpus):
    train, _ = corpus
    cfg = make_cfg([train], seq_len=SEQ, batch=4, eval_fraction=None)
    assert cfg.data.holdout_fraction() == 0.02
    docs = make_docs(300, "t", max_words=20)
    held = [d for d in docs if is_eval_doc(d, 0.2)]
    cfg = make_cfg([train], seq_len=SEQ, batch=2, eval_fraction=0.2)
    assert rows(build_loader(cfg, TOK, "eval")) == [tuple(r) for r in hand_windows(held, 1).tolist()]


def test_token_bytes_count_the_text_exactly(corpus, tmp_path):
    train, val = corpus
    texts = make_docs(60, "v", seed=9, max_words=20) + ["ünïcödé ✓ 日本語 " * 3]
    bpe = train_bpe(texts, 300, progress=False)
    for tok in (TOK, bpe):
        table = torch.tensor(tok.token_bytes())
        assert table.shape == (tok.vocab_size,) and int(table[tok.eos_id]) == 0
        ids = tok.encode_batch(texts)
        assert sum(int(table[i].sum()) for i in map(torch.tensor, ids)) == sum(len(t.encode()) for t in texts)


def test_a_shards_folder_as_eval_set(tmp_path):
    docs = make_docs(200, "s", max_words=20)
    prepare_documents(
        docs, TOK, tmp_path / "shards", tokenizer_spec="byte", source="s", eval_fraction=0.2, shard_tokens=3000
    )
    prepare_documents(
        make_docs(50, "v", max_words=20),
        TOK,
        tmp_path / "val",
        tokenizer_spec="byte",
        source="v",
        eval_fraction=0.0,
        shard_tokens=3000,
    )
    same = make_cfg([str(tmp_path / "shards")], seq_len=SEQ, batch=4, eval_sources=[str(tmp_path / "shards")])
    tags = set().union(*(doc_tags(TOK.decode(r)) for r in rows(build_loader(same, TOK, "eval"))))
    held = {f"s{i:05d}" for i, d in enumerate(docs) if is_eval_doc(d, 0.2)}
    assert tags and tags <= held  # the training folder itself: only its eval split
    other = make_cfg([str(tmp_path / "shards")], seq_len=SEQ, batch=4, eval_sources=[str(tmp_path / "val")])
    got = rows(build_loader(other, TOK, "eval", 0, 1))  # another folder: all of it (here its train split)
    assert len(got) > 20 and {t[0] for t in set().union(*(doc_tags(TOK.decode(r)) for r in got))} == {"v"}


@pytest.mark.parametrize(
    "eval_sources, eval_fraction, message",
    [
        ([], 0.0, "there is no eval set"),
        (["missing.jsonl"], None, "no such file or folder"),
    ],
)
def test_bad_eval_settings_fail_at_set_up_in_one_line(corpus, eval_sources, eval_fraction, message):
    train, _ = corpus
    cfg = make_cfg([train], eval_fraction=eval_fraction, eval_sources=eval_sources)
    with pytest.raises(UserError, match=message) as err:
        build_loader(cfg, TOK, "eval")
    assert "\n" not in str(err.value)


def test_an_eval_set_smaller_than_one_window_per_rank_is_one_line(tmp_path, corpus):
    train, _ = corpus
    tiny = write_jsonl(tmp_path / "tiny.jsonl", ["a few words"])
    with pytest.raises(UserError, match="fewer than 2 windows of 32 tokens") as err:
        list(build_loader(make_cfg([train], seq_len=SEQ, eval_sources=[str(tiny)]), TOK, "eval", 1, 2))
    assert "\n" not in str(err.value)
