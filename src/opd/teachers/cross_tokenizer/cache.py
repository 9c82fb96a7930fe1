"""An `opd generate` / `opd score` cache in the teacher's tokens, used by a student with
another tokenizer.

* Rows: the stored completion's bytes (read from the teacher's token ids through its byte
  table, not re-decoded) become text the student's tokenizer encodes (SeqKD needs nothing
  else); the prompt is rendered from the stored row by the student's chat template. A
  completion the teacher finished gets the student's stop token; one cut at the teacher's
  `max_new_tokens` does not. The teacher's ids stay in the row (`teacher_prompt_ids`,
  `teacher_completion_ids`) for a cached kd teacher to align to.
* The teacher's tokenizer: `cross_tokenizer.teacher_tokenizer`, else the teacher directory the manifest
  names; it must have the cache's fingerprint.
"""

from __future__ import annotations

from pathlib import Path

from opd.data.cache_format import CacheError, is_cache, is_token_level, read_manifest
from opd.data.encoding import Encoder
from opd.modeling.hf import load_tokenizer, tokenizer_fingerprint
from opd.teachers.cross_tokenizer.align import ByteTable, matching_prefix, valid_utf8_prefix


def cache_teacher_tokenizer(config, root, manifest: dict):
    """The tokenizer the cache in `root` was written with (module doc); an error that says
    what to set when none is at hand."""
    want = manifest["tokenizer"]["fingerprint"]
    named = config.cross_tokenizer.teacher_tokenizer or manifest.get("teacher", {}).get("path", "")
    if not named or not (config.cross_tokenizer.teacher_tokenizer or Path(named).is_dir()):
        raise CacheError(
            f"cache {root} was made with another tokenizer than the student's (fingerprint "
            f"{want}); to train on it set cross_tokenizer.teacher_tokenizer to the teacher's tokenizer (its "
            "text is then re-tokenized for the student)"
        )
    tok = load_tokenizer(named)
    if tokenizer_fingerprint(tok) != want:
        raise CacheError(
            f"cross_tokenizer.teacher_tokenizer={named!r} is not the tokenizer cache {root} was made with "
            f"(fingerprint {tokenizer_fingerprint(tok)} vs {want})"
        )
    try:
        ByteTable.of(tok)
    except ValueError as err:
        raise CacheError(
            f"cache {root} was made with another tokenizer than the student's, and its text "
            f"cannot be re-tokenized: {err}"
        ) from None
    return tok


def stored_text(teacher_ids: list[int], table: ByteTable, end_ids) -> tuple[str, bool, bool]:
    """(text, finished, cut): the bytes of a stored completion up to its end token (or the
    first token without bytes), as the longest valid UTF-8 text."""
    finished = bool(teacher_ids) and teacher_ids[-1] in end_ids
    body = teacher_ids[:-1] if finished else teacher_ids
    pieces = []
    for i in body:
        piece = table.get(i)
        if piece is None:
            break
        pieces.append(piece)
    raw = b"".join(pieces)
    text = valid_utf8_prefix(raw)
    cut = len(pieces) < len(body) or len(text) < len(raw)
    return text.decode("utf-8"), finished and not cut, cut


def retokenize_cache_rows(rows: list[dict], encoder, teacher_tok, teacher_end_ids) -> list[dict]:
    """Cache rows in the teacher's tokens -> rows in the student's (module doc). Rows whose
    prompt cannot be fitted are left out, as `Encoder.encode_rows` leaves them."""
    table, tok = ByteTable.of(teacher_tok), encoder.tokenizer
    s_table = ByteTable.of(tok)
    end_ids, limit = set(teacher_end_ids), encoder.config.max_completion_tokens
    out = []
    for row in rows:
        text, finished, _ = stored_text(list(row["completion_ids"]), table, end_ids)
        prompt_ids, _ = encoder.fit_prompt(encoder.row_prompt(row))
        if prompt_ids is None:
            continue
        ids = tok(text, add_special_tokens=False, split_special_tokens=True).input_ids
        # Text the student's tokenizer cannot spell (an unknown character) ends the row there.
        good = matching_prefix(ids, s_table, text.encode("utf-8"))
        finished, ids = finished and good == len(ids), ids[:good]
        ids = [*ids, encoder.stop_id] if finished else ids
        out.append(
            {
                **row,
                encoder.config.completion_field: text,
                "prompt_ids": prompt_ids,
                "completion_ids": ids[:limit],
                "teacher_prompt_ids": list(row["prompt_ids"]),
                "teacher_completion_ids": list(row["completion_ids"]),
            }
        )
    return out


def cache_in_other_tokenizer(config, tokenizer):
    """None unless `data.train` is a cache made with another tokenizer than `tokenizer`;
    then the cache's tokenizer (found and checked: `cache_teacher_tokenizer`)."""
    path = config.data.train
    if not (path and Path(path).is_dir() and is_cache(path)):
        return None
    manifest = read_manifest(path)
    if not is_token_level(manifest):
        return None  # a text cache (an endpoint whose tokenizer is unknown): rows are text already
    if manifest["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tokenizer):
        return None
    return cache_teacher_tokenizer(config, path, manifest)


def cache_retokenizer(config, tokenizer):
    """None unless `data.train` is a cache in another tokenizer; then `rows, encoder -> rows`
    re-tokenizing its rows for the student (`opd.data.rows.load_run_data` applies it)."""
    teacher_tok = cache_in_other_tokenizer(config, tokenizer)
    if teacher_tok is None:
        return None
    end_ids = Encoder(teacher_tok, config.data).end_ids

    def retokenize(rows: list[dict], encoder) -> list[dict]:
        return retokenize_cache_rows(rows, encoder, teacher_tok, end_ids)

    return retokenize
