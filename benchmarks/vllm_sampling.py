"""Student sampling throughput: opd's built-in samplers against a colocated vLLM engine.

    python benchmarks/vllm_sampling.py                  # tiny: V=49, student 128x2 (CPU)
    python benchmarks/vllm_sampling.py --size large     # V=32,000, student 256x4 (CPU)
    python benchmarks/vllm_sampling.py --size qwen3 --device cuda --dtype bfloat16  # GPU

The students, tokenizer and 32 prompts of `onpolicy_vs_trl.py` (`onpolicy_models.build`);
each engine samples the same 32 prompts, up to 48 new tokens at temperature 1, as the
training loop does (`sampling.engine` = `lean` | `hf` | `vllm`). Throughput is completion
tokens generated (EOS included) per second of the sampling call; after `--warmup` calls
per engine, `--rounds` rounds call each engine once in turn and the medians are reported.
vLLM also reports what the loop pays besides sampling: the engine's start (once per run)
and a weight push (once per optimizer step), and the mean |log q_vLLM - log p_S| of its
samples under the trained model's forward (the train-inference mismatch).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from onpolicy_models import BATCH, MAX_NEW, build


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny", choices=["tiny", "large", "qwen3", "qwen3-smoke"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache-gb", type=float, default=0.5, help="vLLM KV cache (CPU)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--workdir", default="/tmp/opd-bench")
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)  # before vLLM, which freezes the thread count
    from opd.config.parse import VllmConfig
    from opd.data.batch import assemble
    from opd.modeling.hf import load_causal_lm, load_tokenizer
    from opd.sampling import sample
    from opd.sampling.vllm import VllmSampler, logprob_gap_sum

    paths = build(Path(args.workdir) / args.size, args.size, args.dtype, args.device)
    tok = load_tokenizer(str(paths["student"]))
    model = load_causal_lm(str(paths["student"]), dtype=args.dtype, device=args.device).eval()
    rows = [json.loads(line) for line in paths["prompts"].read_text().splitlines()]
    prompts = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in rows][:BATCH]
    vocab = model.config.vocab_size

    def builtin(engine):
        def run(seed):
            gen = torch.Generator(device=args.device).manual_seed(seed)
            return sample(model, prompts, engine=engine, max_new_tokens=MAX_NEW,
                          eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, vocab_size=vocab,
                          tokenizer=tok, generator=gen)  # fmt: skip

        return run

    t0 = time.perf_counter()
    settings = VllmConfig(
        gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_gb=args.kv_cache_gb
    )
    engine = VllmSampler(
        str(paths["student"]), dtype=args.dtype, settings=settings,
        max_model_len=max(map(len, prompts)) + MAX_NEW, seed=0,
    )  # fmt: skip
    start_s = time.perf_counter() - t0
    push_s = []
    for _ in range(3):
        t0 = time.perf_counter()
        engine.push_weights(model)
        push_s.append(time.perf_counter() - t0)

    def vllm(seed):
        return engine.sample(prompts, max_new_tokens=MAX_NEW, eos_ids=[tok.eos_token_id], seed=seed)

    engines = {"lean": builtin("lean"), "hf": builtin("hf"), "vllm": vllm}
    times = {name: [] for name in engines}
    tokens = {name: [] for name in engines}
    for r in range(-args.warmup, args.rounds):
        for name, run in engines.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = run(1000 + r)
            if args.device == "cuda":
                torch.cuda.synchronize()
            if r >= 0:
                times[name].append(time.perf_counter() - t0)
                tokens[name].append(sum(map(len, out.completions)))
            if name == "vllm":
                last_vllm = out
    batch = assemble(prompts, last_vllm.completions, pad_id=tok.pad_token_id,
                     source="student", completion_logprobs=last_vllm.logprobs).to(args.device)  # fmt: skip

    class Plain:  # temperature 1, no top-k / top-p
        temperature, top_k, top_p = 1.0, 0, 1.0

    gap, n = logprob_gap_sum(model, batch, Plain, vocab)
    result = {"size": args.size, "device": args.device, "dtype": args.dtype,
              "threads": args.threads, "batch": BATCH, "max_new_tokens": MAX_NEW,
              "vllm_start_s": round(start_s, 2),
              "vllm_push_s": round(statistics.median(push_s), 4),
              "vllm_logprob_gap": gap / max(n, 1)}  # fmt: skip
    for name in engines:
        rate = [k / t for k, t in zip(tokens[name], times[name])]
        result[name] = {
            "tokens_per_s": round(statistics.median(rate), 1),
            "seconds": round(statistics.median(times[name]), 4),
            "tokens": int(statistics.median(tokens[name])),
        }
    result["vllm_over_lean"] = round(
        result["vllm"]["tokens_per_s"] / result["lean"]["tokens_per_s"], 2
    )
    result["vllm_over_hf"] = round(result["vllm"]["tokens_per_s"] / result["hf"]["tokens_per_s"], 2)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":  # vLLM engines may spawn workers: start only from here
    main()
