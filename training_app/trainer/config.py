"""The training job's settings as a plain dataclass (JSON round-trip) with plain-English validation."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field

METHODS = ("sft", "lora", "qlora", "dpo")
ADAPTER_METHODS = ("lora", "qlora", "dpo")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


@functools.lru_cache(maxsize=1)
def bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # ImportError, or a broken native library
        return False
    return True


def model_context_length(model_dir: str) -> int | None:
    """``max_position_embeddings`` from the model's config.json, or None when unreadable."""
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)
    value = cfg.get("max_position_embeddings")
    return int(value) if isinstance(value, int | float) else None


@dataclass
class TrainConfig:
    method: str
    model_dir: str
    output_dir: str
    train_path: str
    eval_path: str | None = None
    target_modules: list[str] | None = None
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    epochs: float | None = 1.0
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1024
    packing: bool = False
    assistant_only_loss: bool = True
    seed: int = 42
    eval_every: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    dpo_beta: float = 0.1
    device: str = "auto"
    precision: str = "auto"
    merge: bool = False
    gradient_checkpointing: bool = False
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    extra: dict = field(default_factory=dict)  # free-form, kept in training_config.json

    @property
    def modules(self) -> list[str]:
        return list(self.target_modules) if self.target_modules else list(DEFAULT_TARGET_MODULES)

    @property
    def uses_adapter(self) -> bool:
        return self.method in ADAPTER_METHODS

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        from .errors import ConfigError

        if not isinstance(d, dict):
            raise ConfigError('The config must be a JSON object of settings, e.g. {"method": "lora", …}.')
        # A job's training_config.json artifact is these settings plus what the run "resolved" (device,
        # precision, library versions): it can be passed back as a config, so that key is ignored.
        d = {k: v for k, v in d.items() if k != "resolved"}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ConfigError(f"Unknown training setting(s): {', '.join(unknown)}.")
        missing = [f.name for f in fields.values() if f.name not in d and _required(f)]
        if missing:
            raise ConfigError(f"Missing training setting(s): {', '.join(missing)}.")
        problems = [p for name, value in d.items() if (p := _type_problem(name, fields[name].type, value))]
        if problems:
            raise ConfigError(" ".join(problems))
        return cls(**d)

    def validate(self) -> list[str]:
        """Plain-English problems with these settings; an empty list means they are fine."""
        problems: list[str] = []
        if self.method not in METHODS:
            problems.append(f"Unknown method '{self.method}': choose one of {', '.join(METHODS)}.")
        if not self.model_dir or not os.path.isdir(self.model_dir):
            problems.append(f"The base model folder does not exist: {self.model_dir or '(empty)'}.")
        if not self.train_path or not os.path.isfile(self.train_path):
            problems.append(f"The training file does not exist: {self.train_path or '(empty)'}.")
        if self.eval_path and not os.path.isfile(self.eval_path):
            problems.append(f"The evaluation file does not exist: {self.eval_path}.")
        if not self.output_dir:
            problems.append("An output folder is needed.")
        if self.uses_adapter:
            if not (1 <= self.lora_r <= 1024):
                problems.append(f"LoRA rank (lora_r) must be between 1 and 1024, not {self.lora_r}.")
            if not (0 < self.lora_alpha <= 4096):
                problems.append(f"LoRA alpha (lora_alpha) must be between 1 and 4096, not {self.lora_alpha}.")
            if not (0 <= self.lora_dropout < 1):
                problems.append(f"LoRA dropout must be at least 0 and below 1, not {self.lora_dropout}.")
            if self.target_modules is not None and not self.target_modules:
                problems.append(
                    "Pick at least one target module for LoRA (or leave it empty for the default)."
                )
        if not (0 < self.learning_rate <= 1):
            problems.append(f"Learning rate must be above 0 and at most 1, not {self.learning_rate}.")
        if self.lr_scheduler not in SCHEDULERS:
            problems.append(
                f"Unknown learning-rate schedule '{self.lr_scheduler}': choose {', '.join(SCHEDULERS)}."
            )
        if not (0 <= self.warmup_ratio < 1):
            problems.append(f"Warm-up ratio must be at least 0 and below 1, not {self.warmup_ratio}.")
        if not (1 <= self.batch_size <= 1024):
            problems.append(f"Batch size must be between 1 and 1024, not {self.batch_size}.")
        if not (1 <= self.grad_accum <= 1024):
            problems.append(
                f"Gradient accumulation (grad_accum) must be between 1 and 1024, not {self.grad_accum}."
            )
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"Max steps must be at least 1, not {self.max_steps}.")
        if self.max_steps is None:
            if self.epochs is None or self.epochs == 0:
                problems.append("Set either a number of epochs or max steps.")
            elif not (0 < self.epochs <= 100):
                problems.append(f"Epochs must be above 0 and at most 100, not {self.epochs}.")
        elif self.epochs is not None and self.epochs < 0:
            problems.append(f"Epochs cannot be negative ({self.epochs}).")
        if self.max_length < 8:
            problems.append(f"Max length must be at least 8 tokens, not {self.max_length}.")
        elif self.model_dir and os.path.isdir(self.model_dir):
            context = model_context_length(self.model_dir)
            if context is not None and self.max_length > context:
                problems.append(
                    f"Max length ({self.max_length}) is above the model's context length ({context} tokens); "
                    f"use at most {context}."
                )
        if self.eval_every < 0:
            problems.append(f"Evaluate-every must be 0 (off) or a number of steps, not {self.eval_every}.")
        elif self.eval_every > 0 and not self.eval_path:
            problems.append("Periodic evaluation (eval_every) needs an evaluation file (eval_path).")
        if self.checkpoint_every < 0:
            problems.append(
                f"Checkpoint-every must be 0 (off) or a number of steps, not {self.checkpoint_every}."
            )
        if self.keep_checkpoints < 1:
            problems.append(f"Keep at least 1 checkpoint (keep_checkpoints), not {self.keep_checkpoints}.")
        if self.method == "dpo" and not (0 < self.dpo_beta <= 10):
            problems.append(f"DPO beta must be above 0 and at most 10, not {self.dpo_beta}.")
        if self.device not in DEVICES:
            problems.append(f"Unknown device '{self.device}': choose {', '.join(DEVICES)}.")
        if self.precision not in PRECISIONS:
            problems.append(f"Unknown precision '{self.precision}': choose {', '.join(PRECISIONS)}.")
        if self.method == "qlora" and not bitsandbytes_available():
            problems.append(
                "QLoRA needs the bitsandbytes package, which is not installed (or failed to load); "
                "install it or choose LoRA."
            )
        if self.packing and self.method == "dpo":
            problems.append("Packing is not available for DPO; turn packing off.")
        if self.merge and not self.uses_adapter:
            problems.append("Merging only applies to adapter methods (LoRA, QLoRA, DPO).")
        return problems


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _type_problem(name: str, annotation: str, value) -> str | None:
    """Why `value` (from JSON) cannot be the setting `name` of type `annotation`, or None when it can:
    a string where a number belongs would otherwise fail deep inside validation with a TypeError."""
    import math

    optional = annotation.endswith("| None")
    kind = annotation.removesuffix("| None").strip()
    if value is None:
        return None if optional else f"{name}: a value is required, not null."
    if kind == "bool":
        ok, wanted = isinstance(value, bool), "true or false"
    elif kind == "int":
        ok, wanted = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif kind == "float":
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        wanted = "a finite number"
    elif kind == "str":
        ok, wanted = isinstance(value, str), "text"
    elif kind == "list[str]":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        wanted = "a list of module names (text)"
    elif kind == "dict":
        ok, wanted = isinstance(value, dict), "a JSON object"
    else:  # pragma: no cover - every field's type is handled above
        return None
    if ok:
        return None
    shown = json.dumps(value)[:60]
    return f"{name}: {shown} is not {wanted}{' (or null)' if optional else ''}."
