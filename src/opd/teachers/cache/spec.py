"""What a cache was made from: the generation settings (`CacheSpec`) and the identities of
the teacher and the rows, stored in the manifest so a rerun resumes only the same job."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from opd.data.cache_format import LOGPROB_DTYPES


@dataclass
class CacheSpec:
    """Everything that decides a cache's content; a resumed run must match it exactly."""

    mode: str = "generate"  # generate: teacher samples | score: given completions
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    chat_template: str = "auto"
    system_prompt: str = ""
    max_prompt_tokens: int = 512
    max_completion_tokens: int = 512  # score: completion truncation (as in training)
    max_new_tokens: int = 128  # generate
    temperature: float = 1.0  # generate: sampling temperature (log-probs stay at 1)
    top_p: float = 1.0
    top_k: int = 0  # sampling top-k, not the stored top-k (`topk`)
    n: int = 1  # completions per prompt
    topk: int = 64  # stored teacher top-k per position; 0 stores only token log-probs
    logprob_dtype: str = "float16"
    seed: int = 0
    shard_size: int = 256  # prompts per shard
    teacher_dtype: str = "float32"
    # hf: opd's sampler + a Hugging Face forward | vllm: one vLLM engine | endpoint: an
    # OpenAI-compatible server (opd.teachers.cache.endpoint) | remote: `opd serve` or vLLM
    # servers scoring given completions (`opd score --endpoint`, opd.teachers.cache.scoring)
    engine: str = "hf"

    def __post_init__(self):
        checks = {
            "mode": self.mode in ("generate", "score"),
            "engine": self.engine in ("hf", "vllm", "endpoint", "remote"),
            "chat_template": self.chat_template in ("auto", "on", "off"),
            "logprob_dtype": self.logprob_dtype in LOGPROB_DTYPES,
            "teacher_dtype": self.teacher_dtype in ("float32", "bfloat16", "float16"),
            "temperature": self.temperature >= 0,
            "top_p": 0 < self.top_p <= 1,
            "top_k": self.top_k >= 0,
            "topk": self.topk >= 0,
            "n": self.n >= 1 and (self.mode == "generate" or self.n == 1),
            "shard_size": self.shard_size >= 1,
            "max_new_tokens": self.max_new_tokens >= 1,
            "max_prompt_tokens": self.max_prompt_tokens >= 1,
            "max_completion_tokens": self.max_completion_tokens >= 1,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"{key}={getattr(self, key)!r} is not allowed")


def model_identity(path: str) -> dict:
    """What identifies the teacher without loading it: config hash and weight file sizes."""
    root = Path(path)
    ident: dict = {"path": str(root.resolve()) if root.exists() else path}
    if (root / "config.json").is_file():
        raw = (root / "config.json").read_bytes()
        ident["model_type"] = json.loads(raw).get("model_type")
        ident["config_sha256"] = hashlib.sha256(raw).hexdigest()
        weights = [*root.glob("*.safetensors"), *root.glob("*.bin")]
        ident["weights"] = {w.name: w.stat().st_size for w in sorted(weights)}
    return ident


def rows_digest(rows: list[dict]) -> str:
    text = json.dumps(rows, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()
