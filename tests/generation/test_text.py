"""TextStream: incremental decoding never shows half a character, stop strings are found on decoded text (also
across tokens and with overlapping prefixes) and never shown in part."""

from __future__ import annotations

import torch
from gen_helpers import BYTE

from tokenmill.generation.text import TextStream


def feed(stream: TextStream, ids: list[int]) -> list[str]:
    return [stream.add(i) for i in ids]


def test_multibyte_characters_wait_for_their_last_byte():
    stream = TextStream(BYTE.decode)
    deltas = feed(stream, list("é🙂".encode()))
    assert deltas == ["", "é", "", "", "", "🙂"]
    assert stream.flush() == "" and stream.text == "é🙂"


def test_an_unfinished_character_is_flushed_as_a_replacement():
    stream = TextStream(BYTE.decode)
    assert feed(stream, [ord("a"), 0xE2, 0x82]) == ["a", "", ""]
    assert stream.flush() == "\ufffd"


def test_stop_string_cuts_the_text_before_it():
    stream = TextStream(BYTE.decode, stop=("END",))
    shown = "".join(feed(stream, list(b"abc ENDxyz")))
    assert shown == "abc " and stream.stopped and stream.text == "abc "
    assert stream.add(ord("q")) == "" and stream.flush() == ""


def test_overlapping_stop_prefixes_are_matched():
    """'aab' inside 'aaab': a token-sequence matcher that resets on mismatch misses it."""
    stream = TextStream(BYTE.decode, stop=("aab",))
    assert "".join(feed(stream, list(b"xaaab"))) == "xa"
    assert stream.stopped


def test_held_back_text_is_shown_once_it_cannot_be_a_stop():
    stream = TextStream(BYTE.decode, stop=("<end>",))
    deltas = feed(stream, list(b"a<en!"))
    assert deltas == ["a", "", "", "", "<en!"]
    assert not stream.stopped


def test_earliest_of_several_stop_strings_wins():
    stream = TextStream(BYTE.decode, stop=("zz", "b"))
    assert "".join(feed(stream, list(b"abzz"))) == "a"


def test_stop_string_made_of_a_multibyte_character():
    stream = TextStream(BYTE.decode, stop=("é",))
    assert "".join(feed(stream, list("caféx".encode()))) == "caf"
    assert stream.stopped


def test_streamed_bpe_text_equals_decoding_everything_at_once():
    """Byte-level BPE splits multi-byte characters across tokens too: the deltas still add up to decode(ids)."""
    from tokenmill.data.tokenizer import train_bpe

    corpus = ["naïve café déjà vu 🙂 ∑ x² — «quoted» 日本語のテキスト"] * 20 + ["def f(x):\n    return x * 2\n"] * 20
    bpe = train_bpe(iter(corpus), 300, None, progress=False)
    ids = torch.randint(0, bpe.vocab_size, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    stream = TextStream(bpe.decode)
    shown = "".join(stream.add(i) for i in ids) + stream.flush()
    assert shown == bpe.decode(ids)
