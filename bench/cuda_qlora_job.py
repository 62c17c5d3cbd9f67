"""A QLoRA job on a GPU through the trainer's command line, as a GPU worker runs it (by hand, on a CUDA machine).

    python bench/cuda_qlora_job.py MODEL_DIR [--steps 60] [--kill-after 20] [--method qlora]

What it does, each step through the real components (``python -m training_app.trainer --config job.json``
in a child process, 4-bit NF4 bitsandbytes base, bf16 compute, LoRA r=16 on q/k/v/o):

1. writes the demo dataset's well-formed conversations (datasets_app/demo/support_demo.jsonl) as the job's
   train/eval files (every 8th conversation held out for evaluation);
2. starts the job, waits for its checkpoint at ``--kill-after`` steps and SIGKILLs the process, as a lost
   worker would be;
3. runs the same command again: it must resume from that checkpoint and finish ``--steps`` steps;
4. checks the published adapter and the last checkpoint (the trainer's own ``check_checkpoint``) and the
   merged model the job wrote (``merge: true`` folds the adapter into the full-precision base), then answers
   two held-out prompts greedily with the base and with the merged model on the GPU.

Printed: the events' losses, eval losses, step times, the peak GPU memory of the job's processes (sampled
from nvidia-smi every 0.2 s), and a last ``summary`` line in JSON. Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEMO = ROOT / "datasets_app" / "demo" / "support_demo.jsonl"


class GpuMemory(threading.Thread):
    """Highest memory.used (MiB) nvidia-smi reports while running."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.idle = None
        self._halt = threading.Event()

    def read(self) -> int:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        return int(out.splitlines()[0]) if out else 0

    def run(self) -> None:
        self.idle = self.read()
        while not self._halt.is_set():
            self.peak = max(self.peak, self.read())
            time.sleep(0.2)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def run_job(config_path: Path, kill_at_checkpoint: int | None) -> tuple[list[dict], int | None, float]:
    """Run the trainer's command line; return its events, exit status (None when killed) and wall time."""
    cmd = [sys.executable, "-m", "training_app.trainer", "--config", str(config_path)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    drain = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    drain.start()
    events = []
    for line in proc.stdout:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        event["t"] = time.perf_counter() - started
        events.append(event)
        killing = kill_at_checkpoint is not None and event.get("event") == "checkpoint"
        if killing and event["step"] >= kill_at_checkpoint:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return events, None, time.perf_counter() - started
    status = proc.wait()
    drain.join(timeout=5)
    if status != 0:
        print("".join(stderr[-40:]), file=sys.stderr)
    return events, status, time.perf_counter() - started


def describe(events: list[dict]) -> None:
    for e in events:
        kind = e.get("event")
        if kind == "start":
            print(f"  start: {json.dumps({k: v for k, v in e.items() if k not in ('event', 't')})}")
        elif kind == "step" and (e["step"] % 10 == 0 or e["step"] == 1):
            m = e.get("metrics", {})
            print(f"  step {e['step']}/{e['total_steps']} loss {m.get('loss')} at {e['t']:.1f} s")
        elif kind == "eval":
            print(f"  eval at step {e['step']}: {e['metrics']}")
        elif kind == "checkpoint":
            print(f"  checkpoint at step {e['step']} ({e['t']:.1f} s)")
        elif kind in ("log", "error"):
            print(f"  {kind}: {e.get('line') or e}")
        elif kind == "result":
            print(f"  result: {json.dumps({k: v for k, v in e.items() if k not in ('event', 't')})}")


def answer(model_dir: str, prompts: list[list[dict]], device: str) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype).to(device)
    out = []
    for messages in prompts:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        ids = {k: v.to(device) for k, v in ids.items()}
        gen = model.generate(**ids, max_new_tokens=48, do_sample=False)
        out.append(tokenizer.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def usable(line: str) -> dict | None:
    """The demo file's chat records the studio's import accepts (it also holds lines that show the import's
    error reports), checked by the import's own validator."""
    from datasets_app.parsing import validate_messages

    try:
        record = json.loads(line)
    except ValueError:
        return None
    messages = record.get("messages") if isinstance(record, dict) else None
    return {"messages": messages} if validate_messages(messages) is None else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--kill-after", type=int, default=20)
    parser.add_argument("--method", default="qlora", choices=["qlora", "lora"])
    parser.add_argument(
        "--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke test of the script"
    )
    args = parser.parse_args()

    import torch

    from training_app.trainer.run import check_checkpoint

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this script is for a GPU machine (--device cpu runs it as a smoke test)")
        return 1
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "none (cpu)"
    rows = [r for line in DEMO.read_text(encoding="utf-8").splitlines() if (r := usable(line))]
    train = [r for i, r in enumerate(rows) if i % 8]
    held = [r for i, r in enumerate(rows) if not i % 8]
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
        (work / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
        config = {
            "method": args.method,
            "model_dir": args.model_dir,
            "output_dir": str(work / "job"),
            "train_path": str(work / "train.jsonl"),
            "eval_path": str(work / "eval.jsonl"),
            "max_steps": args.steps,
            "batch_size": 4,
            "max_length": 1024,
            "learning_rate": 2e-4,
            "eval_every": args.kill_after,
            "checkpoint_every": args.kill_after,
            "device": args.device,
            "precision": "auto",
            "merge": True,
        }
        config_path = work / "job.json"
        config_path.write_text(json.dumps(config))
        print(
            f"GPU {gpu}, torch {torch.__version__}; {len(train)} train / {len(held)} eval "
            f"conversations; {args.method}, {args.steps} steps, killed after the step-{args.kill_after} checkpoint"
        )
        mem = GpuMemory()
        if args.device == "cuda":
            mem.start()
        print("first attempt (SIGKILLed after its checkpoint):")
        first, status, wall1 = run_job(config_path, kill_at_checkpoint=args.kill_after)
        describe(first)
        if status is not None:
            failures.append(f"the first attempt ended by itself (status {status}) before its checkpoint")
        print(f"  killed after {wall1:.1f} s")
        print("second attempt (same command):")
        second, status, wall2 = run_job(config_path, kill_at_checkpoint=None)
        if args.device == "cuda":
            mem.stop()
        describe(second)
        result = next((e for e in second if e.get("event") == "result"), None)
        if status != 0 or result is None:
            failures.append(f"the second attempt failed (status {status})")
            result = {}
        if result.get("resumed_from_step") != args.kill_after:
            failures.append(f"resumed from {result.get('resumed_from_step')}, not {args.kill_after}")
        if result.get("steps") != args.steps:
            failures.append(f"finished at step {result.get('steps')}, not {args.steps}")
        losses = [
            e["metrics"]["loss"]
            for e in first + second
            if e.get("event") == "step" and "loss" in e.get("metrics", {})
        ]
        evals = [e["metrics"].get("eval_loss") for e in first + second if e.get("event") == "eval"]
        step_times = [
            b["t"] - a["t"]
            for a, b in zip(second, second[1:], strict=False)
            if a.get("event") == b.get("event") == "step"
        ]
        step_times.sort()
        if len(losses) >= 10 and not (sum(losses[-5:]) / 5 < sum(losses[:5]) / 5):
            failures.append("the training loss did not go down")
        artifacts = Path(result.get("artifacts_dir") or work / "job" / "final")
        print(
            f"artifacts: {sorted(p.name for p in artifacts.iterdir()) if artifacts.is_dir() else 'missing'}"
        )
        if not (artifacts / "adapter_model.safetensors").is_file():
            failures.append(f"no adapter_model.safetensors under {artifacts}")
        if result.get("last_checkpoint"):
            try:
                check_checkpoint(result["last_checkpoint"])
            except Exception as exc:  # the check's own message says what is wrong
                failures.append(f"the last checkpoint fails check_checkpoint: {exc}")
        merged = artifacts / "merged"
        if not (merged / "model.safetensors").is_file():
            failures.append("the job's merge (merge: true) wrote no merged/model.safetensors")
        answers_base = answers_tuned = []
        if not failures:
            prompts = [r["messages"][: 2 if r["messages"][0]["role"] == "system" else 1] for r in held[:2]]
            answers_base = answer(args.model_dir, prompts, args.device)
            answers_tuned = answer(str(merged), prompts, args.device)
            for p, a, b in zip(prompts, answers_base, answers_tuned, strict=True):
                print(f"  prompt: {p[-1]['content'][:100]!r}\n    base:  {a[:160]!r}\n    tuned: {b[:160]!r}")
            if answers_base == answers_tuned:
                failures.append("the merged model answers exactly as the base model does")
        summary = {
            "method": args.method,
            "gpu": gpu,
            "loss_first5": round(sum(losses[:5]) / max(1, len(losses[:5])), 4) if losses else None,
            "loss_last5": round(sum(losses[-5:]) / max(1, len(losses[-5:])), 4) if losses else None,
            "eval_losses": evals,
            "median_step_s": round(step_times[len(step_times) // 2], 4) if step_times else None,
            "wall_first_s": round(wall1, 1),
            "wall_second_s": round(wall2, 1),
            "gpu_mem_idle_mib": mem.idle,
            "gpu_mem_peak_mib": mem.peak,
            "resumed_from_step": result.get("resumed_from_step"),
            "failures": failures,
        }
        print("summary " + json.dumps(summary))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
