#!/usr/bin/env python3
"""PyTorch CPU eager peer of `transfuse bench model --decode-tokens N`: greedy decoding with a
KV cache on a Hugging Face causal LM (default: tiny GPT-2, tests/fixtures/tiny_gpt2/model).

Same protocol as src/bench.rs: a prompt of --seq token ids from the same xorshift stream as
bench.rs's `ids` (x ^= x << 13; x ^= x >> 7; x ^= x << 17; id = x % vocab), one warm-up
generation (prefill and one step), then per run: the prefill (time to first token), then
--decode-tokens one-token steps, each timed alone (forward with the past key/values plus the
greedy argmax), like bench.rs's `steps[1..]`. torch.set_num_threads(--threads), inference_mode.

Prints one JSON line: the `decode` object of `bench model --json` (prompt, tokens,
time_to_first_token_ms, per_token_ms_median, decode_ms, tokens_per_s), where
per_token_ms_median is the median over --runs runs of each run's median step, and
per_token_ms_runs lists every run's median.

Not used by any test (tests must not need torch). Environment: /tmp/oracle/venv/bin/python
(torch + transformers); recreate with `python3 -m venv V && V/bin/pip install torch transformers
safetensors`.
"""
import argparse
import json
import os
import statistics
import time

MASK64 = (1 << 64) - 1
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(HERE, "..", "tests", "fixtures", "tiny_gpt2", "model")


def bench_ids(seq, vocab):
    """bench.rs `ids(1, seq, vocab)`: the same prompt transfuse decodes from."""
    x = 0x2545_F491_4F6C_DD1D
    out = []
    for _ in range(seq):
        x ^= (x << 13) & MASK64
        x ^= x >> 7
        x ^= (x << 17) & MASK64
        out.append(x % vocab)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=16, help="prompt tokens")
    ap.add_argument("--decode-tokens", type=int, default=64, help="one-token steps per run")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    positions = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    n = args.decode_tokens
    prompt_len = max(1, min(args.seq, positions - n))
    prompt = torch.tensor([bench_ids(prompt_len, vocab)], dtype=torch.long)

    # transformers ≥ 5.x names the KV cache `cache` (`past_key_values` is deprecated).
    import inspect

    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def cache_of(out):
        return getattr(out, "cache", None) or out.past_key_values

    def generate(steps):
        """Prefill, then `steps` one-token steps: (ttft seconds, per-step seconds)."""
        t = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        ttft = time.perf_counter() - t
        past = cache_of(out)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            out = model(input_ids=nxt, use_cache=True, **{cache_kw: past})
            past = cache_of(out)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t)
        return ttft, times

    with torch.inference_mode():
        generate(1)  # warm-up, as bench.rs
        runs = [generate(n) for _ in range(args.runs)]
    medians = [statistics.median(t) * 1e3 for _, t in runs]
    mid = sorted(range(len(runs)), key=lambda i: medians[i])[len(runs) // 2]
    ttft, steps = runs[mid]
    print(
        json.dumps(
            {
                "system": "pytorch-cpu",
                "case": "tiny_gpt2_decode_ms_per_token",
                "model": os.path.abspath(args.model),
                "threads": args.threads,
                "torch": torch.__version__,
                "decode": {
                    "prompt": prompt_len,
                    "tokens": n,
                    "time_to_first_token_ms": ttft * 1e3,
                    "per_token_ms_median": statistics.median(medians),
                    "decode_ms": sum(steps) * 1e3,
                    "tokens_per_s": n / sum(steps),
                },
                "per_token_ms_runs": medians,
            }
        )
    )


if __name__ == "__main__":
    main()
