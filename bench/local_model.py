"""The embedded local model's speed: load time and tokens per second, in this process.

    .venv/bin/python bench/local_model.py [--threads 2] [--max-tokens 128] [--rounds 2]

Loads the packaged SmolLM2-135M-Instruct exactly as the local model server does, then
generates a reply to a few prompts and prints the time to load, the time to the first token,
and decode speed (completion tokens per second after the first token), per prompt and overall.
Run it on an otherwise idle machine: llama.cpp's threads slow down sharply when they must
share the cores.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.core.config import load_settings
from app.services.local_model import LOCAL_MODEL_NAME, model_path, unavailable_reason
from app.services.local_model_server import Options, TokenCount, load_model

PROMPTS = (
    "Hello! Who are you?",
    "Explain in a few sentences why the sky is blue.",
    "Write a short poem about the sea.",
    "List three tips for writing clean Python code.",
)


def main() -> int:
    """Measure and print load time and tokens/s."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="passes over the prompts")
    args = parser.parse_args()

    settings = load_settings()
    if (reason := unavailable_reason(settings)) is not None:
        print(f"local model unavailable: {reason}", file=sys.stderr)
        return 1
    path = model_path(settings)
    assert path is not None
    count = TokenCount()
    started = time.perf_counter()
    llama = load_model(Options(path, LOCAL_MODEL_NAME, threads=args.threads, context=2048), count)
    load_s = time.perf_counter() - started
    print(f"model {path.name}, {args.threads} thread(s): loaded in {load_s:.3f} s")

    rates: list[float] = []
    firsts: list[float] = []
    total_tokens = 0
    total_decode_s = 0.0
    for round_ in range(args.rounds):
        for prompt in PROMPTS:
            started = time.perf_counter()
            first: float | None = None
            for chunk in llama.create_chat_completion(
                messages=[{"role": "user", "content": prompt}], max_tokens=args.max_tokens, stream=True
            ):
                delta: Any = chunk["choices"][0]["delta"]  # type: ignore[index]
                if first is None and delta.get("content"):
                    first = time.perf_counter()
            ended = time.perf_counter()
            assert first is not None
            decoded = count.completion - 1  # tokens after the first, in the time after it
            rate = decoded / (ended - first) if decoded > 0 else 0.0
            rates.append(rate)
            firsts.append(first - started)
            total_tokens += max(decoded, 0)
            total_decode_s += ended - first
            print(
                f"  round {round_ + 1}: prompt {count.prompt:3d} tok, reply {count.completion:3d} tok, "
                f"first token {1000 * (first - started):6.1f} ms, {rate:6.1f} tok/s  ({prompt[:40]!r})"
            )
    print(
        f"overall: {total_tokens / total_decode_s:.1f} tok/s decode (median {statistics.median(rates):.1f}), "
        f"median first token {1000 * statistics.median(firsts):.1f} ms, load {load_s:.3f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
