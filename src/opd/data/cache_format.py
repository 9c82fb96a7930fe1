"""The offline teacher cache: sharded teacher completions and log-probs, with a manifest.

    opd generate --teacher T --prompts prompts.jsonl --out cache/   # writes this format
    opd inspect cache/                                              # reviews it
    opd train ... data.train=cache/ teacher.kind=cached teacher.cache_dir=cache/

Layout of a cache directory:

    manifest.json            what made it (teacher, tokenizer fingerprint, sampling, k),
                             counts, bytes, and one entry per finished shard with the
                             sha256 and size of each of its files
    shard-00000.safetensors  token arrays of the shard's rows (below)
    shard-00000.jsonl        one JSON object per row: the source row, the completion text,
                             its global row id and flags; readable with head/jq/grep

Why safetensors + JSONL per shard. Safetensors holds many named, typed arrays in one
file, so a shard is one atomic `os.replace` and one checksum for all its numbers; it
loads without pickle (a cache from someone else cannot run code, unlike `.npz` with
object arrays or `torch.save`); `safe_open(...).get_slice` reads a row's slice through
mmap without loading the shard, which is what the cached teacher does per batch; fp16
and int32 are native; and it is already a dependency. Text goes to JSONL beside it
because offline data is meant to be *reviewed*: a person or a script can read it without
opd. Parquet would compress text better but needs pyarrow and is opaque to `head`.

Arrays in a shard (n rows, N completion tokens; rows are concatenated, `*_offsets`
delimit them): `row_ids [n] int64`, `finished [n] uint8`, `prompt_ids` and
`completion_ids` (int32, flat) with `prompt_offsets`/`completion_offsets [n+1] int64`,
`token_logprobs [N] float32` (log p_T of each completion token at temperature 1), and
when k > 0 `topk_ids [N, k] int32`, `topk_logprobs [N, k] float16|float32` (normalized
over the full vocabulary, sorted) and `tail_logmass [N] float32` (log of the mass outside
the top-k, computed from the logits, exact). Per completion token that is 6k + 12 bytes
with fp16 (k = 64: 396 B) against 4V bytes for a dense float32 row (V = 151,936: 608 KB).

A cache from an OpenAI-compatible server (`opd generate --endpoint`, `opd.teachers.cache.endpoint`)
whose tokenizer is not known to be the student's holds text (`tokenizer.token_level:
false` in the manifest, empty arrays): its rows train on their text, never as teacher
log-probs. Rows with an `error` (refused, filtered, invalid answers) are kept once, with
no tokens, and never trained on.

Exactly-once: the manifest is the only source of truth. A shard's files are written to
hidden temporary files and renamed into place, then the manifest (listing the shard with
its checksums) is replaced atomically. A kill before the manifest update leaves files
that no manifest lists; the rerun writes that shard again (same seed, same content).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save as save_safetensors

FORMAT = "opd-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
LOGPROB_DTYPES = {"float16": np.float16, "float32": np.float32}

log = logging.getLogger("opd")


class CacheError(ValueError):
    """A cache that cannot be used as it is: corrupted, incomplete or mismatched."""


def is_cache(path: str | Path) -> bool:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return False
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, OSError):
        return False


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a hidden temporary file, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


REBUILD = (
    "rebuild it: move the directory away (or delete it) and rerun the `opd generate` / "
    "`opd score` command that made it"
)


def looks_like_cache(path: str | Path) -> bool:
    """A directory holding cache shards or a manifest, readable or not."""
    path = Path(path)
    return path.is_dir() and ((path / MANIFEST).exists() or any(path.glob("shard-*.safetensors")))


def read_manifest(root: str | Path) -> dict:
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        if looks_like_cache(root):  # shards without the manifest that vouches for them
            raise CacheError(f"the teacher cache {root} has lost its {MANIFEST}; {REBUILD}")
        raise FileNotFoundError(f"{root} is not a teacher cache: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheError(
            f"the teacher cache's manifest {path} is damaged (not valid JSON: {err}); {REBUILD}"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path} is not an {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise CacheError(f"{path} has format version {manifest.get('version')}, expected {VERSION}")
    for entry in manifest.get("shards", []):
        check_shard_entry(path, entry)
    return manifest


def check_shard_entry(manifest_path: Path, entry) -> None:
    """A shard entry names only its own two files, inside the cache directory: a manifest
    naming `../../etc/hostname` must not make a reader stat or hash a file elsewhere."""
    name = entry.get("name") if isinstance(entry, dict) else None
    index = entry.get("index") if isinstance(entry, dict) else None
    expected = {f"{name}.safetensors", f"{name}.jsonl"}
    files = entry.get("files") if isinstance(entry, dict) else None
    if (
        not isinstance(index, int)
        or name != shard_name(index)
        or not isinstance(files, dict)
        or set(files) != expected
    ):
        shown = json.dumps(entry)[:200]
        raise CacheError(
            f"{manifest_path} lists a shard entry whose file names are not the cache's own "
            f"(shard-NNNNN.safetensors / .jsonl inside the cache directory): {shown}; refused"
        )


def write_manifest(root: Path, manifest: dict) -> None:
    atomic_write(root / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def _offsets(lengths: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)


def pack_shard(records: list[dict], topk: int, logprob_dtype: str) -> dict[str, np.ndarray]:
    """Arrays of one shard from per-row records.

    A record holds `row_id`, `finished`, `prompt_ids`, `completion_ids`, `token_logprobs`
    ([n]) and, when topk > 0, `topk_ids`, `topk_logprobs` ([n, k]) and `tail_logmass` ([n]).
    """

    def cat(key, dtype, shape=()):
        parts = [np.asarray(r[key], dtype=dtype).reshape(-1, *shape) for r in records]
        return np.ascontiguousarray(
            np.concatenate(parts) if parts else np.zeros((0, *shape), dtype)
        )

    arrays = {
        "row_ids": np.asarray([r["row_id"] for r in records], dtype=np.int64),
        "finished": np.asarray([r["finished"] for r in records], dtype=np.uint8),
        "prompt_ids": cat("prompt_ids", np.int32),
        "prompt_offsets": _offsets([len(r["prompt_ids"]) for r in records]),
        "completion_ids": cat("completion_ids", np.int32),
        "completion_offsets": _offsets([len(r["completion_ids"]) for r in records]),
        "token_logprobs": cat("token_logprobs", np.float32),
    }
    if topk > 0:
        arrays["topk_ids"] = cat("topk_ids", np.int32, (topk,))
        arrays["topk_logprobs"] = cat("topk_logprobs", LOGPROB_DTYPES[logprob_dtype], (topk,))
        arrays["tail_logmass"] = cat("tail_logmass", np.float32)
    return arrays


# Top-k log-probs from vLLM arrive as float32: 1 - sum(exp) is exact to ~1e-7 per term, so
# a smaller tail mass than this is not resolved and is stored as this floor.
TAIL_FLOOR = 1e-6


def tail_logmass_from_topk(topk_logprobs) -> np.ndarray:
    """`[N, k] -> [N]`: log of the mass outside a position's top-k, from the top-k alone
    (engines and servers that return no logits), floored at `TAIL_FLOOR`."""
    rest = 1.0 - np.exp(np.asarray(topk_logprobs, dtype=np.float64)).sum(-1)
    return np.log(np.maximum(rest, TAIL_FLOOR)).astype(np.float32)


def write_shard(root: Path, index: int, arrays: dict[str, np.ndarray], rows: list[dict]) -> dict:
    """Write one shard's two files atomically; return its manifest entry (checksums, sizes)."""
    name = shard_name(index)
    blobs = {
        f"{name}.safetensors": save_safetensors(arrays, metadata={"format": FORMAT, "shard": name}),
        f"{name}.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(),
    }
    files = {}
    for filename, data in blobs.items():
        atomic_write(root / filename, data)
        files[filename] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    offsets = arrays["completion_offsets"]
    return {
        "index": index,
        "name": name,
        "rows": len(rows),
        "completion_tokens": int(offsets[-1]),
        "prompt_tokens": int(arrays["prompt_offsets"][-1]),
        "files": files,
    }


_VERIFIED: set[tuple] = set()  # (path, size, mtime, sha256) already hashed by this process


def verify_shard(root: Path, entry: dict) -> None:
    """Raise CacheError naming the shard file when it is missing, truncated or altered."""
    for filename, meta in entry["files"].items():
        path = root / filename
        if not path.is_file():
            raise CacheError(f"cache shard {path} is missing (listed in {root / MANIFEST})")
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, meta["sha256"])
        if key in _VERIFIED:
            continue
        size = stat.st_size
        if size != meta["bytes"]:
            raise CacheError(
                f"cache shard {path} is corrupted or truncated: {size} bytes, "
                f"manifest says {meta['bytes']}"
            )
        if sha256_file(path) != meta["sha256"]:
            raise CacheError(
                f"cache shard {path} is corrupted: its sha256 does not match the manifest"
            )
        _VERIFIED.add(key)


class CacheReader:
    """Read access to a finished (or, for review, partial) cache; verifies checksums on open."""

    def __init__(self, root: str | Path, *, verify: bool = True, allow_partial: bool = False):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        if not self.manifest["complete"] and not allow_partial:
            done, total = len(self.manifest["shards"]), self.manifest["num_shards"]
            raise CacheError(
                f"cache {self.root} is incomplete ({done}/{total} shards); finish it by "
                "rerunning the same `opd generate`/`opd score` command"
            )
        self.shards = sorted(self.manifest["shards"], key=lambda e: e["index"])
        if verify:
            for entry in self.shards:
                verify_shard(self.root, entry)
        self.topk = stored_topk(self.manifest)
        self._index: dict[int, tuple[int, int]] = {}  # row id -> (shard position, row in shard)
        self._offsets: list[np.ndarray] = []
        self._handles: dict[int, object] = {}
        for s, entry in enumerate(self.shards):
            with safe_open(self._path(entry), framework="numpy") as fh:
                row_ids = fh.get_tensor("row_ids")
                self._offsets.append(fh.get_tensor("completion_offsets"))
            for j, rid in enumerate(row_ids.tolist()):
                self._index[rid] = (s, j)

    def _path(self, entry: dict) -> str:
        return str(self.root / f"{entry['name']}.safetensors")

    def _handle(self, s: int):
        if s not in self._handles:
            self._handles[s] = safe_open(self._path(self.shards[s]), framework="numpy")
        return self._handles[s]

    @property
    def fingerprint(self) -> str:
        return self.manifest["tokenizer"]["fingerprint"]

    def check_tokenizer(self, tokenizer, who: str = "the student") -> None:
        check_tokenizer(self.root, self.manifest, tokenizer, who)

    def __len__(self) -> int:
        return len(self._index)

    def row_ids(self) -> list[int]:
        return sorted(self._index)

    def token_arrays(self, row_id: int, *, topk: bool = True) -> dict[str, np.ndarray]:
        """The completion-token arrays of one row (`completion_ids`, `token_logprobs`, top-k)."""
        if row_id not in self._index:
            raise CacheError(f"row {row_id} is not in cache {self.root}")
        s, j = self._index[row_id]
        a, b = (int(x) for x in self._offsets[s][j : j + 2])
        fh = self._handle(s)
        keys = ["completion_ids", "token_logprobs"]
        if topk and self.topk:
            keys += ["topk_ids", "topk_logprobs", "tail_logmass"]
        return {key: fh.get_slice(key)[a:b] for key in keys}

    def iter_shards(self):
        """Yield `(entry, arrays, rows)` per shard in order (whole shard in memory)."""
        for entry in self.shards:
            with safe_open(self._path(entry), framework="numpy") as fh:
                arrays = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
            text = (self.root / f"{entry['name']}.jsonl").read_text()
            yield entry, arrays, [json.loads(line) for line in text.splitlines() if line]

    def rows(self) -> list[dict]:
        """Training rows: the source row with the completion, plus stored token ids.

        `prompt_ids`/`completion_ids` let the loop use exactly the tokens the teacher
        scored; `cache_row` is what the cached teacher looks the row up by. A text cache
        gives text rows (the student's tokenizer encodes them), without its truncated ones:
        their text has no end, and encoding would append one. Error rows are left out.
        """
        out, token_level, skipped = [], is_token_level(self.manifest), Counter()
        for _entry, arrays, rows in self.iter_shards():
            p_off, c_off = arrays["prompt_offsets"], arrays["completion_offsets"]
            for j, meta in enumerate(rows):
                if meta.get("error") or not (token_level or meta["finished"]):
                    skipped[meta["error"]["kind"] if meta.get("error") else "truncated"] += 1
                    continue
                row = dict(meta["row"])
                row["cache_row"] = meta["cache_row"]
                if not token_level:
                    out.append(row)
                    continue
                row["prompt_ids"] = arrays["prompt_ids"][p_off[j] : p_off[j + 1]].tolist()
                row["completion_ids"] = arrays["completion_ids"][c_off[j] : c_off[j + 1]].tolist()
                out.append(row)
        if skipped:
            shown = ", ".join(f"{k} {v}" for k, v in skipped.items())
            left = sum(skipped.values())
            log.info("cache %s: %d rows left out of training (%s)", self.root, left, shown)
        return out


def load_cache_rows(root: str | Path) -> list[dict]:
    return CacheReader(root).rows()


def is_token_level(manifest: dict) -> bool:
    """Whether the cache's token ids are in a known tokenizer (every cache but an endpoint
    cache whose server's tokenizer could not be checked)."""
    return bool(manifest["tokenizer"].get("token_level", True))


def stored_topk(manifest: dict) -> int:
    """The top-k the shard arrays hold (0 for a text cache)."""
    return int(manifest["spec"]["topk"]) if is_token_level(manifest) else 0


def check_tokenizer(root: Path, manifest: dict, tokenizer, who: str = "the student") -> None:
    from opd.modeling.hf import tokenizer_fingerprint

    if not is_token_level(manifest):
        raise CacheError(
            f"cache {root} holds text, not token log-probs ({manifest['tokenizer']['check']}): "
            "it trains SeqKD (loss.objective=ce, no teacher), not token-level KD"
        )

    theirs, mine = manifest["tokenizer"]["fingerprint"], tokenizer_fingerprint(tokenizer)
    if mine != theirs:
        raise CacheError(
            f"cache {root} was made with another tokenizer than {who}'s (fingerprint "
            f"{theirs} vs {mine}, {manifest['tokenizer']['vocab_size']} vs {len(tokenizer)} "
            "tokens); its token ids and log-probs would mean other tokens"
        )


def check_cache_tokenizer(path: str | Path, tokenizer) -> None:
    """Refuse a cache (used as a dataset) made with another tokenizer; no-op for other data
    and for text caches (their rows are text, encoded by the student's tokenizer)."""
    if path and Path(path).is_dir() and is_cache(path):
        manifest = read_manifest(path)
        if is_token_level(manifest):
            check_tokenizer(Path(path), manifest, tokenizer)
