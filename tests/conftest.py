"""Shared fixtures: tiny real HF models and tokenizers written to disk once per session."""

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.cli.demo.tiny import build_char_tokenizer, save_tiny_pair, tiny_causal_lm

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """(teacher_dir, student_dir): Llama-style, char tokenizer, teacher larger than student.

    The teacher's LM head is scaled up so its distributions are peaked, unlike a random
    student's near-uniform ones: distillation then has a clear direction to move in.
    """
    teacher, student = save_tiny_pair(tmp_path_factory.mktemp("models"))
    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(teacher)
    return teacher, student


@pytest.fixture(scope="session")
def vllm_pair(tmp_path_factory):
    """(teacher_dir, student_dir) that vLLM's CPU kernels can run (see tests/vllm_util.py)."""
    from vllm_util import save_vllm_pair

    return save_vllm_pair(tmp_path_factory.mktemp("vllm_models"))


@pytest.fixture(scope="session")
def vllm_server(vllm_pair, tmp_path_factory):
    """One vLLM OpenAI server for the vLLM pair's teacher, shared by the tests that need one."""
    from vllm_util import vllm_server as serve

    with serve(vllm_pair[0], tmp_path_factory.mktemp("vllm_server") / "server.log") as url:
        yield url


@pytest.fixture(scope="session")
def addition_data(tmp_path_factory):
    """A JSONL file of short addition problems with answers."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rng = random.Random(0)
    with path.open("w") as fh:
        for _ in range(32):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            fh.write(
                json.dumps({"prompt": f"{a}+{b}=", "completion": f"{a + b}", "answer": str(a + b)})
                + "\n"
            )
    return path


@pytest.fixture
def base_config(tiny_pair, addition_data, tmp_path):
    teacher, student = tiny_pair

    def make(**overrides):
        data = {
            "student": {"path": str(student)},
            "teacher": {"path": str(teacher)},
            "data": {"train": str(addition_data)},
            "steps": 3,
            "batch_size": 4,
            "micro_batch_size": 2,
            "sampling": {"max_new_tokens": 6},
            "optim": {"lr": 1e-3},
            "output_dir": str(tmp_path / "run"),
        }
        for key, value in overrides.items():
            node = data
            parts = key.split("__")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        return data

    return make


def save_model_with_tokenizer(path, **kw):
    tok = build_char_tokenizer(chat=kw.pop("chat", False))
    vocab = kw.pop("vocab_size", len(tok))
    model = tiny_causal_lm(
        vocab, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
