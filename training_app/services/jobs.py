"""Training jobs: validation, estimates, the queue (priority, claim, cancel, watchdog) and the Celery
adapter that runs one attempt through `training_app.trainer` and records what it reports.

The database is the queue. Every launch (and every requeue) sends one `run_next` message on queue
"gpu"; a worker receiving it claims the highest-priority queued job with a conditional UPDATE, so
priority changes take effect without touching the broker and a job is never run twice at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import socket
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.db.models.functions import Coalesce, Now
from django.utils import timezone

from datasets_app.models import Dataset, DatasetVersion
from studio import audit
from studio.heartbeat import Heartbeat
from studio.queueing import cancel_or_flag, quietly, send_or_fail

from ..models import BaseModel, ComputeNode, TrainingJob, TrainingMetric
from ..presets import COMMON, PRESETS
from ..trainer.callbacks import Reporter
from ..trainer.data import steps_per_epoch as trainer_steps_per_epoch

log = logging.getLogger(__name__)

State = TrainingJob.State
Method = TrainingJob.Method

CONFIG_FIELDS = tuple(COMMON)
INT_FIELDS = {
    "lora_r",
    "lora_alpha",
    "max_steps",
    "batch_size",
    "grad_accum",
    "max_length",
    "seed",
    "eval_every",
    "checkpoint_every",
}
FLOAT_FIELDS = {"lora_dropout", "learning_rate", "warmup_ratio", "epochs", "dpo_beta"}
BOOL_FIELDS = {"packing", "assistant_only_loss", "gradient_checkpointing"}
ALL_LINEAR = "all-linear"
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


class JobRefused(Exception):
    """The job cannot be launched or changed; `problems` are plain sentences for the person."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(" ".join(self.problems))


# --- configuration -----------------------------------------------------------------------------------


def normalise_config(raw: dict) -> tuple[dict, list[str]]:
    """Coerce user-supplied values (form strings, CLI values) to typed TrainConfig fields."""
    config: dict = {}
    problems: list[str] = []
    for key in CONFIG_FIELDS:
        value = raw.get(key, COMMON[key])
        label = key.replace("_", " ")
        try:
            if key == "target_modules":
                if isinstance(value, str):
                    value = [m.strip() for m in value.replace(",", " ").split() if m.strip()]
                value = [str(m) for m in value or []]
                if not value:
                    problems.append("Target modules: name at least one module (e.g. q_proj v_proj).")
            elif key == "max_steps":
                value = None if value in (None, "", 0, "0") else int(value)
            elif key in INT_FIELDS:
                value = int(value)
            elif key in FLOAT_FIELDS:
                value = float(value)
                if not math.isfinite(value):
                    raise ValueError
            elif key in BOOL_FIELDS:
                if not isinstance(value, bool):
                    text = str(value).strip().lower()
                    if text not in {"1", "true", "on", "yes", "0", "false", "off", "no", ""}:
                        problems.append(f"{label.capitalize()}: “{value}” is not true or false.")
                    value = text in {"1", "true", "on", "yes"}
            elif key == "lr_scheduler":
                value = str(value)
        except (TypeError, ValueError):
            problems.append(f"{label.capitalize()}: “{value}” is not a valid number.")
            value = COMMON[key]
        config[key] = value
    return config, problems


def check_config(
    *,
    dataset_version: DatasetVersion | None,
    base_model: BaseModel | None,
    method: str,
    config: dict,
    replay_version: DatasetVersion | None = None,
    replay_percent: float = 0.0,
    merge: bool = False,
) -> list[str]:
    """Every reason this job cannot run, in plain words (empty when it can)."""
    problems: list[str] = []
    if method not in Method.values:
        problems.append(f"Method “{method}” is unknown; choose one of {', '.join(Method.values)}.")
    if base_model is None:
        problems.append("Choose a base model.")
    elif base_model.status != BaseModel.Status.ACTIVE:
        state = {BaseModel.Status.FAILED: "could not be prepared"}.get(base_model.status, base_model.status)
        problems.append(f"Base model {base_model.name} is {state}; choose an available one.")
    elif not _model_config(base_model):
        problems.append(
            f"Base model {base_model.name}'s files are missing or unreadable at {base_model.local_dir}: "
            "an admin can restore them or retire the model."
        )
    if method != Method.SFT and base_model is not None and config.get("target_modules"):
        known = _linear_module_names(base_model)
        # "all-linear" is PEFT's own shorthand (the trainer passes it on as such), not a layer name
        unknown = [m for m in config["target_modules"] if known and m not in known and m != ALL_LINEAR]
        if unknown:
            problems.append(
                f"Target modules: {', '.join(unknown)} not in {base_model.name}, whose layers are "
                f"{', '.join(sorted(known))}."
            )
    if method == Method.DPO and config.get("packing"):
        problems.append("Packing is not available for DPO; turn packing off.")
    if merge and method == Method.SFT:
        problems.append("Merging only applies to adapter methods (LoRA, QLoRA, DPO); turn merge off for SFT.")
    if dataset_version is None:
        problems.append("Choose a frozen dataset version.")
    else:
        counts = dataset_version.counts or {}
        label = f"{dataset_version.dataset.name} v{dataset_version.number}"
        if method == Method.DPO and dataset_version.kind != Dataset.Kind.PREFERENCE:
            problems.append(
                f"DPO needs a preference dataset version (prompt, chosen, rejected); {label} is an SFT "
                "dataset. Choose a preference dataset or the SFT, LoRA or QLoRA method."
            )
        if (
            method in (Method.SFT, Method.LORA, Method.QLORA)
            and dataset_version.kind == Dataset.Kind.PREFERENCE
        ):
            problems.append(
                f"{label} is a preference dataset; train it with DPO, or choose an SFT dataset version."
            )
        if not counts.get("train"):
            problems.append(
                f"{label} has no examples in the train split. Assign a train split on the dataset's "
                "examples page and freeze a new version."
            )
        if config.get("eval_every") and not counts.get("eval"):
            problems.append(
                f"Evaluation every N steps needs an eval split, and {label} has none: set it to 0 or "
                "freeze a version with an eval split."
            )
    if replay_version is not None:
        if not 0 < replay_percent <= 100:
            problems.append(f"Replay share must be above 0 and at most 100 percent (got {replay_percent:g}).")
        if dataset_version is not None and replay_version.pk == dataset_version.pk:
            problems.append("Replay must come from an earlier dataset version, not the one being trained.")
        if not (replay_version.counts or {}).get("train"):
            replay_label = f"{replay_version.dataset.name} v{replay_version.number}"
            problems.append(
                f"Replay from {replay_label}: it has no examples in the train split, so nothing would be "
                "replayed. Choose a version with train examples, or set the replay share to 0."
            )
        if dataset_version is not None and replay_version.kind != dataset_version.kind:
            problems.append(
                "Replay examples must be of the same kind (SFT or preference) as the training set."
            )
    elif replay_percent:
        problems.append("Choose the dataset version to replay examples from, or set the replay share to 0.")
    problems.extend(_range_problems(config, base_model))
    if method == Method.QLORA and not _bitsandbytes_available():
        problems.append(
            "QLoRA needs the bitsandbytes package, which is not installed on this studio: "
            "install bitsandbytes on the workers or choose LoRA."
        )
    return problems


MAX_STEPS = 10_000_000  # far beyond any run here, and within the step columns of every database


def _range_problems(config: dict, base_model: BaseModel | None) -> list[str]:
    problems = []
    checks = [
        ("lora_r", 1, 1024, "LoRA rank r"),
        ("lora_alpha", 1, 4096, "LoRA alpha"),
        ("batch_size", 1, 1024, "Batch size"),
        ("grad_accum", 1, 1024, "Gradient accumulation"),
        ("max_length", 16, 1_000_000, "Max length"),
        ("checkpoint_every", 1, 1_000_000, "Checkpoint every"),
        ("eval_every", 0, 1_000_000, "Eval every"),
        ("seed", 0, 2**31 - 1, "Seed"),
    ]
    for key, lo, hi, label in checks:
        value = config.get(key)
        if value is not None and not lo <= value <= hi:
            problems.append(f"{label} must be between {lo} and {hi} (got {value}).")
    if not 0 < config.get("learning_rate", 0) <= 1:
        problems.append(f"Learning rate must be above 0 and at most 1 (got {config.get('learning_rate')}).")
    if not 0 <= config.get("lora_dropout", 0) < 1:
        problems.append("LoRA dropout must be at least 0 and below 1.")
    if not 0 <= config.get("warmup_ratio", 0) < 1:
        problems.append("Warmup ratio must be at least 0 and below 1.")
    if not 0 < config.get("dpo_beta", 0.1) <= 10:
        problems.append("DPO beta must be above 0 and at most 10.")
    max_steps = config.get("max_steps")
    if max_steps is not None and not 1 <= max_steps <= MAX_STEPS:
        problems.append(f"Max steps must be between 1 and {MAX_STEPS:,}, or empty to train by epochs.")
    if max_steps is None and not 0 < config.get("epochs", 0) <= 100:
        problems.append("Epochs must be above 0 and at most 100 (or set max steps).")
    if config.get("lr_scheduler") not in SCHEDULERS:
        problems.append(f"Scheduler must be one of {', '.join(SCHEDULERS)}.")
    if base_model is not None and config.get("max_length", 0) > base_model.context_length:
        problems.append(
            f"Max length {config['max_length']} is above {base_model.name}'s context of "
            f"{base_model.context_length} tokens; use {base_model.context_length} or less."
        )
    return problems


def _bitsandbytes_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


# --- estimates ---------------------------------------------------------------------------------------


def known_devices() -> list[dict]:
    """Devices the gpu workers reported, newest report per worker; this machine's when none has."""
    devices: dict[str, dict] = {}
    for node in ComputeNode.objects.all():
        for device in node.devices:
            key = device.get("label") or device.get("name")
            entry = devices.setdefault(key, {**device, "workers": []})
            entry["workers"].append(node.hostname)
    if devices:
        return sorted(devices.values(), key=lambda d: (d.get("kind") != "cuda", d.get("label", "")))
    from ..trainer.estimate import available_devices

    return [{**d, "workers": []} for d in available_devices()]


def estimate(
    *,
    dataset_version: DatasetVersion,
    base_model: BaseModel,
    method: str,
    config: dict,
    replay_version: DatasetVersion | None = None,
    replay_percent: float = 0.0,
    device: dict | None = None,
) -> dict:
    """Tokens, steps and epochs of the run and its memory against the target device. The token figures
    are those of `base_model`'s tokenizer (see `train_lengths`); `token_sources` says how they were had.
    Train examples the trainer will skip (no trained token within the max length: see `skipped_train`)
    are left out of every figure and reported under `skipped`; when it would skip them all, JobRefused.
    The eval split's examples the trainer will skip are reported under `eval_skipped` (see
    `_eval_skipped`); when evaluation every N steps is on and it would skip them all, JobRefused too."""

    lengths, source = train_lengths(dataset_version, base_model)
    max_length = config["max_length"]
    # the replay share is of the whole train split: the worker mixes it in before the trainer skips rows
    extra = round(len(lengths) * replay_percent / 100) if replay_version is not None and replay_percent else 0
    skipped = skipped_train(dataset_version, base_model, method, config, lengths)
    eval_skipped = _eval_skipped(dataset_version, base_model, method, config)
    refusals = []
    if skipped["examples"] and skipped["examples"] == len(lengths) and not skipped["approximate"]:
        refusals.append(_all_skipped_message(len(lengths), max_length))
    eval_every = config.get("eval_every") or 0
    if (
        eval_every
        and eval_skipped
        and eval_skipped["examples"] == eval_skipped["of"]
        and not eval_skipped["approximate"]
    ):
        # the trainer fails at its start: "No evaluation row has an assistant answer within the max length…"
        # (DPO: "No evaluation pair's prompt fits in the max length…")
        refusals.append(
            _all_skipped_message(eval_skipped["of"], max_length, split="eval", eval_every=eval_every)
        )
    if refusals:
        raise JobRefused(refusals)
    train_count = len(lengths)
    lengths = _kept(lengths, skipped)
    replay_source, replay = None, None
    if extra:
        replay_lengths, replay_source = train_lengths(replay_version, base_model)
        if replay_lengths:
            # exactly the rows the worker mixes in (the same seeded draw), less those the trainer skips
            from ..trainer.data import replay_picks

            picks = replay_picks(train_count, len(replay_lengths), replay_percent, config.get("seed", 42))
            replay_skipped = skipped_train(replay_version, base_model, method, config, replay_lengths)
            gone = set(replay_skipped["indices"])
            kept_replay = [replay_lengths[i] for i in picks if i not in gone]
            lengths += kept_replay
            replay = {
                "examples": len(picks),
                "skipped": len(picks) - len(kept_replay),
                "max_length": max_length,
                "approximate": replay_skipped["approximate"],
            }
    truncated = [min(n, max_length) for n in lengths]
    replay_approximate = bool(replay and replay["approximate"] and replay["skipped"])
    approximate = (
        any(s and s["method"] == SAMPLED for s in (source, replay_source))
        or skipped["approximate"]
        or replay_approximate
    )
    packed = bool(config.get("packing")) and method != Method.DPO
    if packed:
        from ..trainer.data import pack_examples

        rows = max(1, len(pack_examples(truncated, max_length)))  # the trainer's own packing
    else:
        rows = len(lengths)
    per_step = config["batch_size"] * config["grad_accum"]
    steps_per_epoch = trainer_steps_per_epoch(rows, config["batch_size"], config["grad_accum"])
    if config.get("max_steps"):
        steps = config["max_steps"]
        epochs = steps / steps_per_epoch
    else:
        epochs = config["epochs"]
        steps = math.ceil(steps_per_epoch * epochs)
    if steps > MAX_STEPS:
        raise JobRefused(
            f"This run would take {steps:,} steps, more than the {MAX_STEPS:,} a job may take: "
            "train fewer epochs, set max steps or raise the batch size."
        )
    tokens_per_epoch = sum(truncated)
    figures = {
        "examples": len(lengths),
        "rows": rows,
        "truncated_examples": sum(1 for n in lengths if n > max_length),
        "tokens_per_epoch": tokens_per_epoch,
        "tokens_total": round(tokens_per_epoch * epochs),
        "effective_batch_size": per_step,
        "steps_per_epoch": steps_per_epoch,
        "steps": steps,
        "epochs": round(epochs, 3),
        # where the token counts come from (the page says so): the train split's, then the replay's
        "token_sources": [{"part": "train", **source}]
        + ([{"part": "replay", **replay_source}] if replay_source else []),
        # the token figures (and with packing the steps) are extrapolated from a sample
        "approximate": approximate,
        # the kept examples (and so the rows and steps) are extrapolated from a sample of the long ones
        "examples_approximate": skipped["approximate"] or replay_approximate,
        "steps_approximate": ((approximate and packed) or skipped["approximate"] or replay_approximate)
        and not config.get("max_steps"),
        # train examples the trainer will skip, and why (the page says so)
        "skipped": {k: v for k, v in skipped.items() if k != "indices"},
        # the replayed examples mixed in, and how many of them the trainer will skip (None: no replay)
        "replay": replay,
        # the same for the eval split (None: no eval split, or not checked: see `_eval_skipped`)
        "eval_skipped": {k: v for k, v in eval_skipped.items() if k != "indices"} if eval_skipped else None,
    }
    devices = known_devices()
    target = device or devices[0]
    from ..trainer.estimate import UnknownModelShape

    try:
        memory = _memory(base_model, method, config, target)
    except UnknownModelShape as exc:
        raise JobRefused(f"Base model {base_model.name}: {exc}. Choose another base model.") from None
    figures["memory"] = memory.as_dict()
    figures["devices"] = [
        {"label": d.get("label") or d.get("name"), "kind": d.get("kind"), "total_bytes": d.get("total_bytes")}
        for d in devices
    ]
    return figures


# How the token counts behind an estimate were had (`token_sources[i]["method"]`):
STORED = "stored"  # the version's stored counts, made with this base model's tokenizer (the fast path)
STORED_UNKNOWN = "stored_unknown"  # stored counts whose tokenizer the version does not record
COUNTED = "counted"  # every example counted now with this base model's tokenizer
SAMPLED = "sampled"  # a sample counted now with it, extrapolated to the whole split
# At most this many examples are counted for a page request; a larger split is estimated from an evenly
# spaced sample of this size (a fast tokenizer counts it in well under a second).
TOKEN_SAMPLE_SIZE = 2000
TOKEN_COUNTS_CACHE_SECONDS = 3600


def train_lengths(
    version: DatasetVersion, base_model: BaseModel, split: str = "train", *, count: bool = True
) -> tuple[list[int] | None, dict]:
    """Token counts of the version's `split` examples (the train split unless told; in position order)
    as `base_model`'s tokenizer makes them, and where they come from: {"method", "tokenizer",
    "counted_with", "examples", "sample"}. With `count` False, counts that would have to be made now
    (the stored ones are not usable) are not: (None, the source as it would be) instead.

    The counts stored with a version were made with the tokenizer of the dataset's base model
    (`version.base_model`) when the examples were imported. When that is the job's base model they are
    used as they are; otherwise the examples are counted with the job's tokenizer, exactly as the importer
    counts them (the chat-template rendering; a preference pair's longer side), all of them up to
    TOKEN_SAMPLE_SIZE, else a sample (`spread_sample`) whose counts are extrapolated and labelled an estimate.
    A version without a base model has no counts (0) and is counted too; one whose nonzero counts name no
    tokenizer (made outside the importer) keeps them, labelled as such."""
    rows = list(version.examples.filter(split=split).order_by("position").values_list("pk", "token_count"))
    stored = [count for _pk, count in rows]
    counted_with = version.base_model.name if version.base_model_id else ""
    source = {
        "method": STORED,
        "tokenizer": base_model.name,
        "counted_with": counted_with,
        "examples": len(rows),
        "sample": 0,
    }
    if version.base_model_id == base_model.pk:
        return stored, source
    if version.base_model_id is None and any(stored):
        return stored, {**source, "method": STORED_UNKNOWN}
    if not rows:
        return [], {**source, "method": COUNTED}
    picks = spread_sample(len(rows), TOKEN_SAMPLE_SIZE, version.pk)
    if not count:
        return None, {**source, "method": COUNTED if len(picks) == len(rows) else SAMPLED}
    counts = _sample_counts(version, [rows[i][0] for i in picks], base_model, split)
    if len(picks) == len(rows):
        return counts, {**source, "method": COUNTED, "sample": len(rows)}
    return _extrapolate(stored, picks, counts), {**source, "method": SAMPLED, "sample": len(picks)}


def _sample_counts(
    version: DatasetVersion, ids: list[int], base_model: BaseModel, split: str = "train"
) -> list[int]:
    """`_count_examples`, kept a while in the cache: a version never changes, and the form asks for the
    estimate again at every change of a field (the counting takes up to about a second). `split` is the
    split `ids` come from (two splits of the same size must not share an entry)."""
    from django.core.cache import cache

    key = f"training:token-counts:{version.pk}:{base_model.pk}:{split}:{len(ids)}"
    counts = cache.get(key)
    if not isinstance(counts, list) or len(counts) != len(ids):
        counts = _count_examples(version, ids, base_model)
        cache.set(key, counts, TOKEN_COUNTS_CACHE_SECONDS)
    return counts


def _count_examples(version: DatasetVersion, ids: list[int], base_model: BaseModel) -> list[int]:
    """`ids`' token counts with `base_model`'s tokenizer, in the order given (datasets_app.tokens, the
    importer's counting: the chat-template rendering; a preference pair's longer side)."""
    from datasets_app.tokens import count_many

    tokenizer = _job_tokenizer(base_model)
    found = {
        pk: (messages, chosen, rejected, position)
        for pk, messages, chosen, rejected, position in version.examples.filter(pk__in=ids).values_list(
            "pk", "messages", "chosen", "rejected", "position"
        )
    }
    conversations: list[list[dict]] = []
    sides: list[int] = []  # how many conversations each example counts as (1, or 2 for a pair)
    for pk in ids:
        messages, chosen, rejected, _position = found[pk]
        if chosen is None:
            conversations.append(messages)
            sides.append(1)
        else:
            conversations.append(messages + [{"role": "assistant", "content": chosen}])
            conversations.append(messages + [{"role": "assistant", "content": rejected or ""}])
            sides.append(2)
    try:
        counted = count_many(tokenizer, conversations)
    except Exception as exc:  # the chat template refuses one (no system role, roles must alternate, …)
        positions = [found[pk][3] for pk in ids]
        refusal = _template_refusal(tokenizer, base_model, exc, conversations, sides, positions)
        if refusal is None:
            raise  # every conversation renders: not the template but a fault, logged with its traceback
        raise refusal from None
    out, i = [], 0
    for n in sides:
        out.append(max(counted[i : i + n]))
        i += n
    return out


def _job_tokenizer(base_model: BaseModel):
    """`base_model`'s tokenizer (cached per process by datasets_app.tokens), or JobRefused in plain words."""
    from datasets_app.tokens import load_tokenizer

    try:
        return load_tokenizer(str(base_model.local_dir))
    except Exception as exc:  # missing or unreadable tokenizer files: the trainer could not load it either
        log.warning(
            "base model %s: tokenizer unreadable for an estimate (%s)", base_model.pk, type(exc).__name__
        )
        raise JobRefused(
            f"Base model {base_model.name}'s tokenizer could not be read from {base_model.local_dir}, so "
            "this job's tokens cannot be counted (and it could not train): an admin can restore the "
            "model's tokenizer files or retire the model; choose another base model meanwhile."
        ) from None


def _template_refusal(
    tokenizer, base_model: BaseModel, exc: Exception, conversations, sides, positions
) -> JobRefused | None:
    """JobRefused naming the first example `base_model`'s chat template refuses (its number in the version)
    and the template's own words, never the example's text (nor in the log); None when each renders."""
    from jinja2 import TemplateError

    owner = [position for position, n in zip(positions, sides, strict=True) for _ in range(n)]
    where = None
    if getattr(tokenizer, "chat_template", None):
        for i, messages in enumerate(conversations):
            try:
                tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
            except Exception:  # the one that refuses
                where = f"example {owner[i] + 1}"
                break
    if where is None:
        return None
    said = f' (the template says: "{str(exc)[:200]}")' if isinstance(exc, TemplateError) else ""
    log.warning("base model %s: chat template refused %s (%s)", base_model.pk, where, type(exc).__name__)
    return JobRefused(
        f"Base model {base_model.name}'s chat template refuses {where} of this dataset version{said}, so the "
        "job could not train on it either: choose a base model whose chat template accepts these "
        "conversations (e.g. one that allows a system message), or edit the dataset and freeze a new version."
    )


def spread_sample(n: int, size: int, seed: int) -> list[int]:
    """Indices of a sample of ``size`` of ``n`` items (all of them when ``n <= size``), in order: one drawn
    at random from each of ``size`` equal stretches, with a fixed seed (the same picks on every request,
    so that counts cached for them stay valid). Evenly spaced picks alias with data that repeats in a
    regular pattern (every k-th example alike) and can miss a whole kind of example."""
    size = max(1, size)
    if n <= size:
        return list(range(n))
    rng = random.Random(seed)
    return [rng.randrange(i * n // size, (i + 1) * n // size) for i in range(size)]


def _extrapolate(stored: list[int], picks: list[int], counts: list[int]) -> list[int]:
    """Every example's count from a sample's (``spread_sample``: one pick per stretch): the sampled ones
    exactly; the others from their stored counts scaled by the sample's ratio of new to stored tokens
    (keeping which examples are long, for the cut at max length and for packing) or, with no stored
    counts, the count of the sampled example nearest before them (the first one's for those before it)."""
    import bisect

    stored_in_sample = sum(stored[i] for i in picks)
    if stored_in_sample:
        ratio = sum(counts) / stored_in_sample
        lengths = [max(1, round(n * ratio)) if n else 0 for n in stored]
    else:
        lengths = [counts[max(0, bisect.bisect_right(picks, i) - 1)] for i in range(len(stored))]
    for i, count in zip(picks, counts, strict=True):
        lengths[i] = count
    return lengths


def skipped_train(
    version: DatasetVersion,
    base_model: BaseModel,
    method: str,
    config: dict,
    lengths: list[int],
    split: str = "train",
) -> dict:
    """The train examples (or those of `split`: the trainer tokenises the eval split the same way and
    skips the same ones) the trainer will skip for having no trained token within the max length:
    {"examples", "of", "max_length", "candidates", "measured", "approximate", "indices"}.

    SFT (with assistant-only loss, the default): a conversation whose tokens before its first answer fill
    the max length (`trainer.data.tokenize_conversations` drops it); without assistant-only loss every
    token is trained and nothing is skipped. DPO: a pair whose prompt fills the max length (TRL's
    DPOTrainer drops it; see `_dpo_prompt_fills`). Only an example longer than (DPO: as long as) the max
    length (`lengths`, as `train_lengths` gives them for `split`) can be skipped, so only those are
    tokenised, with `base_model`'s tokenizer and the trainer's own tokenisation; beyond TOKEN_SAMPLE_SIZE
    of them a sample (`spread_sample`) is, and its share skipped extrapolated ("approximate"). `indices` are
    positions in `lengths` of examples counted as skipped (the measured ones, then other candidates to
    make up an extrapolated count: every candidate is cut to the max length, so which ones does not
    change a figure)."""
    max_length = config["max_length"]
    dpo = method == Method.DPO
    skipped = {
        "examples": 0,
        "of": len(lengths),
        "max_length": max_length,
        "candidates": 0,
        "measured": 0,
        "approximate": False,
        "indices": [],
    }
    if not dpo and not config.get("assistant_only_loss", True):
        return skipped  # every token is trained: a cut row still has some
    # SFT: a row not longer than the max length keeps its answer (the importer requires one); DPO: a
    # prompt that fills the max length makes the pair at least that long
    candidates = [i for i, n in enumerate(lengths) if (n >= max_length if dpo else n > max_length)]
    if not candidates:
        return skipped
    picks = [candidates[i] for i in spread_sample(len(candidates), TOKEN_SAMPLE_SIZE, version.pk)]
    pks = list(version.examples.filter(split=split).order_by("position").values_list("pk", flat=True))
    dropped_pks = set(_sample_skipped(version, [pks[i] for i in picks], base_model, dpo, config))
    dropped = [i for i in picks if pks[i] in dropped_pks]
    count = len(dropped)
    if len(picks) < len(candidates):
        count = round(len(dropped) * len(candidates) / len(picks))
        measured = set(picks)
        dropped += [i for i in candidates if i not in measured][: max(0, count - len(dropped))]
    return {
        **skipped,
        "examples": count,
        "candidates": len(candidates),
        "measured": len(picks),
        "approximate": len(picks) < len(candidates),
        "indices": dropped[:count],
    }


def _kept(lengths: list[int], skipped: dict) -> list[int]:
    """`lengths` without the examples `skipped` (as `skipped_train` gives it for them) counts as skipped."""
    if not skipped["examples"]:
        return lengths
    gone = set(skipped["indices"])
    return [n for i, n in enumerate(lengths) if i not in gone]


def version_skipped(version: DatasetVersion, max_length: int) -> dict:
    """For the dataset version page's training estimate (datasets_app.tokens.training_estimate of the
    stored token counts): the train split's stored counts less the examples the trainer would skip at
    `max_length`, as `estimate` leaves them out (`skipped_train` with the version's own base model, whose
    tokenizer made the stored counts; SFT with assistant-only loss, the presets' default, or DPO for a
    preference version), and what the launch page's banners show of them:
    {"lengths", "skipped", "eval_skipped", "unchecked"}. `unchecked` is None, or the sentence saying why
    the skipped examples could not be checked (the version has no base model, its tokenizer cannot be read,
    its chat template refuses an example…); the lengths are then every stored count and nothing is
    counted as skipped. Like `estimate`, only the examples as long as the max length are tokenised, and
    beyond TOKEN_SAMPLE_SIZE of them a sample is ("approximate")."""
    base_model = version.base_model
    if base_model is None:
        stored = version.examples.filter(split="train").values_list("token_count", flat=True)
        return {
            "lengths": list(stored),
            "skipped": None,
            "eval_skipped": None,
            "unchecked": "Skipped examples could not be checked: this version was frozen without a base "
            "model, so there is no tokenizer to check them with. The launch page checks them with the "
            "job's base model.",
        }
    method = Method.DPO if version.kind == Dataset.Kind.PREFERENCE else Method.LORA
    config = {"max_length": max_length, "assistant_only_loss": True}
    lengths, _source = train_lengths(version, base_model)  # the stored counts: the version's own tokenizer
    eval_lengths, _source = train_lengths(version, base_model, "eval")
    unchecked = {"lengths": lengths, "skipped": None, "eval_skipped": None}
    if max(lengths + eval_lengths, default=0) >= max_length:  # an example the trainer could skip
        from datasets_app.tokens import load_tokenizer

        try:
            load_tokenizer(str(base_model.local_dir))
        except Exception as exc:  # missing or unreadable tokenizer files
            log.warning(
                "base model %s: tokenizer unreadable for a version estimate (%s)",
                base_model.pk,
                type(exc).__name__,
            )
            return {
                **unchecked,
                "unchecked": f"Skipped examples could not be checked: base model {base_model.name}'s "
                "tokenizer files could not be read, so the examples whose prompt alone fills the max length "
                "are counted in; an admin can restore the model's files.",
            }
    try:
        skipped = skipped_train(version, base_model, method, config, lengths)
        eval_skipped = (
            skipped_train(version, base_model, method, config, eval_lengths, split="eval")
            if eval_lengths
            else None
        )
    except JobRefused as exc:  # the trainer would refuse an example (the chat template refuses it, …)
        return {**unchecked, "unchecked": f"Skipped examples could not be checked: {' '.join(exc.problems)}"}
    return {
        "lengths": _kept(lengths, skipped),
        "skipped": {k: v for k, v in skipped.items() if k != "indices"},
        "eval_skipped": {k: v for k, v in eval_skipped.items() if k != "indices"} if eval_skipped else None,
        "unchecked": None,
    }


def _eval_skipped(version: DatasetVersion, base_model: BaseModel, method: str, config: dict) -> dict | None:
    """`skipped_train` for the version's eval split, or None: no eval split, or its stored token counts
    are another tokenizer's and evaluation every N steps is off. Counting them would then cost a
    tokenising pass for a figure that cannot fail the job (with it on, the trainer fails at its start
    when every eval example is skipped, so they are counted: see `estimate`)."""
    lengths, _source = train_lengths(version, base_model, "eval", count=bool(config.get("eval_every")))
    if not lengths:
        return None
    return skipped_train(version, base_model, method, config, lengths, split="eval")


def _sample_skipped(
    version: DatasetVersion, ids: list[int], base_model: BaseModel, dpo: bool, config: dict
) -> list[int]:
    """The ids among `ids` the trainer would skip (`_measure_skipped`), kept a while in the cache as
    `_sample_counts` keeps its counts (a version never changes)."""
    import hashlib

    from django.core.cache import cache

    digest = hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:32]
    mode = "dpo" if dpo else "sft"
    key = f"training:skipped:{version.pk}:{base_model.pk}:{mode}:{config['max_length']}:{digest}"
    found = cache.get(key)
    if not isinstance(found, list):
        found = _measure_skipped(version, ids, base_model, dpo, config)
        cache.set(key, found, TOKEN_COUNTS_CACHE_SECONDS)
    return found


def _measure_skipped(
    version: DatasetVersion, ids: list[int], base_model: BaseModel, dpo: bool, config: dict
) -> list[int]:
    """Tokenise each of `ids` as the trainer will (the rows the worker writes for it, read back with the
    trainer's own `check_sft_rows` / `preference_rows`) and return those it would skip."""
    from ..trainer.data import check_sft_rows, preference_rows, tokenize_conversations
    from ..trainer.errors import DataError

    tokenizer = _job_tokenizer(base_model)
    max_length = config["max_length"]
    found = {
        pk: (messages, chosen, rejected, position)
        for pk, messages, chosen, rejected, position in version.examples.filter(pk__in=ids).values_list(
            "pk", "messages", "chosen", "rejected", "position"
        )
    }
    where = f"{version.dataset.name} v{version.number}"  # the trainer's "Line N of …" names the example
    out = []
    for pk in ids:
        messages, chosen, rejected, position = found[pk]
        try:
            if dpo:
                row = {"messages": messages, "chosen": chosen, "rejected": rejected, "_line": position + 1}
                skip = _dpo_prompt_fills(tokenizer, preference_rows([row], where)[0], max_length)
            else:
                conversation = check_sft_rows([{"messages": messages, "_line": position + 1}], where)[0]
                _kept, dropped = tokenize_conversations(
                    tokenizer, [conversation], max_length, config.get("assistant_only_loss", True)
                )
                skip = dropped == 1
        except DataError as exc:  # a row the trainer would refuse (the importer does not let one in)
            raise JobRefused(
                f"{exc} The job could not train on it: edit the dataset and freeze a new version."
            ) from None
        except Exception as exc:  # the chat template refuses it?
            conversations = (
                [messages]
                if chosen is None
                else [
                    messages + [{"role": "assistant", "content": chosen}],
                    messages + [{"role": "assistant", "content": rejected or ""}],
                ]
            )
            refusal = _template_refusal(
                tokenizer, base_model, exc, conversations, [len(conversations)], [position]
            )
            if refusal is None:
                raise
            raise refusal from None
        if skip:
            out.append(pk)
    return out


def _dpo_prompt_fills(tokenizer, row: dict, max_length: int) -> bool:
    """Whether TRL's DPOTrainer (truncation "keep_start", the default the trainer keeps) drops this pair
    (`row` as `trainer.data.preference_rows` makes it): its dataset preparation tokenises the prompt with
    the generation prompt and the prompt followed by each answer, takes the prompt as their common prefix
    and keeps the pair only if that prefix is shorter than max_length. The same steps here, without
    importing TRL (several seconds) in a web request; the trainer gives a tokenizer without a chat
    template the studio's FALLBACK_TEMPLATE, and so does this."""
    from datasets_app.tokens import _input_ids

    from ..trainer.data import FALLBACK_TEMPLATE

    template = {} if getattr(tokenizer, "chat_template", None) else {"chat_template": FALLBACK_TEMPLATE}

    def ids(messages, **kwargs) -> list[int]:
        encoded = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, **template, **kwargs
        )
        return _input_ids(encoded)

    def common(a: list[int], b: list[int]) -> int:
        n = 0
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            n += 1
        return n

    prompt = ids(row["prompt"], add_generation_prompt=True)
    prompt_len = min(common(prompt, ids(row["prompt"] + row[side])) for side in ("chosen", "rejected"))
    return prompt_len >= max_length


def _all_skipped_message(total: int, max_length: int, split: str = "train", eval_every: int = 0) -> str:
    if split == "eval":
        every = "step" if eval_every == 1 else f"{eval_every:,} steps"
        if total == 1:
            return (
                f"The eval example would be skipped: its prompt alone fills the max length of {max_length:,} "
                f"tokens, so the job would have nothing to evaluate every {every}. Raise the max length, "
                "shorten it or set evaluate every N steps to 0."
            )
        return (
            f"All {total:,} eval examples would be skipped: their prompt alone fills the max length of "
            f"{max_length:,} tokens, so the job would have nothing to evaluate every {every}. Raise the max "
            "length, shorten them or set evaluate every N steps to 0."
        )
    if total == 1:
        return (
            f"The train example would be skipped: its prompt alone fills the max length of {max_length:,} "
            "tokens, so the job would have nothing to learn. Raise the max length or shorten it."
        )
    return (
        f"All {total:,} train examples would be skipped: their prompt alone fills the max length of "
        f"{max_length:,} tokens, so the job would have nothing to learn. Raise the max length or shorten them."
    )


def device_fit(base_model: BaseModel, devices: list[dict], method: str = "lora") -> list[dict]:
    """For the catalog: does the model train with the LoRA standard preset on each reported device?"""

    preset = PRESETS["lora_standard"]["config"]
    config = {
        **preset,
        "max_length": min(preset["max_length"], base_model.context_length or preset["max_length"]),
    }
    from ..trainer.estimate import UnknownModelShape

    rows = []
    for device in devices:
        label = device.get("label") or device.get("name")
        try:
            memory = _memory(base_model, method, config, device)
        except UnknownModelShape as exc:
            rows.append({"device": label, "fits": None, "suggestion": f"Unknown: {exc}."})
            continue
        rows.append({"device": label, "fits": memory.fits, "suggestion": memory.suggestion})
    return rows


def _memory(base_model: BaseModel, method: str, config: dict, device: dict):
    """Raises UnknownModelShape when the model's files do not give its sizes (device_fit shows
    "unknown"; a job cannot be launched: check_config refuses a model whose config is unreadable)."""
    from ..trainer.estimate import estimate_memory

    return estimate_memory(
        model_config=_model_config(base_model),
        n_params=base_model.parameters,
        method=method,
        batch_size=config["batch_size"],
        max_length=config["max_length"],
        lora_r=config["lora_r"],
        target_modules=config["target_modules"],
        gradient_checkpointing=config["gradient_checkpointing"],
        device=device,
    )


def _linear_module_names(base_model: BaseModel) -> set[str]:
    """The names LoRA can target in the model (the last part of every 2-D weight's name), read from
    the safetensors headers (8-byte length, then JSON); empty when they cannot be read."""
    import struct

    names: set[str] = set()
    try:
        for path in sorted(base_model.local_dir.glob("*.safetensors")):
            with open(path, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(min(size, 100 * 1024 * 1024)))
            for key, meta in header.items():
                parts = key.split(".")
                if key.endswith(".weight") and len(parts) >= 2 and len(meta.get("shape", [])) == 2:
                    names.add(parts[-2])
    except (OSError, ValueError, struct.error, AttributeError):
        return set()
    return names - {"embed_tokens", "lm_head", "wte", "wpe"}


def _model_config(base_model: BaseModel) -> dict:
    try:
        return json.loads((base_model.local_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}


# --- launching and the queue ----------------------------------------------------------------------------


PRIORITY_MIN, PRIORITY_MAX = -1000, 1000
MODEL_NAME_MAX = TrainingJob._meta.get_field("model_name").max_length


@dataclass
class JobRequest:
    dataset_version: DatasetVersion | None
    base_model: BaseModel | None
    method: str
    config: dict
    model_name: str = ""
    preset: str = ""
    replay_version: DatasetVersion | None = None
    replay_percent: float = 0.0
    merge: bool = False
    priority: int = 0


def preview(request: JobRequest) -> tuple[dict, str, list[str], dict | None]:
    """What launching `request` would do: (typed config, model line, problems, estimate or None)."""
    from django.utils.text import slugify

    config, problems = normalise_config(request.config)
    run = {  # what both the checks and the estimate look at
        "dataset_version": request.dataset_version,
        "base_model": request.base_model,
        "method": request.method,
        "config": config,
        "replay_version": request.replay_version,
        "replay_percent": request.replay_percent,
    }
    problems += check_config(**run, merge=request.merge)
    if request.preset and request.preset not in PRESETS:
        problems.append(f"Preset “{request.preset}” is unknown; choose one of {', '.join(PRESETS)}.")
    if not PRIORITY_MIN <= request.priority <= PRIORITY_MAX:
        problems.append(
            f"Priority must be between {PRIORITY_MIN} and {PRIORITY_MAX} (got {request.priority})."
        )
    model_name = (request.model_name or "").strip() or _default_model_name(request.dataset_version)
    if len(model_name) > MODEL_NAME_MAX:
        problems.append(
            f"Model line: at most {MODEL_NAME_MAX} characters (got {len(model_name)}); choose a shorter "
            "name, e.g. support-assistant."
        )
    elif slugify(model_name) != model_name:
        problems.append(
            f"Model line “{model_name}” may only hold lowercase letters, digits and hyphens "
            f"(e.g. “{slugify(model_name) or 'support-assistant'}”)."
        )
    if problems:
        return config, model_name, problems, None
    try:
        figures = estimate(**run)
    except JobRefused as exc:
        return config, model_name, exc.problems, None
    return config, model_name, [], figures


def create_job(request: JobRequest, user, *, enqueue: bool = True) -> TrainingJob:
    """Validate and queue a job (one `run_next` message once the row is committed, unless the caller
    runs it itself, as `manage.py train --wait` does)."""
    config, model_name, problems, figures = preview(request)
    if problems:
        raise JobRefused(problems)
    with transaction.atomic():
        # under the base model's row lock, as a retire takes it: a retire that committed since the checks
        # above refuses the launch, one that comes after cancels the job along with the others queued
        # (FOR NO KEY UPDATE, as the retire and `claim` take it: see base_models.set_status)
        base = BaseModel.objects.select_for_update(no_key=True).get(pk=request.base_model.pk)
        if base.status != BaseModel.Status.ACTIVE:
            raise JobRefused(
                f"Base model {base.name} is {base.get_status_display().lower()}; choose an available one."
            )
        job = TrainingJob.objects.create(
            dataset_version=request.dataset_version,
            base_model=request.base_model,
            method=request.method,
            preset=request.preset,
            model_name=model_name,
            config=config,
            estimate=figures,
            replay_version=request.replay_version,
            replay_percent=request.replay_percent if request.replay_version else 0.0,
            merge_requested=request.merge,
            priority=request.priority,
            created_by=user,
            queued_at=timezone.now(),
            total_steps=figures["steps"],
        )
        audit.record(
            user,
            "training.job.create",
            job,
            method=job.method,
            dataset_version=job.dataset_version_id,
            base_model=job.base_model.name,
            steps=figures["steps"],
        )
        if enqueue:
            transaction.on_commit(lambda: _enqueue_new(job))
    log.info("training job %s queued by user %s", job.pk, user.pk)
    return job


QUEUE_DOWN_MESSAGE = (
    "The studio's task queue was unreachable when this job was launched, so it never started."
)
QUEUE_DOWN_SUGGESTION = "Launch the job again in a minute; if the queue stays down, tell a studio engineer."
RESUME_QUEUE_DOWN_MESSAGE = (
    "The studio's task queue was unreachable when this job was resumed, so it did not restart."
)
RESUME_QUEUE_DOWN_SUGGESTION = (
    "Resume it again in a minute (its checkpoints are kept); if the queue stays down, tell a studio engineer."
)


def _enqueue_new(job: TrainingJob, *, resumed: bool = False) -> None:
    """Send the new (or resumed) job's `run_next`; with the broker down the job fails with a reason at
    once (studio.queueing). Left queued, it would take the next launch's message and strand that job."""

    def failed() -> None:
        log.error("training job %s failed: the broker is unreachable", job.pk)
        audit.record(None, "training.job.fail", job, reason="queue_unreachable")

    send_or_fail(
        _enqueue,
        TrainingJob.objects.filter(pk=job.pk, state=State.QUEUED),
        {
            "state": State.FAILED,
            "finished_at": timezone.now(),
            "error_code": "queue_unreachable",
            "error_message": RESUME_QUEUE_DOWN_MESSAGE if resumed else QUEUE_DOWN_MESSAGE,
            "error_suggestion": RESUME_QUEUE_DOWN_SUGGESTION if resumed else QUEUE_DOWN_SUGGESTION,
        },
        failed,
    )


def _default_model_name(dataset_version: DatasetVersion | None) -> str:
    from django.utils.text import slugify

    if dataset_version is None:
        return ""
    return slugify(dataset_version.dataset.name)[:90] or "model"


def _enqueue() -> None:
    from ..tasks import run_next

    run_next.delay()


def queue_order():
    return TrainingJob.objects.filter(state=State.QUEUED).order_by("-priority", "queued_at", "id")


def queue_positions() -> dict[int, int]:
    return {pk: i + 1 for i, pk in enumerate(queue_order().values_list("pk", flat=True))}


def can_manage(job: TrainingJob, user) -> bool:
    from studio.roles import ADMIN, has_role

    return job.created_by_id == user.pk or has_role(user, ADMIN)


def set_priority(job: TrainingJob, delta: int, user) -> TrainingJob:
    if not can_manage(job, user):
        raise JobRefused("Only the job's owner or an admin can change its priority.")
    with transaction.atomic():
        rows = TrainingJob.objects.filter(pk=job.pk, state=State.QUEUED)
        current = rows.select_for_update().values_list("priority", flat=True).first()
        if current is None:
            raise JobRefused("Only queued jobs can be moved; this one has already started or finished.")
        # the same bounds as at launch: clicking cannot push a job past them (or overflow the column)
        if (delta > 0 and current + delta > PRIORITY_MAX) or (delta < 0 and current + delta < PRIORITY_MIN):
            raise JobRefused(
                f"Priority stays between {PRIORITY_MIN} and {PRIORITY_MAX}; this job is already at the limit."
            )
        rows.update(priority=F("priority") + delta)
        job.refresh_from_db()
        audit.record(user, "training.job.priority", job, priority=job.priority)
    return job


def cancel(job: TrainingJob, user) -> TrainingJob:
    """Queued: cancelled at once. Running: the trainer stops within one step and keeps its checkpoint."""
    if not can_manage(job, user):
        raise JobRefused("Only the job's owner or an admin can cancel it.")
    now = timezone.now()
    rows = TrainingJob.objects.filter(pk=job.pk)
    with transaction.atomic():
        if rows.filter(state=State.RUNNING, cancel_requested=True).exists():
            job.refresh_from_db()
            return job  # asked already: nothing changes, nothing more to record
        outcome = cancel_or_flag(rows, State.QUEUED, State.RUNNING, State.CANCELLED, now)
        if outcome is None:
            raise JobRefused("This job has already finished.")
        job.refresh_from_db()
        audit.record(user, "training.job.cancel", job, outcome=outcome)
    return job


RESUMABLE_STATES = (State.FAILED, State.CANCELLED)
RESUME_VERB = "training.job.resume"


def resumable_checkpoint(job: TrainingJob) -> tuple[int, str] | None:
    """(step, path) of the newest complete checkpoint the trainer would resume this job from, or None.
    A cheap look (its trainer_state.json reads and its weights file is there): the trainer verifies the
    tensors themselves when it loads them, and fails the job naming the checkpoint if they are damaged."""
    from ..trainer.run import _WEIGHT_FILES, latest_checkpoint

    path = latest_checkpoint(job.output_dir)
    if path is None:
        return None
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as fh:
            step = int(json.load(fh)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not any(os.path.isfile(os.path.join(path, name)) for name in _WEIGHT_FILES):
        return None
    return step, path


def resume_check(job: TrainingJob) -> tuple[str | None, tuple[int, str] | None]:
    """(why this job cannot be resumed now, in plain words, or None; the (step, path) it would resume
    from). The checkpoint is only looked for when the job is in a resumable state."""
    if job.state == State.SUCCEEDED:
        return "This job has already succeeded; there is nothing to resume.", None
    if job.state not in RESUMABLE_STATES:
        return "This job is still queued or running; only a failed or cancelled job can be resumed.", None
    found = resumable_checkpoint(job)
    if found is None:
        return (
            "This job has no intact checkpoint to resume from (it stopped before writing its first one); "
            "launch it again as a new job."
        ), None
    name = os.path.basename(found[1])
    if job.error_code == "corrupt_checkpoint" and f"Checkpoint {name} is damaged" in job.error_message:
        return (
            f"The newest checkpoint, {name}, is the damaged one: delete the folder {found[1]} so the job "
            "resumes from the one before it, or launch the job again."
        ), found
    return None, found


def resume(job: TrainingJob, user) -> TrainingJob:
    """Put a failed or cancelled job with an intact checkpoint back in the queue, the same way the watchdog
    requeues a job whose worker died: the next attempt resumes from the newest checkpoint. The attempt
    number keeps counting; the watchdog's STUDIO_JOB_MAX_ATTEMPTS budget starts afresh from here."""
    if not can_manage(job, user):
        raise JobRefused("Only the job's owner or an admin can resume it.")
    job.refresh_from_db()
    problem, found = resume_check(job)
    if problem:
        raise JobRefused(problem)
    base = BaseModel.objects.get(pk=job.base_model_id)
    if base.status != BaseModel.Status.ACTIVE:
        raise JobRefused(
            f"Base model {base.name} is {base.get_status_display().lower()}, so this job cannot train on it "
            "again: an admin can reactivate the model, or launch a new job on an available one."
        )
    step, path = found
    previous = {"state": job.state, "reason": job.error_code}
    with transaction.atomic():
        updated = _put_back(
            TrainingJob.objects.filter(pk=job.pk, state__in=RESUMABLE_STATES),
            timezone.now(),
            finished_at=None,
            cancel_requested=False,
            checkpoint_step=step,
            last_checkpoint=path[:500],
            error_code="",
            error_message="",
            error_suggestion="",
            error_traceback="",
        )
        if not updated:
            raise JobRefused("This job changed state meanwhile; reload the page.")
        job.refresh_from_db()
        audit.record(user, RESUME_VERB, job, attempt=job.attempt, step=step, **previous)
        transaction.on_commit(lambda: _enqueue_new(job, resumed=True))
    log.info("training job %s resumed from step %s by user %s", job.pk, step, user.pk)
    return job


def _put_back(rows, now, **extra) -> int:
    """Back to the queue (the watchdog's requeue and a manual resume): the worker that claims it runs the
    trainer, which resumes from the newest intact checkpoint in the job's output dir."""
    return rows.update(state=State.QUEUED, claim_token="", worker="", queued_at=now, **extra)


def counted_attempts(job: TrainingJob) -> int:
    """Attempts counted against STUDIO_JOB_MAX_ATTEMPTS: those since the job was last resumed by hand."""
    from studio.models import AuditEvent

    resumed = (
        AuditEvent.objects.filter(verb=RESUME_VERB, object_type="trainingjob", object_id=str(job.pk))
        .order_by("-id")
        .values_list("data", flat=True)
        .first()
    )
    return job.attempt - int((resumed or {}).get("attempt") or 0)


def claim_next(worker: str) -> TrainingJob | None:
    """Claim the highest-priority queued job for this worker (conditional UPDATE: exactly one wins)."""
    for _ in range(20):
        candidate = queue_order().values_list("pk", flat=True).first()
        if candidate is None:
            return None
        job = claim(candidate, worker)
        if job is not None:
            return job
    return None


def claim(job_id: int, worker: str) -> TrainingJob | None:
    """Claim one queued job; None when another worker got it first (or it is no longer queued), or when
    its base model is no longer available: the job is then cancelled with the reason, never started
    (a job queued before its base model was retired whose message raced the retire, or one the watchdog
    put back in the queue after the retire)."""
    token = uuid.uuid4().hex
    now = timezone.now()
    with transaction.atomic():  # the state change and its audit event commit together
        base_id = (
            TrainingJob.objects.filter(pk=job_id, state=State.QUEUED, cancel_requested=False)
            .values_list("base_model_id", flat=True)
            .first()
        )
        if base_id is None:
            return None
        # the row lock a retire holds: a retire in flight commits first (and has cancelled this job),
        # a claim that wins leaves the retire to find the job running (NO KEY: see base_models.set_status)
        base = BaseModel.objects.select_for_update(no_key=True).get(pk=base_id)
        if base.status != BaseModel.Status.ACTIVE:
            _cancel_on_unavailable_base(job_id, base, now)
            return None
        won = TrainingJob.objects.filter(pk=job_id, state=State.QUEUED, cancel_requested=False).update(
            state=State.RUNNING,
            attempt=F("attempt") + 1,
            claim_token=token,
            worker=worker,
            heartbeat_at=now,
            attempt_started_at=now,
            started_at=Coalesce(F("started_at"), Now()),
        )
        if not won:
            return None
        job = TrainingJob.objects.get(pk=job_id)
        audit.record(None, "training.job.start", job, attempt=job.attempt, worker=worker)
    return job


BASE_RETIRED = "base_model_retired"
BASE_UNAVAILABLE = "base_model_unavailable"


def base_unavailable_reason(base: BaseModel, job: TrainingJob, retired_by: str = "") -> tuple[str, str]:
    """(message, what to do) shown on the page of a queued job cancelled because its base model is retired
    (or otherwise not available) before the job could start."""
    restart = job.attempt > 0  # it ran before: resumed by hand or put back by the watchdog
    when = "before this job could restart" if restart else "before this job started"
    if base.status == BaseModel.Status.RETIRED:
        by = f" by {retired_by}" if retired_by else ""
        message = f"Cancelled: the base model {base.name} was retired{by} {when}."
    else:
        message = (
            f"Cancelled: the base model {base.name} is {base.get_status_display().lower()}, so this job "
            "could not start."
        )
    suggestion = "Choose another base model and launch the job again."
    if restart:
        suggestion = (
            "Launch the job again on another base model, or ask an admin to reactivate "
            f"{base.name} and resume this job from its checkpoint."
        )
    return message, suggestion


def cancel_queued_on_base(base: BaseModel, user) -> tuple[list[int], int]:
    """Called by the retire of `base`, inside its transaction with the base model's row locked: every job
    on it still queued is cancelled with the reason shown on its page and an audit event each. Running
    jobs are left to finish. Returns (the cancelled jobs' ids, how many are running on it)."""
    now = timezone.now()
    retired_by = user.get_username() if getattr(user, "is_authenticated", False) else ""
    cancelled = []
    queued = (
        TrainingJob.objects.select_for_update().filter(base_model=base, state=State.QUEUED).order_by("pk")
    )
    for job in queued:
        message, suggestion = base_unavailable_reason(base, job, retired_by)
        if _cancel_queued(job.pk, now, BASE_RETIRED, message, suggestion):
            job.refresh_from_db()
            audit.record(user, "training.job.cancel", job, outcome="cancelled", reason=BASE_RETIRED)
            cancelled.append(job.pk)
    running = TrainingJob.objects.filter(base_model=base, state=State.RUNNING).count()
    if cancelled:
        log.info("base model %s retired: cancelled queued jobs %s", base.pk, cancelled)
    return cancelled, running


def _cancel_queued(job_id: int, now, code: str, message: str, suggestion: str) -> int:
    return TrainingJob.objects.filter(pk=job_id, state=State.QUEUED).update(
        state=State.CANCELLED,
        finished_at=now,
        error_code=code,
        error_message=message,
        error_suggestion=suggestion,
        error_traceback="",
    )


def _cancel_on_unavailable_base(job_id: int, base: BaseModel, now) -> None:
    """The worker's refusal to start a job whose base model is not available (see `claim`)."""
    from studio.models import AuditEvent

    job = TrainingJob.objects.get(pk=job_id)
    retired_by = ""
    if base.status == BaseModel.Status.RETIRED:
        retired_by = (
            AuditEvent.objects.filter(
                verb=f"base_model.{BaseModel.Status.RETIRED}", object_type="basemodel", object_id=str(base.pk)
            )
            .order_by("-id")
            .values_list("actor_name", flat=True)
            .first()
            or ""
        )
    code = BASE_RETIRED if base.status == BaseModel.Status.RETIRED else BASE_UNAVAILABLE
    message, suggestion = base_unavailable_reason(base, job, retired_by)
    if _cancel_queued(job_id, now, code, message, suggestion):
        audit.record(None, "training.job.cancelled", job, reason=code)
        log.warning("training job %s not started: base model %s is %s", job_id, base.pk, base.status)


def requeue_stale() -> dict[str, list[int]]:
    """Running jobs whose heartbeat stopped: requeue (resume from the checkpoint) or fail after max attempts."""
    cutoff = timezone.now() - timezone.timedelta(seconds=settings.STUDIO_JOB_STALE_SECONDS)
    requeued, failed, cancelled = [], [], []
    stale = TrainingJob.objects.filter(state=State.RUNNING).filter(
        Q(heartbeat_at__lt=cutoff) | Q(heartbeat_at__isnull=True)
    )
    for job in stale:
        base = TrainingJob.objects.filter(pk=job.pk, state=State.RUNNING, claim_token=job.claim_token)
        now = timezone.now()
        with transaction.atomic():  # each change with its audit event
            if job.cancel_requested:
                if base.update(state=State.CANCELLED, finished_at=now):
                    cancelled.append(job.pk)
                    audit.record(None, "training.job.cancelled", job, reason="worker lost after cancel")
            elif (attempts := counted_attempts(job)) >= settings.STUDIO_JOB_MAX_ATTEMPTS:
                message = (
                    f"The worker running this job stopped responding {attempts} times "
                    f"(limit {settings.STUDIO_JOB_MAX_ATTEMPTS})."
                )
                if base.update(
                    state=State.FAILED,
                    finished_at=now,
                    error_code="worker_lost",
                    error_message=message,
                    error_suggestion=(
                        "Check the gpu workers' logs (killed for memory?), then resume the job from its last "
                        "checkpoint, or launch it again with smaller settings."
                    ),
                ):
                    failed.append(job.pk)
                    audit.record(None, "training.job.fail", job, reason="worker_lost", attempts=attempts)
            elif _put_back(base.filter(cancel_requested=False), now):
                requeued.append(job.pk)
                audit.record(None, "training.job.requeue", job, attempt=job.attempt, step=job.step)
                transaction.on_commit(lambda job=job: quietly(lambda: _enqueue_new(job, resumed=True)))
            elif base.filter(cancel_requested=True).update(state=State.CANCELLED, finished_at=now):
                cancelled.append(job.pk)  # a cancel arrived while the watchdog looked
                audit.record(None, "training.job.cancelled", job, reason="worker lost after cancel")
    if requeued or failed or cancelled:
        log.warning("job watchdog: requeued %s failed %s cancelled %s", requeued, failed, cancelled)
    return {"requeued": requeued, "failed": failed, "cancelled": cancelled}


def report_devices(hostname: str, devices: list[dict]) -> None:
    ComputeNode.objects.update_or_create(
        hostname=hostname, defaults={"devices": devices, "last_seen": timezone.now()}
    )


# --- running one attempt (called by the Celery task) ----------------------------------------------------


def write_data_files(job: TrainingJob) -> tuple[Path, Path | None]:
    """The version's train (+ replay) and eval splits as JSONL for the trainer, rewritten per attempt."""
    from ..trainer.data import mix_replay

    data_dir = job.output_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    train = _rows(job.dataset_version, "train")
    if job.replay_version_id and job.replay_percent:
        train = mix_replay(
            train, _rows(job.replay_version, "train"), job.replay_percent, job.config.get("seed", 42)
        )
    train_path = data_dir / "train.jsonl"
    _write_jsonl(train_path, train)
    eval_rows = _rows(job.dataset_version, "eval")
    eval_path = None
    if eval_rows:
        eval_path = data_dir / "eval.jsonl"
        _write_jsonl(eval_path, eval_rows)
    return train_path, eval_path


def _rows(version: DatasetVersion, split: str) -> list[dict]:
    rows = []
    for ex in version.examples.filter(split=split).order_by("position").iterator(chunk_size=2000):
        if version.kind == Dataset.Kind.PREFERENCE:
            rows.append({"messages": ex.messages, "chosen": ex.chosen, "rejected": ex.rejected})
        else:
            rows.append({"messages": ex.messages})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def trainer_config(job: TrainingJob, train_path: Path, eval_path: Path | None):
    from ..trainer.config import TrainConfig

    values = dict(job.config)
    if not eval_path:
        values["eval_every"] = 0
    return TrainConfig(
        method=job.method,
        model_dir=str(job.base_model.local_dir),
        output_dir=str(job.output_dir),
        train_path=str(train_path),
        eval_path=str(eval_path) if eval_path else None,
        merge=job.merge_requested,
        **{k: v for k, v in values.items() if k in CONFIG_FIELDS},
    )


class JobReporter(Reporter, Heartbeat):
    """Trainer callbacks → the database: metrics, progress, log tail, heartbeat and cancel."""

    def __init__(self, job: TrainingJob, echo=None):
        self.job = job
        self.echo = echo
        self.token = job.claim_token
        Heartbeat.__init__(self, self._mine, f"job-{job.pk}")

    def _mine(self):
        return TrainingJob.objects.filter(pk=self.job.pk, state=State.RUNNING, claim_token=self.token)

    def on_start(self, *, total_steps, start_step, device, train_tokens, examples):
        # the curve continues from the checkpoint: drop points a dead attempt logged after it
        TrainingMetric.objects.filter(job=self.job, step__gt=start_step).delete()
        self._mine().update(
            total_steps=total_steps,
            step=start_step,
            attempt_started_step=start_step,
            attempt_started_at=timezone.now(),
            device=device[:100],
            heartbeat_at=timezone.now(),
        )
        resumed = f", resumed from step {start_step}" if start_step else ""
        self.on_log(
            f"attempt {self.job.attempt} on {device}: {examples} examples, {train_tokens} tokens, "
            f"{total_steps} steps{resumed}"
        )

    def _record(self, step: int, metrics: dict) -> None:
        rows = [
            TrainingMetric(
                job=self.job, step=step, name=name[:40], value=float(value), attempt=self.job.attempt
            )
            for name, value in _finite(metrics).items()
        ]
        TrainingMetric.objects.filter(job=self.job, step=step, name__in=[r.name for r in rows]).delete()
        TrainingMetric.objects.bulk_create(rows)

    def on_step(self, *, step, total_steps, metrics):
        with transaction.atomic():  # the claim first: a superseded attempt writes nothing
            updated = self._mine().update(
                step=step,
                total_steps=total_steps,
                tokens_per_second=float(metrics.get("tokens_per_second") or 0.0),
                heartbeat_at=timezone.now(),
            )
            if updated:
                self._record(step, metrics)
        if not updated:
            self.lost = True
        if self.echo:
            shown = " ".join(
                f"{k}={v:.4g}"
                for k, v in metrics.items()
                if k in ("loss", "learning_rate", "tokens_per_second")
            )
            self.echo(f"step {step}/{total_steps} {shown}")

    def on_eval(self, *, step, metrics):
        with transaction.atomic():
            if not self._mine().select_for_update().exists():
                self.lost = True
                return
            self._record(step, metrics)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, int | float))
        self.on_log(f"step {step}: {shown}")

    def on_checkpoint(self, *, step, path):
        self._mine().update(last_checkpoint=str(path)[:500], checkpoint_step=step)

    def on_log(self, line: str):
        stamp = timezone.now().strftime("%H:%M:%S")
        entry = f"{stamp} {line}"[:500]
        with transaction.atomic():
            row = self._mine().select_for_update().values("log_tail").first()
            if row is None:  # this attempt lost its claim: the log is the new attempt's
                self.lost = True
                return
            tail = row.get("log_tail") or []
            tail = (tail + [entry])[-settings.STUDIO_JOB_LOG_LINES :]
            TrainingJob.objects.filter(pk=self.job.pk).update(log_tail=tail)
        if self.echo:
            self.echo(line)

    def may_publish(self) -> bool:
        if not self._mine().exists():
            self.lost = True
        return not self.lost

    def should_stop(self) -> bool:
        if self.lost:
            return True
        return TrainingJob.objects.filter(pk=self.job.pk, cancel_requested=True).exists()


def run_claimed(job: TrainingJob, echo=None) -> TrainingJob:
    """Run one attempt of a claimed job to its end state. Never raises for training failures."""
    from ..trainer.errors import explain
    from ..trainer.run import run_training

    reporter = JobReporter(job, echo=echo)
    reporter.start()
    try:
        train_path, eval_path = write_data_files(job)
        config = trainer_config(job, train_path, eval_path)
        result = run_training(config, reporter)
    except BaseException as exc:
        reporter.close()
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise  # worker shutdown: the watchdog requeues the job from its last checkpoint
        error = explain(exc)
        _fail(job, reporter.token, error.code, error.message, error.suggestion, traceback.format_exc())
        return TrainingJob.objects.get(pk=job.pk)
    reporter.close()
    if result.status == "completed":
        _succeed(job, reporter.token, result)
    elif reporter.lost:
        log.warning("job %s attempt %s lost its claim; leaving it to the new attempt", job.pk, job.attempt)
    else:
        with transaction.atomic():
            updated = reporter._mine().update(
                state=State.CANCELLED,
                finished_at=timezone.now(),
                step=result.steps,
                last_checkpoint=result.last_checkpoint or "",
            )
            if updated:
                audit.record(None, "training.job.cancelled", job, step=result.steps)
    return TrainingJob.objects.get(pk=job.pk)


def _fail(job: TrainingJob, token: str, code: str, message: str, suggestion: str, tb: str) -> None:
    with transaction.atomic():
        updated = TrainingJob.objects.filter(pk=job.pk, state=State.RUNNING, claim_token=token).update(
            state=State.FAILED,
            finished_at=timezone.now(),
            error_code=code[:40],
            error_message=message,
            error_suggestion=suggestion,
            error_traceback=tb,
        )
        if updated:
            audit.record(None, "training.job.fail", job, reason=code)
    if updated:
        log.warning("training job %s failed: %s", job.pk, code)


def _succeed(job: TrainingJob, token: str, result) -> None:
    from eval_app.services import register_job_result

    final = Path(result.artifacts_dir)
    try:
        with transaction.atomic():
            updated = TrainingJob.objects.filter(pk=job.pk, state=State.RUNNING, claim_token=token).update(
                state=State.SUCCEEDED,
                finished_at=timezone.now(),
                step=result.steps,
                final_metrics=_finite(result.final_metrics),
                artifacts_dir=str(final),
            )
            if not updated:  # superseded by a newer attempt: its card and version stand
                return
            job.refresh_from_db()
            write_model_card(job, final, result.final_metrics)  # rolled back with the rest if it fails
            version = register_job_result(job)
            audit.record(None, "training.job.succeed", job, model_version=version.pk, steps=result.steps)
    except OSError as exc:
        from ..trainer.errors import explain

        error = explain(exc)
        _fail(job, token, error.code, error.message, error.suggestion, traceback.format_exc())
        return
    log.info("training job %s succeeded: model version %s", job.pk, version.pk)


def _finite(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}


def write_model_card(job: TrainingJob, final: Path, metrics: dict) -> Path:
    version = job.dataset_version
    lines = [
        f"# {job.model_name} — training job {job.pk}",
        "",
        f"Fine-tuned from **{job.base_model.name}** ({job.base_model.parameters_label} parameters, "
        f"context {job.base_model.context_length}, license {job.base_model.license or 'see base model'}).",
        "",
        "## Data",
        f"- Dataset: {version.dataset.name} version {version.number} (id {version.pk})",
        f"- SHA-256: `{version.sha256}`",
        f"- Examples: {version.counts.get('train', 0)} train, {version.counts.get('eval', 0)} eval",
    ]
    if job.replay_version_id:
        rv = job.replay_version
        lines.append(
            f"- Replay: {job.replay_percent:g}% from {rv.dataset.name} version {rv.number} "
            f"(id {rv.pk}, SHA-256 `{rv.sha256}`)"
        )
    lines += [
        "",
        "## Method",
        f"- {job.get_method_display()}" + (f" (preset {job.preset})" if job.preset else ""),
    ]
    lines += [f"- {k}: {json.dumps(v)}" for k, v in sorted(job.config.items())]
    lines += ["", "## Final metrics"]
    lines += [f"- {k}: {v:.6g}" for k, v in sorted(_finite(metrics).items())] or ["- (none)"]
    lines += ["", "## Changelog of the dataset version", version.changelog or "(none)", ""]
    lines += [
        "## Provenance",
        f"- Trained by {job.created_by.get_username()} on {job.device or 'unknown device'}, "
        f"{job.attempt} attempt(s), finished {timezone.now():%Y-%m-%d %H:%M UTC}",
        "",
    ]
    path = final / "model_card.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def artifact_files(job: TrainingJob) -> list[dict]:
    """Downloadable files under the job's final artifacts dir (relative paths, sizes)."""
    if not job.artifacts_dir:
        return []
    root = Path(job.artifacts_dir)
    if not root.is_dir():
        return []
    files = []
    for path in sorted(root.rglob("*")):
        if _in_progress(path.relative_to(root)):
            continue
        if path.is_file() and not path.is_symlink():
            files.append({"name": str(path.relative_to(root)), "size": path.stat().st_size})
    return files


def _in_progress(relative: Path) -> bool:
    """A file under a dot-folder such as the `.merged-…` one a merge writes into before it is renamed
    into place: half-written, not an artifact to list or download."""
    return any(part.startswith(".") for part in relative.parts[:-1])


def artifact_path(job: TrainingJob, name: str) -> Path | None:
    """Resolve a requested artifact strictly inside the job's artifacts dir, or None."""
    if not job.artifacts_dir or "\x00" in name:
        return None
    root = Path(job.artifacts_dir).resolve()
    try:
        target = (root / name).resolve()
        if root not in target.parents or not target.is_file() or _in_progress(target.relative_to(root)):
            return None
    except (OSError, ValueError):  # a name too long or otherwise impossible: not an artifact
        return None
    return target


MERGE_QUEUE_DOWN = "The studio's task queue was unreachable, so the merge never started; ask for it again."


def request_merge(job: TrainingJob, user) -> None:
    """Queue the merge of a succeeded job's adapter into a full model (owner or admin, once at a time)."""
    if not can_manage(job, user):
        raise JobRefused("Only the job's owner or an admin can merge its adapter.")
    with transaction.atomic():
        job = TrainingJob.objects.select_for_update().get(pk=job.pk)
        if job.state != State.SUCCEEDED:
            raise JobRefused("Only a succeeded job's adapter can be merged.")
        if job.method == Method.SFT:
            raise JobRefused("A full fine-tune already is a complete model; there is no adapter to merge.")
        if job.merge_state == TrainingJob.Merge.PENDING:
            raise JobRefused("The merge is already under way; the merged model appears under Artifacts.")
        if (Path(job.artifacts_dir) / "merged").is_dir():
            raise JobRefused("The merged model already exists.")
        job.merge_state, job.merge_error = TrainingJob.Merge.PENDING, ""
        job.save(update_fields=["merge_state", "merge_error"])
        audit.record(user, "training.job.merge", job)
        from ..tasks import merge_job

        transaction.on_commit(  # broker down: the merge fails with a reason and may be asked again
            lambda: send_or_fail(
                lambda: merge_job.delay(job.pk),
                TrainingJob.objects.filter(pk=job.pk, merge_state=TrainingJob.Merge.PENDING),
                {"merge_state": TrainingJob.Merge.FAILED, "merge_error": MERGE_QUEUE_DOWN},
            )
        )


def merge(job: TrainingJob) -> Path | None:
    """Worker side of request_merge; the outcome is recorded on the job and in the audit log."""
    from ..trainer.run import merge_adapter

    final = Path(job.artifacts_dir)
    out = final / "merged"
    if out.is_dir():  # a redelivered task whose first run finished
        TrainingJob.objects.filter(pk=job.pk).update(merge_state=TrainingJob.Merge.DONE, merge_error="")
        return out
    tmp = final / f".merged-{uuid.uuid4().hex[:8]}"
    try:
        merge_adapter(str(job.base_model.local_dir), str(final), str(tmp))
        os.replace(tmp, out)
    except Exception as exc:
        log.exception("merging job %s failed", job.pk)
        reason = (
            f"The merge failed ({type(exc).__name__}); an engineer can find the details in the worker log."
        )
        TrainingJob.objects.filter(pk=job.pk).update(merge_state=TrainingJob.Merge.FAILED, merge_error=reason)
        audit.record(None, "training.job.merge_fail", job, error=type(exc).__name__)
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    TrainingJob.objects.filter(pk=job.pk).update(merge_state=TrainingJob.Merge.DONE, merge_error="")
    audit.record(None, "training.job.merged", job)
    return out


def hostname() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
