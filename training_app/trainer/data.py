"""Training data: JSONL loading, replay mixing, chat tokenisation with assistant-only labels, packing,
the length-grouped sampler and the collators.  Nothing here logs training text: only ids and counts."""

from __future__ import annotations

import bisect
import json
import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

from .errors import DataError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
DPO_HINT = 'DPO needs preference rows with chosen/rejected answers, e.g. {"prompt": "...", "chosen": "...", "rejected": "..."}'
SFT_HINT = 'Supervised training needs chat rows, e.g. {"messages": [{"role": "user", "content": "..."}, ...]}'
# Used only when a tokenizer ships without a chat template.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


# --------------------------------------------------------------------------------------------- loading
def load_jsonl(path) -> list[dict]:
    """Read a JSONL file into a list of dicts.  Blank lines are skipped; bad JSON raises DataError naming the line."""
    rows: list[dict] = []
    try:
        fh = open(path, encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise DataError(f"The training file could not be opened: {path} ({exc.strerror or exc}).")
    with fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(
                    f"Line {number} of {path} is not valid JSON ({exc.msg} at column {exc.colno})."
                )
            if not isinstance(row, dict):
                raise DataError(f"Line {number} of {path} is not a JSON object.")
            row.setdefault("_line", number)
            rows.append(row)
    if not rows:
        raise DataError(f"The training file is empty: {path}.")
    return rows


def mix_replay(train_rows: list, replay_rows: list, percent: float, seed: int) -> list:
    """Add ``round(len(train_rows) * percent / 100)`` replay rows and shuffle them in (deterministic per seed).

    Replay rows are sampled without replacement; only when there are not enough of them is every replay row
    used once and the remainder drawn with replacement (``replay_picks`` says which, without the rows).
    """
    if percent < 0:
        raise ValueError("percent must be >= 0")
    wanted = round(len(train_rows) * percent / 100)
    if wanted <= 0 or not replay_rows:
        return list(train_rows)
    rng = random.Random(seed)
    replay_rows = list(replay_rows)
    mixed = list(train_rows) + [replay_rows[i] for i in _picks(rng, wanted, len(replay_rows))]
    rng.shuffle(mixed)
    return mixed


def replay_picks(train_count: int, replay_count: int, percent: float, seed: int) -> list[int]:
    """The indices of the replay rows ``mix_replay`` adds to ``train_count`` train rows from
    ``replay_count`` replay rows (a row drawn twice appears twice): the training estimate counts exactly
    those."""
    wanted = round(train_count * percent / 100)
    if percent < 0 or wanted <= 0 or not replay_count:
        return []
    return _picks(random.Random(seed), wanted, replay_count)


def _picks(rng: random.Random, wanted: int, n: int) -> list[int]:
    # random.sample and random.choices pick by index from the length alone: the same indices for range(n)
    # as for a list of n rows
    if wanted <= n:
        return rng.sample(range(n), wanted)
    return list(range(n)) + rng.choices(range(n), k=wanted - n)


def _line(row: dict, index: int) -> int:
    return int(row.get("_line", index + 1))


def check_sft_rows(rows: list[dict], path: str = "the training file") -> list[list[dict]]:
    """Return each row's messages, raising DataError (naming the line) on rows that are not chat rows."""
    conversations = []
    for index, row in enumerate(rows):
        line = _line(row, index)
        messages = row.get("messages")
        if messages is None:
            if "chosen" in row or "rejected" in row:
                raise DataError(
                    f"Line {line} of {path} is a preference (DPO) row, but this job trains on chat rows. {SFT_HINT}."
                )
            raise DataError(f"Line {line} of {path} has no 'messages'. {SFT_HINT}.")
        if not isinstance(messages, list) or not messages:
            raise DataError(f"Line {line} of {path}: 'messages' must be a non-empty list.")
        for turn, message in enumerate(messages, start=1):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise DataError(f"Line {line} of {path}: message {turn} needs a text 'content'.")
            if message.get("role") not in ROLES:
                raise DataError(
                    f"Line {line} of {path}: message {turn} has role {message.get('role')!r}; "
                    f"use one of {', '.join(ROLES)}."
                )
        conversations.append([{"role": m["role"], "content": m["content"]} for m in messages])
    return conversations


def preference_rows(rows: list[dict], path: str = "the training file") -> list[dict]:
    """Convert DPO rows to TRL's conversational preference format (prompt / chosen / rejected message lists)."""
    out = []
    for index, row in enumerate(rows):
        line = _line(row, index)
        if "chosen" not in row or "rejected" not in row:
            raise DataError(f"Line {line} of {path} is not a preference row. {DPO_HINT}.")
        if isinstance(row.get("messages"), list) and row["messages"]:
            prompt = check_sft_rows([{"messages": row["messages"], "_line": line}], path)[0]
        elif isinstance(row.get("prompt"), str):
            prompt = [{"role": "user", "content": row["prompt"]}]
        elif isinstance(row.get("prompt"), list):
            prompt = check_sft_rows([{"messages": row["prompt"], "_line": line}], path)[0]
        else:
            raise DataError(f"Line {line} of {path} has no prompt (or messages). {DPO_HINT}.")
        answers = {}
        for key in ("chosen", "rejected"):
            value = row[key]
            if isinstance(value, str):
                answers[key] = [{"role": "assistant", "content": value}]
            elif isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
                answers[key] = [
                    {"role": m.get("role", "assistant"), "content": str(m.get("content", ""))} for m in value
                ]
            else:
                raise DataError(f"Line {line} of {path}: '{key}' must be the answer text. {DPO_HINT}.")
        out.append({"prompt": prompt, "chosen": answers["chosen"], "rejected": answers["rejected"]})
    return out


# ---------------------------------------------------------------------------------------- tokenising
def _render(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    template = getattr(tokenizer, "chat_template", None) or FALLBACK_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
    )


def _assistant_spans(tokenizer, messages: list[dict], full: str) -> list[tuple[int, int]]:
    """Character spans of the full rendering that are trained: each assistant turn's content and end-of-turn
    token, found by rendering prefixes of the conversation (works without ``{% generation %}`` markers)."""
    spans = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1])
        if full.startswith(before) and full.startswith(upto) and len(upto) >= len(before):
            start, end = len(before), len(upto.rstrip())
        else:  # unusual template: fall back to locating the content itself
            start = full.find(message["content"], cursor)
            if start < 0:
                continue
            end = start + len(message["content"])
            eos = getattr(tokenizer, "eos_token", None)
            if eos and full.startswith(eos, end):
                end += len(eos)
        if end > start:
            spans.append((start, end))
            cursor = end
    return spans


def tokenize_chat(tokenizer, messages: list[dict], max_length: int, assistant_only_loss: bool = True) -> dict:
    """Token ids and labels for one conversation.  With ``assistant_only_loss`` labels are -100 everywhere but
    the assistant turns' content and their end-of-turn token (system/user turns and the assistant header are
    not trained).  Sequences longer than ``max_length`` are cut at the end."""
    full = _render(tokenizer, messages)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    if not assistant_only_loss:
        labels = list(input_ids)
    else:
        spans = _assistant_spans(tokenizer, messages, full)
        labels = [IGNORE_INDEX] * len(input_ids)
        offsets = encoded["offset_mapping"]
        span_index = 0
        for t, (start, end) in enumerate(offsets):
            if end <= start:
                continue
            while span_index < len(spans) and spans[span_index][1] <= start:
                span_index += 1
            # a token overlapping the answer is trained, also one that starts before it: a byte-level
            # BPE merges the space after "assistant:" into the answer's first word (" it")
            if span_index < len(spans) and spans[span_index][0] < end:
                labels[t] = input_ids[t]
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


def tokenize_conversations(tokenizer, conversations, max_length: int, assistant_only_loss: bool = True):
    """Tokenise many conversations; returns (examples, dropped) where dropped counts rows left with no
    trained token (e.g. no assistant turn within ``max_length``)."""
    examples, dropped = [], 0
    for messages in conversations:
        example = tokenize_chat(tokenizer, messages, max_length, assistant_only_loss)
        if all(label == IGNORE_INDEX for label in example["labels"]):
            dropped += 1
            continue
        examples.append(example)
    return examples, dropped


# ------------------------------------------------------------------------------------------- packing
def pack_examples(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing of example indices into rows holding at most ``max_length`` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin id)
    for i in order:
        need = lengths[i]
        pos = bisect.bisect_left(free, (need, -1))
        if pos < len(free):
            remaining, bin_id = free.pop(pos)
            bins[bin_id].append(i)
            bisect.insort(free, (remaining - need, bin_id))
        else:
            bins.append([i])
            bisect.insort(free, (max_length - need, len(bins) - 1))
    return bins


def packed_rows(examples: list[dict], max_length: int, seed: int) -> list[dict]:
    """Concatenate examples into rows; ``position_ids`` restart at 0 for each example so that attention stays
    inside it (padding-free packing), and the first token of every example is never a prediction target."""
    bins = pack_examples([len(e["input_ids"]) for e in examples], max_length)
    random.Random(seed).shuffle(bins)
    rows = []
    for members in bins:
        input_ids, labels, position_ids = [], [], []
        for i in members:
            example = examples[i]
            input_ids.extend(example["input_ids"])
            labels.extend([IGNORE_INDEX, *example["labels"][1:]])
            position_ids.extend(range(len(example["input_ids"])))
        rows.append({"input_ids": input_ids, "labels": labels, "position_ids": position_ids})
    return rows


class ListDataset:
    """A minimal map-style dataset over a list of feature dicts."""

    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]

    def lengths(self) -> list[int]:
        return [len(item["input_ids"]) for item in self.items]


class LengthGroupedSampler:
    """Yields indices so that consecutive groups of ``batch_size`` have similar lengths (little padding).

    Each epoch (seeded by ``seed + epoch``): shuffle, cut into mega-batches of ``batch_size * mega`` examples,
    sort each by length, cut into batches, shuffle the batches; the batch holding the longest example goes
    first so that an out-of-memory error shows up on the first step.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, mega: int = 64):
        self.lengths = list(lengths)
        self.batch_size = max(1, batch_size)
        self.seed = seed
        self.mega = mega
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        size = self.batch_size * self.mega
        batches = []
        for start in range(0, len(order), size):
            chunk = sorted(order[start : start + size], key=lambda i: -self.lengths[i])
            batches.extend(chunk[b : b + self.batch_size] for b in range(0, len(chunk), self.batch_size))
        rng.shuffle(batches)
        if batches:
            longest = max(range(len(batches)), key=lambda b: max(self.lengths[i] for i in batches[b]))
            batches.insert(0, batches.pop(longest))
        return batches

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch


class Collator:
    """Pads a batch to its longest row.  Unpacked rows get an ``attention_mask``; packed rows (with
    ``position_ids``) get none, and their filler is its own segment (positions from 0, labels -100) so the
    block-diagonal mask built from ``position_ids`` keeps every example apart.  Adds ``real_tokens`` (the
    non-padding token count), which the trainer removes before the forward pass."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        packed = "position_ids" in features[0]
        ids, labels, extra = [], [], []
        real = 0
        for f in features:
            n = len(f["input_ids"])
            fill = width - n
            real += n
            ids.append(list(f["input_ids"]) + [self.pad_token_id] * fill)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * fill)
            if packed:
                extra.append(list(f["position_ids"]) + list(range(fill)))
            else:
                extra.append([1] * n + [0] * fill)
        batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if packed:
            batch["position_ids"] = torch.tensor(extra)
        else:
            batch["attention_mask"] = torch.tensor(extra)
        batch["real_tokens"] = torch.tensor(real)
        return batch


def count_tokens(examples: list[dict]) -> int:
    return sum(len(e["input_ids"]) for e in examples)


def steps_per_epoch(n_rows: int, batch_size: int, grad_accum: int, world_size: int = 1) -> int:
    micro = math.ceil(n_rows / max(1, batch_size * world_size))
    return max(1, math.ceil(micro / max(1, grad_accum)))
