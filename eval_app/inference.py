"""Loading models for evaluation and serving, and batched generation.

A model is a base model directory, optionally with a LoRA adapter (a training job's artifacts) or a full
fine-tuned checkpoint.  Loaded models are cached per process (LRU, ``STUDIO_MODEL_CACHE_SIZE``), so the
API and evaluation tasks load base + adapter once.  Generation is batched: prompts are rendered with the
tokenizer's chat template, sorted by length, left-padded and generated together; temperature 0 is greedy.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings


class ModelUnavailable(Exception):
    """The model's files are missing or cannot be loaded; the message says which and what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """What to load: the base directory and, optionally, an adapter or a full checkpoint directory."""

    key: str  # cache key, e.g. "version:12" or "base:3"
    label: str  # shown to people, e.g. "support-assistant/2"
    base_dir: str
    adapter_dir: str = ""  # a PEFT adapter directory, applied on top of base_dir
    full_dir: str = ""  # a complete fine-tuned model directory (full SFT or merged), used instead of base_dir

    @property
    def weights_dir(self) -> str:
        return self.full_dir or self.base_dir


def spec_for_base(base_model) -> ModelSpec:
    return ModelSpec(key=f"base:{base_model.pk}", label=base_model.name, base_dir=str(base_model.local_dir))


def spec_for_version(version) -> ModelSpec:
    """A registry version: merged model if present, else base + adapter, else a full checkpoint."""
    base_dir = str(version.base_model.local_dir)
    artifacts = Path(version.artifacts_dir) if version.artifacts_dir else None
    label = str(version)
    if artifacts is None:
        return ModelSpec(key=f"version:{version.pk}", label=label, base_dir=base_dir)
    if (artifacts / "merged" / "config.json").is_file():
        return ModelSpec(f"version:{version.pk}", label, base_dir, full_dir=str(artifacts / "merged"))
    if (artifacts / "adapter_config.json").is_file():
        return ModelSpec(f"version:{version.pk}", label, base_dir, adapter_dir=str(artifacts))
    if (artifacts / "config.json").is_file():
        return ModelSpec(f"version:{version.pk}", label, base_dir, full_dir=str(artifacts))
    raise ModelUnavailable(
        f"The artifacts of {label} ({artifacts}) hold neither an adapter nor a model; "
        "check the data dir or retrain the job."
    )


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the first of the stop strings it contains, and whether it held one."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    output_tokens: int
    stopped: bool = False  # ended at one of the stop strings (cut before it)


# "auto" keeps models up to this size in float32 on a GPU (4 GiB of weights at most)
AUTO_FLOAT32_MAX_PARAMETERS = 1_000_000_000


def inference_dtype(weights_dir: str, device: str):
    """The dtype a model is loaded in for evaluation and serving (``STUDIO_INFERENCE_DTYPE``).

    Measured on an H100 with SmolLM2-135M (bench/eval_generation.py, 16 prompts, greedy, 64 new tokens):
    in bfloat16 the batched answers matched the one-prompt-at-a-time answers for 2 of 16 prompts, in float32
    for 16 of 16, and float32 generated faster (506 against 356 tokens/s batched). An answer that depends on
    its batch neighbours would let an evaluation show reviewers answers that serving does not give, so
    "auto" keeps small models in float32; large ones need bfloat16's halved memory."""
    import torch

    if device != "cuda":
        return torch.float32
    choice = settings.STUDIO_INFERENCE_DTYPE
    if choice == "auto":
        from training_app.trainer.convert import describe_model_dir

        try:
            parameters = describe_model_dir(Path(weights_dir))["parameters"]
        except (OSError, ValueError, KeyError, TypeError):
            parameters = None  # unreadable here: loading it says what is wrong
        if parameters is not None and parameters <= AUTO_FLOAT32_MAX_PARAMETERS:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[choice]


class LoadedModel:
    """A tokenizer and a model in eval mode on one device; ``generate`` is serialised by a lock."""

    def __init__(self, spec: ModelSpec, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.spec = spec
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        for path in {spec.weights_dir, spec.adapter_dir} - {""}:
            if not Path(path).is_dir():
                raise ModelUnavailable(
                    f"{spec.label}: the directory {path} does not exist; re-register the model or restore the data dir."
                )
        dtype = inference_dtype(spec.weights_dir, self.device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec.weights_dir, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(spec.weights_dir, local_files_only=True, dtype=dtype)
            if spec.adapter_dir:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, spec.adapter_dir)
                model = model.merge_and_unload()  # one fused model: same outputs, faster generation
        except Exception as exc:  # missing or damaged files (e.g. a safetensors header cut short)
            raise ModelUnavailable(f"{spec.label} could not be loaded: {type(exc).__name__}: {exc}") from exc
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.tokenizer = tokenizer
        self.model = model.to(self.device).eval()
        self.model.config.use_cache = True
        self.lock = threading.Lock()
        stop = {tokenizer.eos_token_id}
        end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
            stop.add(end_of_turn)
        self.stop_ids = sorted(i for i in stop if i is not None)

    def _cut_at_stop(self, ids: list[int], stops: list[str]) -> tuple[str, int, bool]:
        """(text before the first stop string, tokens up to the one completing it, whether one was met);
        the same text and count the streaming path gives."""
        for n in range(1, len(ids) + 1):
            text, stopped = cut_at_stop(
                self.tokenizer.decode(ids[:n], skip_special_tokens=True).lstrip(), stops
            )
            if stopped:
                return text, n, True
        return self.tokenizer.decode(ids, skip_special_tokens=True).lstrip(), len(ids), False

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(
        self,
        conversations: list[list[dict]],
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        batch_size: int = 16,
        stop: list[str] | None = None,
    ) -> list[GenerationResult]:
        """Answers for many chat prompts, in input order, generated ``batch_size`` at a time. With
        ``stop`` strings a row stops at the first of them; its text is cut before it and its token
        count ends with the token that completed it."""
        import torch

        prompts = [self.render(messages) for messages in conversations]
        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
        results: list[GenerationResult | None] = [None] * len(prompts)
        with self.lock, torch.inference_mode():
            torch.manual_seed(seed)
            for start in range(0, len(order), max(1, batch_size)):
                chunk = order[start : start + batch_size]
                batch = self.tokenizer.pad(
                    {"input_ids": [encoded[i] for i in chunk]}, padding=True, return_tensors="pt"
                ).to(self.device)
                kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}
                if temperature > 0:
                    kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
                else:
                    kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                if stop:
                    kwargs.update(stop_strings=list(stop), tokenizer=self.tokenizer)
                out = self.model.generate(**batch, eos_token_id=self.stop_ids, **kwargs)
                new = out[:, batch["input_ids"].shape[1] :]
                for row, index in enumerate(chunk):
                    ids = new[row].tolist()
                    length = len(ids)
                    for n, token in enumerate(ids):
                        if token in self.stop_ids:
                            length = n
                            break
                    text = self.tokenizer.decode(ids[:length], skip_special_tokens=True).lstrip()
                    stopped = False
                    if stop:
                        text, length, stopped = self._cut_at_stop(ids[:length], stop)
                    results[index] = GenerationResult(text, len(encoded[index]), length, stopped)
        return results  # type: ignore[return-value]


_cache: OrderedDict[str, LoadedModel] = OrderedDict()
_cache_lock = threading.Lock()
_load_locks: dict[str, threading.Lock] = {}
# One load at a time in a process: transformers' from_pretrained swaps process-wide functions while it
# loads, and two overlapping loads (of different models) leave them swapped, breaking every later load.
_loading = threading.Lock()


def get_model(spec: ModelSpec) -> LoadedModel:
    """The cached model for ``spec``, loading it on first use (one load per key even under concurrency)."""
    with _cache_lock:
        if spec.key in _cache and _cache[spec.key].spec == spec:
            _cache.move_to_end(spec.key)
            return _cache[spec.key]
        load_lock = _load_locks.setdefault(spec.key, threading.Lock())
    with load_lock:
        with _cache_lock:
            if spec.key in _cache and _cache[spec.key].spec == spec:
                return _cache[spec.key]
        with _loading:
            loaded = LoadedModel(spec)
        with _cache_lock:
            _cache[spec.key] = loaded
            _cache.move_to_end(spec.key)
            while len(_cache) > max(1, getattr(settings, "STUDIO_MODEL_CACHE_SIZE", 2)):
                _cache.popitem(last=False)
    return loaded


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()
