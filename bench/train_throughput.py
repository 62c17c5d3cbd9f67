"""LoRA training throughput: the studio's trainer vs TRL's SFTTrainer defaults vs pad-to-max (by hand).

    .venv/bin/python bench/train_throughput.py [MODEL_DIR] [--steps 3] [--device cpu|cuda] [--qlora]
                                               [--peak-tflops 989] [--examples 256] [--skip trl,padded]

MODEL_DIR defaults to $STUDIO_BENCH_MODEL_DIR, else /work/cache/smollm2-135m-instruct (a local
safetensors SmolLM2-135M-Instruct).  The same seeded dataset (``--examples`` synthetic chats whose
templated lengths spread over ~30–900 tokens) trains the same LoRA (r=16, alpha=32, q/k/v/o) for the same
number of optimizer steps (batch 4, max length 1024, lr 2e-4, fp32 on CPU / bf16 on GPU) three ways:

1. **studio** — ``training_app.trainer.run_training`` with packing (best-fit-decreasing rows, padding-free
   ``position_ids``, no attention across examples), no gradient checkpointing;
2. **trl** — ``trl.SFTTrainer`` with its defaults, setting only the LoRA config, steps, batch, lr,
   max length and the precision (TRL defaults to bf16, which a CPU without bf16 units runs far slower):
   so no packing, padding to the longest row of each random batch, gradient checkpointing on;
3. **padded** — plain ``transformers.Trainer`` padding every example to max length.

All three train on every token (``assistant_only_loss`` off in the studio) so that losses compare.
Printed per run: non-padding tokens/s over all steps and at steady state (from the end of step 1, so
the first step's warm-up is excluded), first/last/mean loss; then the ratios studio/trl and
studio/padded.  ``--qlora`` adds a studio QLoRA run (4-bit NF4); on CUDA each run also prints model FLOPs
utilisation = 6 · N · tokens/s / peak FLOPS (N = all base-model parameters; peak from ``--peak-tflops``,
defaulting by GPU name to the dense bf16 figure).  Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from training_app.trainer.callbacks import Reporter  # noqa: E402
from training_app.trainer.config import TrainConfig  # noqa: E402
from training_app.trainer.data import tokenize_chat  # noqa: E402
from training_app.trainer.run import run_training  # noqa: E402

DEFAULT_MODEL = os.environ.get("STUDIO_BENCH_MODEL_DIR", "/work/cache/smollm2-135m-instruct")
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "4090": 165.0,
}
WORDS = [
    "the",
    "customer",
    "asked",
    "about",
    "the",
    "invoice",
    "and",
    "the",
    "delivery",
    "date",
    "for",
    "the",
    "order",
    "because",
    "the",
    "package",
    "was",
    "late",
    "please",
    "check",
    "whether",
    "the",
    "refund",
    "was",
    "processed",
    "and",
    "explain",
    "the",
    "next",
    "steps",
    "in",
    "plain",
    "words",
    "so",
    "that",
    "anyone",
    "can",
    "follow",
    "them",
    "our",
    "team",
    "will",
    "review",
    "the",
    "account",
    "settings",
    "update",
    "the",
    "billing",
    "address",
    "and",
    "confirm",
    "by",
    "email",
    "when",
    "the",
    "replacement",
    "ships",
    "we",
    "apologise",
    "for",
    "the",
    "delay",
    "and",
    "thank",
    "you",
    "for",
    "your",
    "patience",
    "with",
    "this",
    "request",
]
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        total_words = rng.randint(12, 870)  # ≈ 30–900 tokens once templated
        user = max(3, int(total_words * rng.uniform(0.1, 0.4)))
        answer = max(3, total_words - user)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(user))},
                    {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(answer))},
                ]
            }
        )
    return rows


class Timeline:
    """(time, non-padding tokens so far, loss) at the end of every optimizer step."""

    def __init__(self):
        self.start = None
        self.points: list[tuple[float, float, float]] = []

    def summary(self, name: str, n_params: int, peak: float | None) -> dict:
        t_end, tok_end, _ = self.points[-1]
        out = {"run": name, "steps": len(self.points), "tokens": tok_end}
        out["tok_s"] = tok_end / (t_end - self.start)
        if len(self.points) > 1:
            t1, tok1, _ = self.points[0]
            out["tok_s_steady"] = (tok_end - tok1) / (t_end - t1)
        else:
            out["tok_s_steady"] = out["tok_s"]
        losses = [p[2] for p in self.points]
        out.update(loss_first=losses[0], loss_last=losses[-1], loss_mean=statistics.fmean(losses))
        if peak:
            out["mfu"] = 6 * n_params * out["tok_s_steady"] / (peak * 1e12)
        return out


class StudioReporter(Reporter):
    def __init__(self, timeline: Timeline):
        self.timeline = timeline

    def on_start(self, **kw):
        self.timeline.start = time.perf_counter()

    def on_step(self, *, step, total_steps, metrics):
        self.timeline.points.append((time.perf_counter(), metrics["tokens_seen"], metrics["loss"]))


class TimelineCallback(TrainerCallback):
    def __init__(self, timeline: Timeline, counter: dict):
        self.timeline, self.counter = timeline, counter

    def on_train_begin(self, args, state, control, **kw):
        self.timeline.start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.timeline.points.append((time.perf_counter(), self.counter["tokens"], float(logs["loss"])))


def counting(trainer_cls):
    class Counting(trainer_cls):
        counter = {"tokens": 0}

        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            self.counter["tokens"] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            return super().training_step(model, inputs, num_items_in_batch)

    return Counting


def lora_config():
    from peft import LoraConfig

    return LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=LORA["targets"],
        task_type="CAUSAL_LM",
    )


def run_studio(args, train_path, workdir, method="lora") -> Timeline:
    timeline = Timeline()
    config = TrainConfig(
        method=method,
        model_dir=args.model_dir,
        output_dir=str(workdir / f"studio-{method}"),
        train_path=str(train_path),
        max_steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        learning_rate=args.lr,
        lora_r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=LORA["targets"],
        packing=True,
        assistant_only_loss=False,
        checkpoint_every=0,
        device=args.device,
        seed=args.seed,
    )
    run_training(config, StudioReporter(timeline))
    return timeline


def common_args(args, output_dir) -> dict:
    on_gpu = args.device == "cuda"
    return {
        "output_dir": str(output_dir),
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch_size,
        "learning_rate": args.lr,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": args.seed,
        "bf16": on_gpu and torch.cuda.is_bf16_supported(),
        "use_cpu": not on_gpu,
        "disable_tqdm": True,
    }


def load_model(args):
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if args.device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype, attn_implementation="sdpa")


def run_trl(args, rows, workdir) -> Timeline:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    timeline = Timeline()
    trainer_cls = counting(SFTTrainer)
    trainer_cls.counter = {"tokens": 0}
    sft_args = SFTConfig(**common_args(args, workdir / "trl"), max_length=args.max_length)
    trainer = trainer_cls(
        model=load_model(args),
        args=sft_args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(args.model_dir),
        peft_config=lora_config(),
        callbacks=[TimelineCallback(timeline, trainer_cls.counter)],
    )
    trainer.train()
    return timeline


def run_padded(args, rows, workdir) -> Timeline:
    from peft import get_peft_model
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    items = [
        tokenize_chat(tokenizer, r["messages"], args.max_length, assistant_only_loss=False) for r in rows
    ]

    def collate(features):
        width = args.max_length
        ids = [f["input_ids"] + [pad] * (width - len(f["input_ids"])) for f in features]
        labels = [f["labels"] + [-100] * (width - len(f["labels"])) for f in features]
        mask = [[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"])) for f in features]
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(mask),
        }

    timeline = Timeline()
    trainer_cls = counting(Trainer)
    trainer_cls.counter = {"tokens": 0}
    model = load_model(args)
    model.config.use_cache = False
    trainer = trainer_cls(
        model=get_peft_model(model, lora_config()),
        args=TrainingArguments(**common_args(args, workdir / "padded"), remove_unused_columns=False),
        train_dataset=items,
        data_collator=collate,
        callbacks=[TimelineCallback(timeline, trainer_cls.counter)],
    )
    trainer.train()
    return timeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", default=DEFAULT_MODEL)
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per run (default 3 on CPU, 10 on GPU)"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--qlora", action="store_true", help="also time a studio QLoRA run")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="accelerator peak (dense bf16) for MFU"
    )
    parser.add_argument("--skip", default="", help="comma-separated runs to skip: warmup,studio,trl,padded")
    args = parser.parse_args()
    if args.steps is None:
        args.steps = 10 if args.device == "cuda" else 3
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        sys.exit(f"no model at {args.model_dir} (pass MODEL_DIR or set STUDIO_BENCH_MODEL_DIR)")

    from transformers import AutoConfig, AutoTokenizer

    peak = None
    label = platform.processor() or platform.machine()
    if args.device == "cuda":
        label = torch.cuda.get_device_name(0)
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in label), None)
    cfg = AutoConfig.from_pretrained(args.model_dir)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())

    rows = make_rows(args.examples, args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    lengths = sorted(len(tokenize_chat(tokenizer, r["messages"], 10**6)["input_ids"]) for r in rows)
    print(
        f"device {args.device} ({label}), torch {torch.__version__} threads {torch.get_num_threads()}, "
        f"transformers {version('transformers')}, peft {version('peft')}, trl {version('trl')}"
    )
    print(
        f"model {Path(args.model_dir).name} ({n_params / 1e6:.1f}M params); {len(rows)} examples, tokens "
        f"min {lengths[0]} median {lengths[len(lengths) // 2]} mean {statistics.fmean(lengths):.0f} max {lengths[-1]}; "
        f"LoRA r={LORA['r']} q/k/v/o, batch {args.batch_size}, max length {args.max_length}, {args.steps} steps"
    )
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    if "warmup" not in args.skip:  # one untimed forward/backward so no run pays the process's first-use costs
        model = load_model(args).to(args.device)
        ids = torch.randint(0, cfg.vocab_size, (1, args.max_length), device=args.device)
        model(input_ids=ids, labels=ids).loss.backward()
        del model, ids
        gc.collect()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        train_path = workdir / "train.jsonl"
        train_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        plan = [
            ("studio", lambda: run_studio(args, train_path, workdir)),
            ("trl", lambda: run_trl(args, rows, workdir)),
            ("padded", lambda: run_padded(args, rows, workdir)),
        ]
        if args.qlora:
            plan.append(("studio-qlora", lambda: run_studio(args, train_path, workdir, method="qlora")))
        for name, fn in plan:
            if name in skip:
                continue
            started = time.perf_counter()
            results[name] = fn().summary(name, n_params, peak)
            results[name]["wall"] = time.perf_counter() - started
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print()
    print(
        f"{'run':<14}{'tokens':>9}{'tok/s':>10}{'steady':>10}{'loss first':>12}{'last':>8}{'mean':>8}{'wall s':>9}"
    )
    for r in results.values():
        mfu = f"   MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
        print(
            f"{r['run']:<14}{r['tokens']:>9.0f}{r['tok_s']:>10.1f}{r['tok_s_steady']:>10.1f}"
            f"{r['loss_first']:>12.3f}{r['loss_last']:>8.3f}{r['loss_mean']:>8.3f}{r['wall']:>9.1f}{mfu}"
        )
    studio = results.get("studio")
    for other in ("trl", "padded"):
        if studio and other in results:
            print(
                f"studio/{other}: {studio['tok_s'] / results[other]['tok_s']:.2f}x tokens/s "
                f"(steady {studio['tok_s_steady'] / results[other]['tok_s_steady']:.2f}x)"
            )
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("(tokens = non-padding tokens trained; steady = from the end of step 1; losses over all tokens)")


if __name__ == "__main__":
    main()
