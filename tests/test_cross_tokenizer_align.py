"""Byte alignment of two tokenizations (opd.teachers.cross_tokenizer.align)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opd.teachers.cross_tokenizer.align import (
    ByteTable,
    Span,
    align,
    matching_prefix,
    piece_bytes,
    tokenizer_style,
    valid_utf8_prefix,
)
from real_format import build_tokenizer
from sp_format import build_sp_tokenizer


@pytest.fixture(scope="module")
def pair():
    student, teacher = build_tokenizer(), build_sp_tokenizer()
    return student, ByteTable.of(student), teacher, ByteTable.of(teacher)


def lens(table, ids):
    return [len(table.get(i)) for i in ids]


def check_partition(a, s_lens, t_lens):
    """Spans are contiguous, cover [0, s_end) and [0, t_end), and each covers equal bytes."""
    s_at = t_at = s_bytes = t_bytes = 0
    for span in a.spans:
        assert (span.s0, span.t0) == (s_at, t_at)
        assert span.s1 >= span.s0 and span.t1 >= span.t0 and span.s1 + span.t1 > span.s0 + span.t0
        s_bytes += sum(s_lens[span.s0 : span.s1])
        t_bytes += sum(t_lens[span.t0 : span.t1])
        assert s_bytes == t_bytes
        s_at, t_at = span.s1, span.t1
    assert (s_at, t_at) == (a.s_end, a.t_end)


def test_styles_and_pieces(pair):
    student, s_table, teacher, t_table = pair
    assert tokenizer_style(student) == "byte_level" and tokenizer_style(teacher) == "sentencepiece"
    assert piece_bytes("Ġcaf", "byte_level") == b" caf"
    assert piece_bytes("▁café", "sentencepiece") == " café".encode()
    assert piece_bytes("<0xF0>", "sentencepiece") == b"\xf0"
    # specials stand for no bytes on both sides
    assert s_table.get(student.convert_tokens_to_ids("<|im_end|>")) is None
    assert t_table.get(teacher.convert_tokens_to_ids("<|eot_id|>")) is None
    assert t_table.get(teacher.bos_token_id) is None


def test_a_character_vocabulary_reads_as_its_text():
    from opd.cli.demo.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    table = ByteTable.of(tok)
    assert tokenizer_style(tok) == "literal" and table.style == "literal"
    ids = tok("12 + 3 = 15", add_special_tokens=False).input_ids
    assert b"".join(table.get(i) for i in ids) == b"12 + 3 = 15"
    assert table.get(tok.eos_token_id) is None


def test_year_as_one_token_vs_four():
    a = align([4, 1], [1, 1, 1, 1, 1])  # "2024" + "." against "2","0","2","4","."
    assert a.spans == (Span(0, 1, 0, 4), Span(1, 2, 4, 5))
    assert not a.spans[0].one_to_one and a.spans[1].one_to_one


def test_emoji_and_cjk_split_over_byte_tokens(pair):
    student, s_table, teacher, t_table = pair
    text = " 日本語 🙂 café"
    s_ids = student(text, add_special_tokens=False).input_ids
    t_ids = teacher(text, add_special_tokens=False).input_ids
    assert any(t_table.get(i) == b"\xf0" for i in t_ids)  # the teacher spells 🙂 in bytes
    a = align(lens(s_table, s_ids), lens(t_table, t_ids))
    assert (a.s_end, a.t_end) == (len(s_ids), len(t_ids))
    check_partition(a, lens(s_table, s_ids), lens(t_table, t_ids))
    emoji = [s for s in a.spans if b"\xf0" in b"".join(t_table.get(i) for i in t_ids[s.t0 : s.t1])]
    assert len(emoji) == 1 and emoji[0].t1 - emoji[0].t0 >= 4  # one span holds all four bytes


def test_bos_on_one_side_only():
    a = align([0, 2, 3], [2, 1, 2])  # student BOS, then "ab" "cde"; teacher "ab" "c" "de"
    assert a.spans == (Span(0, 1, 0, 0), Span(1, 2, 0, 1), Span(2, 3, 1, 3))
    assert not a.spans[0].two_sided


def test_eos_pairs_with_end_of_turn():
    a = align([3, 0], [1, 2, 0])  # the stop tokens are zero-width at the same offset
    assert a.spans == (Span(0, 1, 0, 2), Span(1, 2, 2, 3))
    assert a.spans[1].one_to_one


def test_one_side_ends_inside_a_span():
    # the teacher's text was cut after 4 bytes: the student's [3, 3] has no boundary at 4
    a = align([3, 3, 2], [2, 2])
    assert a.spans == () and (a.s_end, a.t_end) == (0, 0)
    a = align([2, 3, 2], [2, 2])
    assert a.spans == (Span(0, 1, 0, 1),) and (a.s_end, a.t_end) == (1, 1)


def test_cut_inside_a_character_and_unencodable_bytes(pair):
    _, _, _, t_table = pair
    emoji = "🙂".encode()
    assert valid_utf8_prefix(b"ok " + emoji[:2]) == b"ok "
    assert valid_utf8_prefix(b"ab\xffcd") == b"ab"
    assert valid_utf8_prefix(b"ok " + emoji) == b"ok " + emoji
    unk = 0  # <unk> has no bytes: the match stops there
    assert matching_prefix([unk], t_table, b"x") == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(min_size=0, max_size=40))
def test_spans_partition_both_sides_over_random_unicode(pair, text):
    student, s_table, teacher, t_table = pair
    s_ids = student(text, add_special_tokens=False, split_special_tokens=True).input_ids
    t_ids = teacher(text, add_special_tokens=False, split_special_tokens=True).input_ids
    raw = text.encode("utf-8")
    assert matching_prefix(s_ids, s_table, raw) == len(s_ids)
    t_ok = matching_prefix(t_ids, t_table, raw)
    t_ids = t_ids[:t_ok]  # the teacher's normalizer may drop or change what it cannot read
    s_l, t_l = lens(s_table, s_ids), lens(t_table, t_ids)
    a = align(s_l, t_l)
    check_partition(a, s_l, t_l)
    if t_ok == len(teacher(text, add_special_tokens=False, split_special_tokens=True).input_ids):
        assert b"".join(t_table.get(i) for i in t_ids) == raw
        assert (a.s_end, a.t_end) == (len(s_ids), len(t_ids))  # the whole text aligns
