"""Run one training job: LoRA / QLoRA / full SFT through transformers' ``Trainer``, DPO through TRL's
``DPOTrainer``; atomic checkpoints, automatic resume, cooperative stop and progress reporting.

No Django here: :func:`run_training` is called by the Celery task in-process, or by
``python -m training_app.trainer`` (also under ``torchrun``), see ``__main__.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field

from .callbacks import Reporter
from .config import TrainConfig, bitsandbytes_available
from .data import (
    FALLBACK_TEMPLATE,
    Collator,
    LengthGroupedSampler,
    ListDataset,
    check_sft_rows,
    count_tokens,
    load_jsonl,
    packed_rows,
    preference_rows,
    tokenize_conversations,
)
from .errors import ConfigError, CorruptCheckpoint, DataError, TrainerError, explain

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
FINAL = "final"
# said in the log when every example of the eval file is skipped (none fits in the max length) and evaluation
# every N steps is off: the run trains, and records no eval figure rather than those of an empty set
NO_EVAL_LEFT = (
    "no eval example is left within the max length, so the run is not evaluated: no eval figures are recorded"
)
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors")


@dataclass
class TrainResult:
    status: str
    steps: int
    total_steps: int
    final_metrics: dict[str, float] = field(default_factory=dict)
    artifacts_dir: str | None = None
    last_checkpoint: str | None = None
    resumed_from_step: int = 0


# ------------------------------------------------------------------------------------------ helpers
def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _checkpoints(output_dir) -> list[tuple[int, str]]:
    root = os.path.join(str(output_dir), CHECKPOINTS)
    found = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            match = _CHECKPOINT_RE.match(name)
            if match and os.path.isdir(os.path.join(root, name)):
                found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(output_dir) -> str | None:
    """The newest complete checkpoint folder under ``output_dir/checkpoints`` (unfinished temp folders are
    never considered), or None."""
    found = _checkpoints(output_dir)
    return found[-1][1] if found else None


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_publish(tmp: str, final: str) -> None:
    """Replace ``final`` by the finished folder ``tmp`` (rename; the old one is removed only afterwards)."""
    old = None
    if os.path.exists(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(os.path.dirname(final))
    if old:
        shutil.rmtree(old, ignore_errors=True)


SCRATCH_PREFIX = ".tmp-final"


def _scratch_name(main: bool) -> str:
    """The folder this attempt writes its final artifacts into before publishing them: its own name
    (process id and a random part), the same on every rank (rank 0 picks it and broadcasts it). Two
    attempts of a job can be alive at once (the watchdog requeued one it thought dead): with a shared
    folder the older one's clean-up could delete or mix files into the newer one's artifacts."""
    from accelerate.utils import broadcast_object_list

    name = [f"{SCRATCH_PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:8]}" if main else None]
    broadcast_object_list(name)
    return name[0]


def _remove_stale_scratch(output_dir: str) -> None:
    """After publishing: the scratch folders attempts that died before publishing left behind."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(output_dir):
            if entry.name.startswith(SCRATCH_PREFIX) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)


def check_checkpoint(path: str, model=None) -> int:
    """Make sure a checkpoint can be resumed from; returns its step.  Raises CorruptCheckpoint naming it."""
    name = os.path.basename(path.rstrip("/"))

    def corrupt(what: str) -> CorruptCheckpoint:
        return CorruptCheckpoint(f"Checkpoint {name} is damaged: {what}.", checkpoint=path)

    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as fh:
            state = json.load(fh)
        step = int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        raise corrupt("its trainer_state.json is missing or unreadable")
    weights = [f for f in _WEIGHT_FILES if os.path.exists(os.path.join(path, f))]
    if not weights:
        raise corrupt("it has no model or adapter weights")
    import torch
    from safetensors import safe_open

    expected = None
    if model is not None:
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for filename in weights:
        try:
            with safe_open(os.path.join(path, filename), framework="pt") as fh:
                for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensor = fh.get_tensor(key)
                    mismatch = expected is not None and filename == "model.safetensors" and key in expected
                    if mismatch and tuple(tensor.shape) != expected[key]:
                        raise ValueError(f"shape mismatch for {key}")
        except Exception as exc:
            raise corrupt(f"{filename} cannot be read ({type(exc).__name__})")
    if "adapter_model.safetensors" in weights and model is not None:
        _check_adapter_shapes(path, model, corrupt)
    for filename in ("optimizer.pt", "scheduler.pt"):
        file_path = os.path.join(path, filename)
        if not os.path.exists(file_path):
            raise corrupt(f"{filename} is missing")
        try:
            torch.load(file_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise corrupt(f"{filename} cannot be read ({type(exc).__name__})")
    return step


def _check_adapter_shapes(path, model, corrupt) -> None:
    try:
        from peft import get_peft_model_state_dict
        from safetensors.torch import load_file
    except ImportError:  # pragma: no cover
        return
    if not hasattr(model, "peft_config"):
        return
    saved = load_file(os.path.join(path, "adapter_model.safetensors"))
    current = get_peft_model_state_dict(model)
    for key, tensor in current.items():
        if key not in saved:
            raise corrupt(f"the adapter file lacks {key} (was it trained with other LoRA settings?)")
        if tuple(saved[key].shape) != tuple(tensor.shape):
            raise corrupt("the adapter's shapes do not match this job's LoRA settings")


def _resolve_device(config: TrainConfig) -> str:
    import torch

    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("The job asks for a GPU (cuda) but none is available on this worker.")
        return "cuda"
    return "cpu"


def _precision(config: TrainConfig, device: str):
    """(mixed-precision mode for the Trainer, dtype of the frozen base weights, QLoRA compute dtype)."""
    import torch

    if device == "cpu":
        if config.precision == "fp16":
            raise ConfigError("fp16 training needs a GPU; use fp32 (or bf16) on the CPU.")
        mode = "bf16" if config.precision == "bf16" else "fp32"
        return mode, torch.float32, torch.float32
    if config.precision == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        mode = config.precision
    half = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[mode]
    base = torch.float32 if config.method == "sft" else half  # full fine-tuning keeps fp32 master weights
    return mode, base, half


def _attention_kernels(device: str):
    """The attention kernels training may use. On CUDA, cuDNN's fused attention is left out: it builds an
    execution plan for every new batch shape, 15-19 ms of CPU per layer call on an H100 (measured with
    torch.profiler: half the CPU time of a packed LoRA step of SmolLM2), and batches padded to their
    longest row change shape at nearly every step. Flash and memory-efficient attention need no plan.
    ``STUDIO_CUDNN_ATTENTION=1`` keeps cuDNN in the choice (torch's default)."""
    if device != "cuda" or os.environ.get("STUDIO_CUDNN_ATTENTION") == "1":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _load_model(config: TrainConfig, device: str, base_dtype, compute_dtype):
    from transformers import AutoModelForCausalLM

    kwargs = {"local_files_only": True, "attn_implementation": "sdpa", "dtype": base_dtype}
    if config.method == "qlora":
        if not bitsandbytes_available():
            raise ConfigError(
                "QLoRA needs the bitsandbytes package, which is not installed; choose LoRA instead."
            )
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
        kwargs["dtype"] = compute_dtype
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0")) if device == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(config.model_dir, **kwargs)
    model.config.use_cache = False  # no KV cache in training: it also lets packed position_ids build the mask
    if config.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing
        )
    return model


def _lora_config(config: TrainConfig):
    from peft import LoraConfig

    modules = config.modules
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules="all-linear" if "all-linear" in modules else modules,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _history(log_history: list[dict]) -> list[dict]:
    """One entry per step (train and eval logs merged), without the end-of-training summary."""
    by_step: dict[int, dict] = {}
    for entry in log_history:
        if "train_runtime" in entry or "step" not in entry:
            continue
        row = by_step.setdefault(int(entry["step"]), {"step": int(entry["step"])})
        row.update({k: v for k, v in entry.items() if isinstance(v, int | float) and k != "step"})
    return [by_step[s] for s in sorted(by_step)]


# ---------------------------------------------------------------------------------- trainer classes
def _trainer_classes():
    import torch
    from transformers import Trainer, TrainerCallback

    class StudioMixin:
        """Token counting, tokens/s in the logs, length-grouped sampling and atomic checkpoints."""

        studio_sampler_lengths: list[int] | None = None
        studio_keep = 2
        studio_tokens_base = 0

        def _studio_state(self):
            if not hasattr(self, "_studio_pending"):
                self._studio_pending = 0
                self._studio_session_tokens = 0
                self._studio_start = None
            return self

        def _get_train_sampler(self, train_dataset=None):
            if self.studio_sampler_lengths is not None:
                return LengthGroupedSampler(
                    self.studio_sampler_lengths, self.args.per_device_train_batch_size, self.args.seed
                )
            return super()._get_train_sampler(train_dataset)

        def training_step(self, model, inputs, num_items_in_batch=None):
            self._studio_state()
            if self._studio_start is None:
                self._studio_start = time.perf_counter()
            real = inputs.pop("real_tokens", None)
            if real is None:
                mask = inputs.get("attention_mask")
                real = mask.sum() if mask is not None else inputs["input_ids"].numel()
            self._studio_pending += int(real)
            return super().training_step(model, inputs, num_items_in_batch)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs.pop("real_tokens", None)
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

        def log(self, logs, start_time=None):
            self._studio_state()
            if "loss" in logs and not any(k.startswith("eval_") for k in logs):
                pending = self._studio_pending
                if self.args.world_size > 1:
                    tensor = torch.tensor(pending, device=self.args.device)
                    pending = int(self.accelerator.reduce(tensor, reduction="sum").item())
                self._studio_pending = 0
                self._studio_session_tokens += pending
                elapsed = max(time.perf_counter() - (self._studio_start or time.perf_counter()), 1e-9)
                logs["tokens_seen"] = float(self.studio_tokens_base + self._studio_session_tokens)
                logs["tokens_per_second"] = self._studio_session_tokens / elapsed
            return super().log(logs, start_time)

        def _save_checkpoint(self, model, trial):
            """Write the checkpoint into a temp folder, then rename it into place and prune old ones, so a
            crash or a full disk never leaves a half-written ``checkpoint-N`` behind."""
            step = self.state.global_step
            run_dir = self.args.output_dir
            final = os.path.join(run_dir, f"checkpoint-{step}")
            tmp = os.path.join(run_dir, f".tmp-checkpoint-{step}")
            try:
                if self.args.should_save:
                    shutil.rmtree(tmp, ignore_errors=True)
                    os.makedirs(tmp, exist_ok=True)
                self.accelerator.wait_for_everyone()
                self.store_flos()
                self.save_model(tmp, _internal_call=True)
                if not self.args.save_only_model:
                    self._save_optimizer_and_scheduler(tmp)
                    self._save_scaler(tmp)
                    self._save_rng_state(tmp)
                if self.args.should_save:
                    self.state.save_to_json(os.path.join(tmp, "trainer_state.json"))
                self.accelerator.wait_for_everyone()
                if self.args.should_save:
                    _atomic_publish(tmp, final)
                    for _, old in _checkpoints(os.path.dirname(run_dir))[: -self.studio_keep]:
                        shutil.rmtree(old, ignore_errors=True)
            except BaseException:
                if self.args.should_save:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise

    class StudioTrainer(StudioMixin, Trainer):
        pass

    class ReporterCallback(TrainerCallback):
        def __init__(self, reporter: Reporter, *, start_step: int, info: dict, checkpoints_dir: str):
            self.reporter = reporter
            self.main = _rank() == 0
            self.start_step = start_step
            self.info = info
            self.checkpoints_dir = checkpoints_dir
            self.stopped = False

        def on_train_begin(self, args, state, control, **kwargs):
            if self.main:
                self.reporter.on_start(total_steps=state.max_steps, start_step=self.start_step, **self.info)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not self.main or not logs:
                return
            numbers = {
                k: float(v) for k, v in logs.items() if isinstance(v, int | float) and not isinstance(v, bool)
            }
            if any(k.startswith("eval_") for k in numbers):
                self.reporter.on_eval(step=state.global_step, metrics=numbers)
            elif "loss" in numbers:
                self.reporter.on_step(step=state.global_step, total_steps=state.max_steps, metrics=numbers)

        def on_step_end(self, args, state, control, **kwargs):
            stop = bool(self.reporter.should_stop()) if self.main else False
            if _world_size() > 1 and torch.distributed.is_initialized():
                flag = torch.tensor([1 if stop else 0], device=args.device)
                torch.distributed.broadcast(flag, src=0)
                stop = bool(flag.item())
            if stop and state.global_step < state.max_steps:
                self.stopped = True
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_save(self, args, state, control, **kwargs):
            if self.main:
                path = os.path.join(self.checkpoints_dir, f"checkpoint-{state.global_step}")
                self.reporter.on_checkpoint(step=state.global_step, path=path)
                self.reporter.on_log(f"checkpoint saved at step {state.global_step}")

    return StudioMixin, StudioTrainer, ReporterCallback


# ---------------------------------------------------------------------------------------- the run
def run_training(config: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    """Train (or resume) the job described by ``config``.  Raises a :class:`TrainerError` subclass for
    anything a person can act on; other failures are mapped by :func:`explain`."""
    reporter = reporter or Reporter()
    problems = config.validate()
    if problems:
        raise ConfigError(" ".join(problems))
    try:
        return _run(config, reporter)
    except TrainerError:
        raise
    except Exception as exc:
        error = explain(exc)
        logger.exception("training failed: %s", error.code)
        raise error from exc


def _run(config: TrainConfig, reporter: Reporter) -> TrainResult:
    import torch
    from transformers import AutoTokenizer, TrainingArguments, set_seed

    main = _rank() == 0
    say = reporter.on_log if main else (lambda line: None)
    device = _resolve_device(config)
    mode, base_dtype, compute_dtype = _precision(config, device)
    set_seed(config.seed)
    checkpoints_dir = os.path.join(config.output_dir, CHECKPOINTS)
    os.makedirs(checkpoints_dir, exist_ok=True)

    tokenizer = AutoTokenizer.from_pretrained(config.model_dir, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        # trained with it (SFT and DPO alike) and saved with the artifacts, so serving formats the same
        tokenizer.chat_template = FALLBACK_TEMPLATE
        say("the base model has no chat template: using the studio's plain 'role: content' one")

    # ---- data
    rows = load_jsonl(config.train_path)
    eval_rows = load_jsonl(config.eval_path) if config.eval_path else None
    if config.method == "dpo":
        train_items = preference_rows(rows, "the training file")
        eval_items = preference_rows(eval_rows, "the evaluation file") if eval_rows else None
        train_tokens = 0
        examples = len(train_items)
    else:
        train_examples, dropped = tokenize_conversations(
            tokenizer,
            check_sft_rows(rows, "the training file"),
            config.max_length,
            config.assistant_only_loss,
        )
        if not train_examples:
            raise DataError(
                "No training row has an assistant answer within the max length, so there is nothing to learn."
            )
        if dropped:
            say(f"{dropped} of {len(rows)} rows skipped: no assistant tokens within max length")
        eval_items = None
        if eval_rows:
            eval_examples, eval_dropped = tokenize_conversations(
                tokenizer,
                check_sft_rows(eval_rows, "the evaluation file"),
                config.max_length,
                config.assistant_only_loss,
            )
            if eval_dropped:
                say(
                    f"{eval_dropped} of {len(eval_rows)} eval rows skipped: no assistant tokens within max length"
                )
            if config.eval_every and not eval_examples:
                raise DataError(
                    "No evaluation row has an assistant answer within the max length: raise the max length "
                    "or set evaluation every N steps to 0."
                )
            if not eval_examples:
                say(NO_EVAL_LEFT)
            eval_items = ListDataset(eval_examples) if eval_examples else None
        train_tokens = count_tokens(train_examples)
        examples = len(train_examples)
        if config.packing:
            items = packed_rows(train_examples, config.max_length, config.seed)
            say(f"packed {examples} examples into {len(items)} rows of up to {config.max_length} tokens")
        else:
            items = train_examples
        train_items = ListDataset(items)

    # ---- model
    model = _load_model(config, device, base_dtype, compute_dtype)
    peft_config = _lora_config(config) if config.uses_adapter else None
    if config.method in ("lora", "qlora"):
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
        if config.gradient_checkpointing:
            model.enable_input_require_grads()

    # ---- resume?
    resume = latest_checkpoint(config.output_dir)
    start_step = 0
    if resume:
        start_step = check_checkpoint(resume, model if config.method != "dpo" else None)
        say(f"resuming from {os.path.basename(resume)} (step {start_step})")

    # ---- arguments
    common = {
        "output_dir": checkpoints_dir,
        "per_device_train_batch_size": config.batch_size,
        "per_device_eval_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "learning_rate": config.learning_rate,
        "lr_scheduler_type": config.lr_scheduler,
        # transformers 5 reads a warmup_steps below 1 as a ratio (and has no warmup_ratio); 4.x has
        # warmup_ratio and would take 0.1 as 0.1 steps: _supported keeps the one this version knows
        "warmup_ratio": config.warmup_ratio,
        "warmup_steps": config.warmup_ratio if not _has_field("warmup_ratio") else 0,
        "num_train_epochs": config.epochs if config.epochs else 1.0,
        "max_steps": config.max_steps if config.max_steps else -1,
        "weight_decay": config.weight_decay,
        "max_grad_norm": config.max_grad_norm,
        "logging_steps": 1,
        "save_strategy": "steps" if config.checkpoint_every else "no",
        "save_steps": config.checkpoint_every or 500,
        "save_total_limit": None,
        "eval_strategy": "steps" if (config.eval_every and eval_items is not None) else "no",
        "eval_steps": config.eval_every or None,
        "seed": config.seed,
        "data_seed": config.seed,
        "bf16": mode == "bf16",
        "fp16": mode == "fp16",
        "use_cpu": device == "cpu",
        "report_to": "none",
        "remove_unused_columns": False,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "gradient_checkpointing": config.gradient_checkpointing,  # renamed activation_checkpointing in v5
        "activation_checkpointing": config.gradient_checkpointing,
        "ddp_find_unused_parameters": False,
        "save_safetensors": True,
    }
    _, StudioTrainer, ReporterCallback = _trainer_classes()
    callback = ReporterCallback(
        reporter,
        start_step=start_step,
        info={"device": device, "train_tokens": train_tokens, "examples": examples},
        checkpoints_dir=checkpoints_dir,
    )
    if config.method == "dpo":
        trainer = _dpo_trainer(
            config, common, model, peft_config, tokenizer, train_items, eval_items, callback
        )
        # TRL leaves out pairs whose prompt does not fit in max_length: say so, and refuse an empty run
        kept = len(trainer.train_dataset)
        if kept == 0:
            raise DataError(
                f"No preference pair's prompt fits in the max length of {config.max_length} tokens: raise it."
            )
        if kept < examples:
            say(f"{examples - kept} of {examples} pairs skipped: prompt longer than the max length")
            examples = callback.info["examples"] = kept
        callback.info["train_tokens"] = _preference_tokens(trainer.train_dataset)
        if eval_items:
            eval_kept = len(trainer.eval_dataset)
            if config.eval_every and eval_kept == 0:
                raise DataError(
                    "No evaluation pair's prompt fits in the max length: raise it or set evaluation every N "
                    "steps to 0."
                )
            if eval_kept < len(eval_items):
                say(
                    f"{len(eval_items) - eval_kept} of {len(eval_items)} eval pairs skipped: prompt longer "
                    "than the max length"
                )
            if eval_kept == 0:  # as SFT: no final evaluation of an empty set (it would record empty figures)
                say(NO_EVAL_LEFT)
                eval_items = None
    else:
        args = TrainingArguments(**_supported(TrainingArguments, common))
        trainer = StudioTrainer(
            model=model,
            args=args,
            train_dataset=train_items,
            eval_dataset=eval_items,
            data_collator=Collator(tokenizer.pad_token_id),
            processing_class=tokenizer,
            callbacks=[callback],
        )
        trainer.studio_sampler_lengths = train_items.lengths()
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)  # progress goes through the reporter, not print()
    trainer.remove_callback(ProgressCallback)
    trainer.studio_keep = config.keep_checkpoints
    if resume:
        trainer.studio_tokens_base = _last_value(resume, "tokens_seen")

    # ---- train
    say(f"training {config.method} on {device} ({mode}); {examples} examples, seed {config.seed}")
    started = time.perf_counter()
    with _attention_kernels(device):
        output = trainer.train(resume_from_checkpoint=resume)
    runtime = time.perf_counter() - started
    state = trainer.state
    history = _history(state.log_history)
    steps_in_session = max(1, state.global_step - start_step)
    session_tokens = getattr(trainer, "_studio_session_tokens", 0)
    final_metrics: dict[str, float] = {
        # replaced below by the mean over every logged step, also those before a resume
        "train_loss_avg": float(output.training_loss) if output.training_loss is not None else math.nan,
        "train_runtime": runtime,
        "tokens_per_second": session_tokens / runtime if runtime > 0 else 0.0,
        "tokens_seen": float(trainer.studio_tokens_base + session_tokens),
        "steps_per_second": steps_in_session / runtime if runtime > 0 else 0.0,
    }
    losses = [h["loss"] for h in history if "loss" in h]
    if losses:  # the history is restored from the checkpoint: the Trainer's own average is this session's
        final_metrics["train_loss_avg"] = float(sum(losses) / len(losses))
        final_metrics["train_loss"] = float(losses[-1])
        final_metrics["train_loss_first"] = float(losses[0])

    if callback.stopped:
        say(f"stopped at step {state.global_step} on request")
        if main:
            _write_json(
                os.path.join(config.output_dir, "metrics.json"), {"history": history, "final": final_metrics}
            )
        return TrainResult(
            "stopped",
            state.global_step,
            state.max_steps,
            final_metrics,
            None,
            latest_checkpoint(config.output_dir),
            start_step,
        )

    if eval_items is not None:
        metrics = trainer.evaluate()
        final_metrics.update({k: float(v) for k, v in metrics.items() if isinstance(v, int | float)})
        history = _history(state.log_history)

    artifacts = os.path.join(config.output_dir, FINAL)
    tmp = os.path.join(config.output_dir, _scratch_name(main))
    if main:
        os.makedirs(tmp)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(tmp)
    if main:
        try:
            tokenizer.save_pretrained(tmp)
            for stray in ("README.md", "training_args.bin"):  # peft's auto card; the studio writes its own
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(tmp, stray))
            resolved = {
                "device": device,
                "precision": mode,
                "world_size": _world_size(),
                "versions": _versions(),
            }
            _write_json(os.path.join(tmp, "training_config.json"), {**config.to_dict(), "resolved": resolved})
            _write_json(os.path.join(tmp, "metrics.json"), {"history": history, "final": final_metrics})
            if not reporter.may_publish():
                shutil.rmtree(tmp, ignore_errors=True)
                say("a newer attempt owns this job: its artifacts are left as they are")
                return TrainResult(
                    "stopped", state.global_step, state.max_steps, final_metrics, None, None, start_step
                )
            _atomic_publish(tmp, artifacts)
            _remove_stale_scratch(config.output_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if config.merge and config.uses_adapter:
            say("merging the adapter into the base model")
            merge_adapter(config.model_dir, artifacts, os.path.join(artifacts, "merged"))
        say(f"finished at step {state.global_step}; artifacts written")
    trainer.accelerator.wait_for_everyone()
    del trainer
    if device == "cuda":
        torch.cuda.empty_cache()
    return TrainResult(
        "completed",
        state.global_step,
        state.max_steps,
        final_metrics,
        artifacts,
        latest_checkpoint(config.output_dir),
        start_step,
    )


def _dpo_trainer(config, common, model, peft_config, tokenizer, train_items, eval_items, callback):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    mixin, _, _ = _trainer_classes()

    class StudioDPOTrainer(mixin, DPOTrainer):
        pass

    values = dict(common)
    values.update(
        {"beta": config.dpo_beta, "max_length": config.max_length, "precompute_ref_log_probs": False}
    )
    args = DPOConfig(**_supported(DPOConfig, values))
    return StudioDPOTrainer(
        model=model,
        ref_model=None,  # reference = the base model with the adapter disabled
        args=args,
        train_dataset=Dataset.from_list(train_items),
        eval_dataset=Dataset.from_list(eval_items) if eval_items else None,
        processing_class=tokenizer,
        callbacks=[callback],
        peft_config=peft_config,
    )


def _preference_tokens(dataset) -> int:
    """Tokens one pass over TRL's tokenised preference pairs feeds the model: the prompt twice (once before
    each answer), the chosen and the rejected answer (what ``tokens_seen`` counts as it trains)."""
    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    if not set(columns) <= set(dataset.column_names):
        return 0
    prompts, chosen, rejected = (dataset[c] for c in columns)
    return sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected, strict=True))


def _has_field(name: str) -> bool:
    """Whether this transformers version's TrainingArguments has the field."""
    import dataclasses

    from transformers import TrainingArguments

    return name in {f.name for f in dataclasses.fields(TrainingArguments)}


def _supported(cls, values: dict) -> dict:
    """Only the arguments this transformers/TRL version knows (one spelling of renamed ones)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cls)}
    out = {k: v for k, v in values.items() if k in names}
    if "activation_checkpointing" in out:
        out.pop("gradient_checkpointing", None)
    return out


def _last_value(checkpoint: str, key: str) -> int:
    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as fh:
            history = json.load(fh).get("log_history", [])
    except (OSError, ValueError):
        return 0
    for entry in reversed(history):
        if key in entry:
            return int(entry[key])
    return 0


def _write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, default=float)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def merge_adapter(model_dir, adapter_dir, out_dir) -> None:
    """Fold a LoRA adapter into its base model and write a full safetensors model (+ tokenizer) to ``out_dir``.
    The base is loaded unquantised (fp32 on CPU) so that QLoRA adapters merge into full-precision weights."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tmp = str(out_dir).rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True).save_pretrained(tmp)
        _atomic_publish(tmp, str(out_dir))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
