"""Token statistics for chat datasets, measured with the selected base model's own tokenizer.

Counts are taken on the *chat-template rendering* of an example -- exactly the text the trainer
feeds the model -- so they include role markers, the default system prompt a template may insert,
and end-of-turn tokens.  No Django imports; nothing here touches the network (tokenizers are
loaded from local directories only).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Examples rendered and tokenized per batched call in count_many (bounds peak memory).
COUNT_CHUNK_SIZE = 2048


def load_tokenizer(model_dir: str | Path) -> Any:
    """Return the (fast) tokenizer saved in the local directory ``model_dir``.

    Loaded with ``local_files_only=True`` and cached per process by resolved path.  Call
    :func:`clear_tokenizer_cache` if a directory's tokenizer files are replaced in place.
    """
    resolved = Path(model_dir).expanduser().resolve()
    if not resolved.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {resolved}")
    return _load_tokenizer_cached(str(resolved))


@functools.lru_cache(maxsize=8)
def _load_tokenizer_cached(resolved_dir: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolved_dir, local_files_only=True)
    logger.info("loaded tokenizer from %s (fast=%s)", resolved_dir, getattr(tokenizer, "is_fast", False))
    return tokenizer


def clear_tokenizer_cache() -> None:
    """Forget every tokenizer cached by :func:`load_tokenizer`."""
    _load_tokenizer_cached.cache_clear()


def count_chat_tokens(tokenizer: Any, messages: list[dict]) -> int:
    """Number of tokens of ``messages`` rendered with the tokenizer's chat template.

    Uses ``apply_chat_template(messages, tokenize=True)`` (no generation prompt: a training example
    already contains its assistant turn).  A tokenizer without a chat template falls back to
    :func:`_plain_rendering` tokenized with the tokenizer's own special tokens.
    """
    if _has_template(tokenizer):
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
        return len(_input_ids(encoded))
    return len(tokenizer(_plain_rendering(messages), add_special_tokens=True)["input_ids"])


def count_many(tokenizer: Any, list_of_messages: Sequence[list[dict]]) -> list[int]:
    """Token counts for many examples; element ``i`` equals ``count_chat_tokens(tokenizer, list_of_messages[i])``.

    Templates are rendered to strings first and then tokenized with one batched call per chunk of
    :data:`COUNT_CHUNK_SIZE` examples (a fast tokenizer encodes a batch in parallel in Rust), which
    is what ``apply_chat_template(tokenize=True)`` does internally one example at a time.
    """
    counts: list[int] = []
    use_template = _has_template(tokenizer)
    for start in range(0, len(list_of_messages), COUNT_CHUNK_SIZE):
        chunk = list_of_messages[start : start + COUNT_CHUNK_SIZE]
        if use_template:
            texts = [
                tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
                for messages in chunk
            ]
            add_special = False  # the rendered template already contains every special token
        else:
            texts = [_plain_rendering(messages) for messages in chunk]
            add_special = True
        encoded = tokenizer(
            texts,
            add_special_tokens=add_special,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        counts.extend(len(ids) for ids in encoded["input_ids"])
    logger.debug("counted tokens for %d examples", len(counts))
    return counts


def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _input_ids(encoded: Any) -> list[int]:
    """``apply_chat_template(tokenize=True)`` returns a list (transformers 4.x) or a BatchEncoding (5.x)."""
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):  # a batch of one
        encoded = encoded[0]
    return list(encoded)


def _plain_rendering(messages: list[dict]) -> str:
    """Fallback rendering for tokenizers without a chat template: ``"role: content"`` per line."""
    return "\n".join(f"{m.get('role', '')}: {_content_text(m.get('content'))}" for m in messages)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multi-part content: keep the text parts
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content)


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class TokenStats:
    """Summary of per-example token counts.

    ``median`` and ``p95`` use linear interpolation between closest ranks (numpy's default,
    a.k.a. Excel ``PERCENTILE.INC``).  ``histogram`` is a list of ``(bin_lo, bin_hi, count)`` with
    half-open bins ``[bin_lo, bin_hi)`` of one "nice" integer width (1, 2, 2.5 or 5 × 10^k) aligned
    to multiples of the width; there are at most ``bins`` of them and empty bins are kept so the
    list can be drawn directly.
    """

    count: int
    total: int
    mean: float
    median: float
    p95: float
    max: int
    min: int
    histogram: list[tuple[int, int, int]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "total": self.total,
            "mean": self.mean,
            "median": self.median,
            "p95": self.p95,
            "max": self.max,
            "min": self.min,
            "histogram": [list(b) for b in self.histogram],
        }


def token_stats(lengths: Sequence[int], bins: int = 20) -> TokenStats:
    """Summarise ``lengths`` (token counts, one per example); see :class:`TokenStats`."""
    if bins < 1:
        raise ValueError("bins must be >= 1")
    values = sorted(int(v) for v in lengths)
    if not values:
        return TokenStats(count=0, total=0, mean=0.0, median=0.0, p95=0.0, max=0, min=0, histogram=[])
    if values[0] < 0:
        raise ValueError("token counts cannot be negative")
    total = sum(values)
    return TokenStats(
        count=len(values),
        total=total,
        mean=total / len(values),
        median=_percentile(values, 50),
        p95=_percentile(values, 95),
        max=values[-1],
        min=values[0],
        histogram=_histogram(values, bins),
    )


def _percentile(sorted_values: list[int], pct: float) -> float:
    """Linear-interpolation percentile of an already sorted, non-empty list."""
    rank = (len(sorted_values) - 1) * pct / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (rank - lo))


def _nice_widths() -> Iterator[int]:
    """1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, ... (integer widths only)."""
    magnitude = 1
    while True:
        for factor in (1, 2, 2.5, 5):
            width = factor * magnitude
            if width == int(width):
                yield int(width)
        magnitude *= 10


def _histogram(sorted_values: list[int], bins: int) -> list[tuple[int, int, int]]:
    lo_value, hi_value = sorted_values[0], sorted_values[-1]
    width, start, n_bins = _nice_layout(lo_value, hi_value, bins)
    counts = [0] * n_bins
    for value in sorted_values:
        counts[(value - start) // width] += 1
    return [(start + i * width, start + (i + 1) * width, c) for i, c in enumerate(counts)]


def _nice_layout(lo_value: int, hi_value: int, bins: int) -> tuple[int, int, int]:
    """Smallest nice width whose aligned bins cover ``[lo_value, hi_value]`` in at most ``bins`` bins."""
    raw = (hi_value - lo_value + 1) / bins
    for width in _nice_widths():
        if width < raw:
            continue
        start = (lo_value // width) * width
        n_bins = (hi_value - start) // width + 1
        if n_bins <= bins:
            return width, start, n_bins
    raise AssertionError("unreachable: the nice widths are unbounded")


def training_estimate(
    lengths: Sequence[int],
    *,
    epochs: float,
    batch_size: int,
    grad_accum: int,
    max_length: int,
) -> dict[str, Any]:
    """Estimate the size of a training run from per-example token counts.

    Takes the per-example ``lengths`` (not a total) because every example is truncated to
    ``max_length`` tokens, which can only be applied per example.  With ``n = len(lengths)``:

    * ``tokens_per_epoch = Σ min(length_i, max_length)``
    * ``tokens_total     = round(tokens_per_epoch × epochs)``
    * ``steps_per_epoch  = ceil(ceil(n / batch_size) / grad_accum)`` -- optimizer steps: the
      last, partial micro-batch and the last, partial accumulation still make a step (as in the
      Hugging Face ``Trainer``)
    * ``steps_total      = ceil(steps_per_epoch × epochs)`` (fractional epochs allowed)

    Also returned: ``examples`` (n), ``effective_batch_size`` (batch_size × grad_accum) and
    ``truncated_examples`` (how many examples exceed ``max_length``).
    """
    if epochs <= 0:
        raise ValueError("epochs must be > 0")
    if batch_size < 1 or grad_accum < 1 or max_length < 1:
        raise ValueError("batch_size, grad_accum and max_length must be >= 1")
    examples = len(lengths)
    tokens_per_epoch = sum(min(int(n), max_length) for n in lengths)
    micro_batches = math.ceil(examples / batch_size)
    steps_per_epoch = math.ceil(micro_batches / grad_accum)
    return {
        "examples": examples,
        "effective_batch_size": batch_size * grad_accum,
        "truncated_examples": sum(1 for n in lengths if n > max_length),
        "tokens_per_epoch": tokens_per_epoch,
        "tokens_total": round(tokens_per_epoch * epochs),
        "steps_per_epoch": steps_per_epoch,
        "steps_total": math.ceil(steps_per_epoch * epochs),
    }
