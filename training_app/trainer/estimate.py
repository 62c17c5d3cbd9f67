"""Memory estimate for a training job before it starts, with a concrete suggestion when it will not fit.

The estimate is a sum of parts (bytes):

* **weights** — ``n_params`` × 4 on CPU (fp32); on a GPU × 2 (bf16) for adapter methods and × 4 for full
  fine-tuning (fp32 master weights with bf16 autocast).  QLoRA: the decoder's linear layers are stored as
  4-bit NF4 with double quantisation — 0.5 byte per weight + 1 byte per 64-weight block (8-bit absmax)
  + 4 bytes per 256 blocks (second-level constants) — and the rest (embeddings, norms) at the compute
  precision (2 bytes on GPU, 4 on CPU).
* **adapter** — LoRA parameters (fp32): for every layer and target module ``r × (in + out)``.
* **optimizer** — AdamW: two fp32 moments per trainable parameter (8 bytes).
* **gradients** — one fp32 value per trainable parameter (4 bytes).
* **activations** — per decoder layer ``p × b × s × (10·hidden + 4·intermediate)`` (norm outputs,
  q/k/v, attention output, residuals ≈ 10·hidden; gate, up, activation and product ≈ 4·intermediate) with
  ``p`` = 2 bytes on GPU and 4 on CPU; with gradient checkpointing only each layer's input
  (``p × b × s × hidden``) is kept plus one layer's full activations.  Plus the logits and their gradient in
  fp32: ``2 × 4 × b × s × vocab``.  DPO runs chosen and rejected answers together: activations × 2.

``fits`` is ``total <= 90 % of the device's memory`` (the rest is headroom for the allocator, the CUDA
context and fragmentation).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from .config import DEFAULT_TARGET_MODULES

GIB = 1024**3
HEADROOM = 0.9
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class MemoryEstimate:
    weights_bytes: int
    adapter_bytes: int
    optimizer_bytes: int
    gradients_bytes: int
    activations_bytes: int
    total_bytes: int
    device_name: str
    device_bytes: int
    fits: bool
    suggestion: str

    def as_dict(self) -> dict:
        return asdict(self)


def _cfg(model_config: dict) -> dict:
    return model_config.get("text_config", model_config)


class UnknownModelShape(ValueError):
    """The model's config.json does not give the sizes a memory estimate needs."""


def _size(cfg: dict, *names: str, default=None) -> int:
    """The first of ``names`` present (Llama-style names first, then GPT-2 style ones)."""
    for name in names:
        if cfg.get(name):
            return int(cfg[name])
    if default is None:
        raise UnknownModelShape(
            f"the model's config.json gives none of {', '.join(names)}, so its memory cannot be estimated"
        )
    return default


def _dims(model_config: dict) -> dict:
    cfg = _cfg(model_config)
    hidden = _size(cfg, "hidden_size", "n_embd", "d_model")
    heads = _size(cfg, "num_attention_heads", "n_head", default=1)
    head_dim = _size(cfg, "head_dim", default=hidden // heads)
    kv_heads = _size(cfg, "num_key_value_heads", default=heads)
    return {
        "hidden": hidden,
        "inter": _size(cfg, "intermediate_size", "n_inner", default=4 * hidden),
        "layers": _size(cfg, "num_hidden_layers", "n_layer", "num_layers"),
        "q": heads * head_dim,
        "kv": kv_heads * head_dim,
        "vocab": _size(cfg, "vocab_size", default=32000),
    }


def check_model_shape(model_config: dict) -> None:
    """Raises UnknownModelShape when the studio could not estimate this model's memory."""
    _dims(model_config)


def _module_shapes(model_config: dict) -> dict[str, tuple[int, int]]:
    d = _dims(model_config)
    h, i = d["hidden"], d["inter"]
    return {
        "q_proj": (h, d["q"]),
        "k_proj": (h, d["kv"]),
        "v_proj": (h, d["kv"]),
        "o_proj": (d["q"], h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def _targets(target_modules) -> list[str]:
    modules = list(target_modules) if target_modules else list(DEFAULT_TARGET_MODULES)
    if "all-linear" in modules:
        return list(ALL_LINEAR)
    return modules


def count_lora_parameters(model_config: dict, r: int, target_modules) -> int:
    """LoRA parameters: for every decoder layer and targeted module, ``r × (in_features + out_features)``."""
    shapes = _module_shapes(model_config)
    per_layer = sum(r * (shapes[m][0] + shapes[m][1]) for m in _targets(target_modules) if m in shapes)
    return per_layer * _dims(model_config)["layers"]


def _linear_params(model_config: dict) -> int:
    shapes = _module_shapes(model_config)
    return sum(a * b for a, b in shapes.values()) * _dims(model_config)["layers"]


def _estimate(model_config, n_params, method, batch_size, max_length, lora_r, target_modules, gc, device):
    on_gpu = device.get("kind", "cpu") != "cpu"
    d = _dims(model_config)
    if method == "qlora":
        quantised = min(_linear_params(model_config), n_params)
        per_weight = 0.5 + 1 / 64 + 4 / (64 * 256)
        weights = int(quantised * per_weight) + (n_params - quantised) * (2 if on_gpu else 4)
    elif method == "sft":
        weights = n_params * 4
    else:
        weights = n_params * (2 if on_gpu else 4)
    adapter_params = 0 if method == "sft" else count_lora_parameters(model_config, lora_r, target_modules)
    trainable = n_params if method == "sft" else adapter_params
    adapter = adapter_params * 4
    optimizer = trainable * 8
    gradients = trainable * 4
    p = 2 if on_gpu else 4
    tokens = batch_size * max_length
    full_layer = p * tokens * (10 * d["hidden"] + 4 * d["inter"])
    layers = (d["layers"] * p * tokens * d["hidden"] + full_layer) if gc else d["layers"] * full_layer
    activations = layers + 2 * 4 * tokens * d["vocab"]
    if method == "dpo":
        activations *= 2
    total = weights + adapter + optimizer + gradients + activations
    return weights, adapter, optimizer, gradients, activations, total


def _fits(total: int, device_bytes: int) -> bool:
    return total <= device_bytes * HEADROOM


def estimate_memory(
    *,
    model_config: dict,
    n_params: int,
    method: str,
    batch_size: int,
    max_length: int,
    lora_r: int,
    target_modules: list[str] | None,
    gradient_checkpointing: bool,
    device: dict,
) -> MemoryEstimate:
    args = (model_config, n_params)
    parts = _estimate(
        *args, method, batch_size, max_length, lora_r, target_modules, gradient_checkpointing, device
    )
    device_bytes = int(device.get("total_bytes", 0))
    fits = _fits(parts[-1], device_bytes)
    suggestion = ""
    if not fits:
        suggestion = _suggest(
            args,
            method,
            batch_size,
            max_length,
            lora_r,
            target_modules,
            gradient_checkpointing,
            device,
            parts[-1],
        )
    return MemoryEstimate(*parts, device.get("name", "cpu"), device_bytes, fits, suggestion)


def _suggest(args, method, batch_size, max_length, lora_r, targets, gc, device, total) -> str:
    device_bytes = int(device.get("total_bytes", 0))

    def total_for(m=method, b=batch_size, s=max_length, g=gc) -> int:
        return _estimate(*args, m, b, s, lora_r, targets, g, device)[-1]

    b = batch_size // 2
    while b >= 1:
        if _fits(total_for(b=b), device_bytes):
            accum = max(1, batch_size // b)
            return (
                f"Use batch size {b} (with gradient accumulation ×{accum} to keep the effective batch size)."
            )
        b //= 2
    s = max_length // 2
    while s >= 128:
        if _fits(total_for(s=s), device_bytes):
            return f"Use max length {s}."
        s //= 2
    if method in ("lora", "sft") and _fits(total_for(m="qlora"), device_bytes):
        return "Use QLoRA (4-bit base model)."
    if not gc and _fits(total_for(g=True), device_bytes):
        return "Enable gradient checkpointing."
    smallest = total_for(
        m="qlora" if method in ("lora", "sft", "qlora") else method, b=1, s=min(max_length, 128), g=True
    )
    return (
        f"This needs about {total / GIB:.1f} GiB but {device.get('name', 'the device')} has "
        f"{device_bytes / GIB:.1f} GiB; even the smallest settings need {smallest / GIB:.1f} GiB. "
        "Pick a smaller base model or a larger device."
    )


def _ram_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 0


def available_devices() -> list[dict]:
    """The CPU (with its RAM) and every visible CUDA device; never fails without CUDA."""
    devices = [{"name": "cpu", "kind": "cpu", "total_bytes": _ram_bytes(), "label": "CPU"}]
    try:
        import torch

        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(index)
                devices.append(
                    {
                        "name": f"cuda:{index}",
                        "kind": "cuda",
                        "total_bytes": int(props.total_memory),
                        "label": props.name,
                    }
                )
    except Exception:  # noqa: S110 - a broken CUDA setup just means "no GPU"
        pass
    return devices
