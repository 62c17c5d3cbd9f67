"""The training library (training_app.trainer): data/labels, packing, LoRA/QLoRA/full SFT/DPO runs on a tiny
random-init Llama built in the test, checkpoints/stop/resume, validation, memory estimate, error mapping.

Everything is built locally (word-level tokenizer + tiny Llama) so the tests run on a machine without any
model files.  One slow test trains the real SmolLM2 (``STUDIO_TEST_MODEL_DIR``, or converted once from the package).
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama

from training_app.trainer.callbacks import Reporter
from training_app.trainer.config import TrainConfig
from training_app.trainer.data import (
    IGNORE_INDEX,
    Collator,
    LengthGroupedSampler,
    mix_replay,
    packed_rows,
    tokenize_chat,
)
from training_app.trainer.errors import (
    ConfigError,
    CorruptCheckpoint,
    DataError,
    DiskFull,
    OutOfMemory,
    TrainerError,
    explain,
)
from training_app.trainer.estimate import available_devices, count_lora_parameters, estimate_memory
from training_app.trainer.run import latest_checkpoint, merge_adapter, run_training

# SmolLM2's template (no {% generation %} markers; a default system prompt when none is given)
SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = [
    "system",
    "user",
    "assistant",
    "you",
    "are",
    "a",
    "helpful",
    "ai",
    "named",
    "smollm",
    "trained",
    "by",
    "hugging",
    "face",
    ",",
    ".",
    "?",
    "what",
    "is",
    "the",
    "capital",
    "of",
    "france",
    "paris",
    "germany",
    "berlin",
    "italy",
    "rome",
    "spain",
    "madrid",
    "colour",
    "sky",
    "blue",
    "grass",
    "green",
    "say",
    "hello",
    "world",
    "answer",
    "good",
    "bad",
    "yes",
    "no",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
]  # noqa: SIM905
FACTS = [
    ("what is the capital of france ?", "paris"),
    ("what is the capital of germany ?", "berlin"),
    ("what is the capital of italy ?", "rome"),
    ("what is the capital of spain ?", "madrid"),
    ("what colour is the sky ?", "blue"),
    ("what colour is the grass ?", "green"),
    ("say hello", "hello world"),
    ("one two three", "four five six"),
]


def build_tokenizer_dir(path: Path) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = SMOL_TEMPLATE
    tokenizer.save_pretrained(str(path))
    return path


def build_model_dir(path: Path, *, hidden=64, intermediate=128, layers=2, max_positions=256, seed=0) -> Path:
    from transformers import AutoTokenizer

    build_tokenizer_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    # initializer_range 0.2: frozen (tied) embeddings large enough for LoRA to move the logits
    return save_tiny_llama(
        path, tokenizer, hidden=hidden, intermediate=intermediate, layers=layers, context=max_positions,
        seed=seed, initializer_range=0.2,
    )  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sft_rows(n=8):
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in (FACTS * ((n + len(FACTS) - 1) // len(FACTS)))[:n]
    ]


class Recorder(Reporter):
    def __init__(self, stop_after: int | None = None):
        self.starts, self.steps, self.evals, self.checkpoints, self.lines = [], [], [], [], []
        self.stop_after = stop_after
        self.polls = 0

    def on_start(self, **kw):
        self.starts.append(kw)

    def on_step(self, *, step, total_steps, metrics):
        self.steps.append((step, total_steps, metrics))

    def on_eval(self, *, step, metrics):
        self.evals.append((step, metrics))

    def on_checkpoint(self, *, step, path):
        self.checkpoints.append((step, path))

    def on_log(self, line):
        self.lines.append(line)

    def should_stop(self):  # polled once per optimizer step: True on the stop_after-th poll
        self.polls += 1
        return self.stop_after is not None and self.polls >= self.stop_after


def make_config(model_dir, tmp_path, **overrides) -> TrainConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    train = overrides.pop("train_path", None) or str(write_jsonl(tmp_path / "train.jsonl", sft_rows()))
    values = {
        "method": "lora",
        "model_dir": str(model_dir),
        "output_dir": str(tmp_path / "job"),
        "train_path": train,
        "max_steps": 4,
        "batch_size": 4,
        "max_length": 64,
        "learning_rate": 5e-3,
        "lora_dropout": 0.0,
        "checkpoint_every": 50,
        "warmup_ratio": 0.0,
        "lr_scheduler": "constant",
    }
    values.update(overrides)
    return TrainConfig(**values)


# ----------------------------------------------------------------------------------------------- data
def test_labels_cover_only_assistant_content_and_end_of_turn(tokenizer):
    messages = [
        {"role": "system", "content": "you are a helpful ai"},
        {"role": "user", "content": "what is the capital of france ?"},
        {"role": "assistant", "content": "paris"},
        {"role": "user", "content": "what colour is the sky ?"},
        {"role": "assistant", "content": "blue sky"},
    ]
    out = tokenize_chat(tokenizer, messages, max_length=512)
    tokens = tokenizer.convert_ids_to_tokens(out["input_ids"])
    trained = [tok for tok, label in zip(tokens, out["labels"], strict=True) if label != IGNORE_INDEX]
    assert trained == ["paris", "<|im_end|>", "blue", "sky", "<|im_end|>"]
    # where trained the label is the token itself; system/user turns and assistant headers are -100
    assert all(lab in (IGNORE_INDEX, tid) for lab, tid in zip(out["labels"], out["input_ids"], strict=True))
    header_positions = [i for i, tok in enumerate(tokens) if tok == "assistant"]
    assert len(header_positions) == 2 and all(out["labels"][i] == IGNORE_INDEX for i in header_positions)
    assert out["labels"][: tokens.index("paris")] == [IGNORE_INDEX] * tokens.index("paris")
    # without a system message SmolLM2's template adds its own: still not trained
    default = tokenize_chat(tokenizer, messages[1:3], max_length=512)
    default_tokens = tokenizer.convert_ids_to_tokens(default["input_ids"])
    assert default_tokens[:3] == ["<|im_start|>", "system", "you"]
    assert [t for t, lab in zip(default_tokens, default["labels"], strict=True) if lab != IGNORE_INDEX] == [
        "paris",
        "<|im_end|>",
    ]
    # assistant_only_loss=False trains every token; max_length cuts the end
    everything = tokenize_chat(tokenizer, messages, max_length=512, assistant_only_loss=False)
    assert everything["labels"] == everything["input_ids"] == out["input_ids"]
    assert len(tokenize_chat(tokenizer, messages, max_length=7)["input_ids"]) == 7


def test_mix_replay_counts_and_determinism():
    train = [{"id": f"t{i}"} for i in range(40)]
    replay = [{"id": f"r{i}"} for i in range(100)]
    mixed = mix_replay(train, replay, 25, seed=7)
    assert len(mixed) == 50
    assert sum(r["id"].startswith("r") for r in mixed) == 10
    assert sorted(r["id"] for r in mixed if r["id"].startswith("t")) == sorted(r["id"] for r in train)
    assert len({r["id"] for r in mixed if r["id"].startswith("r")}) == 10  # without replacement
    assert mix_replay(train, replay, 25, seed=7) == mixed
    assert mix_replay(train, replay, 25, seed=8) != mixed
    assert mixed[:40] != train  # shuffled in, not appended
    # not enough replay rows: all of them once, the rest drawn with replacement
    few = mix_replay(train, replay[:3], 20, seed=1)
    replayed = [r["id"] for r in few if r["id"].startswith("r")]
    assert len(replayed) == 8 and {"r0", "r1", "r2"} == set(replayed)
    assert mix_replay(train, replay, 0, seed=1) == train
    assert len(mix_replay(train, replay, 2.5, seed=1)) == 41  # round(40 * 2.5 / 100) = 1


def test_length_grouped_sampler_keeps_padding_low_and_is_seeded():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 900) for _ in range(256)]
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(256))
    assert order == list(LengthGroupedSampler(lengths, batch_size=4, seed=3))
    sampler.set_epoch(1)
    assert list(sampler) != order
    batches = [order[i : i + 4] for i in range(0, 256, 4)]
    padded = sum(4 * max(lengths[i] for i in b) for b in batches)
    random_batches = [list(range(i, i + 4)) for i in range(0, 256, 4)]
    padded_random = sum(4 * max(lengths[i] for i in b) for b in random_batches)
    assert sum(lengths) / padded > 0.95 > sum(lengths) / padded_random
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # longest batch first: OOM shows at step 1


def test_data_errors_name_the_line(tmp_path, model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(sft_rows(1)[0]) + "\n{not json\n")
    from training_app.trainer.data import load_jsonl

    with pytest.raises(DataError, match="Line 2"):
        load_jsonl(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        run_training(make_config(model_dir, tmp_path, train_path=str(empty)))
    prefs = write_jsonl(
        tmp_path / "prefs.jsonl", [{"prompt": "say hello", "chosen": "hello", "rejected": "no"}]
    )
    with pytest.raises(DataError, match="Line 1 .*preference"):
        run_training(make_config(model_dir, tmp_path, train_path=str(prefs)))
    chat = write_jsonl(tmp_path / "chat.jsonl", sft_rows(2))
    with pytest.raises(DataError, match="DPO needs preference rows with chosen/rejected"):
        run_training(make_config(model_dir, tmp_path, method="dpo", train_path=str(chat)))


# -------------------------------------------------------------------------------------------- packing
def test_packing_keeps_examples_apart(model_dir, tokenizer):
    """The padding-free packed row (position_ids restart per example, no attention_mask) gives every example
    exactly the logits it has alone: transformers builds a block-diagonal causal mask from position_ids."""
    from training_app.trainer.config import TrainConfig
    from training_app.trainer.run import _load_model

    config = TrainConfig(method="lora", model_dir=str(model_dir), output_dir="unused", train_path="unused")
    model = _load_model(config, "cpu", torch.float32, torch.float32).eval()
    examples = [tokenize_chat(tokenizer, r["messages"], 64) for r in sft_rows(5)]
    rows = packed_rows(examples, max_length=64, seed=0)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in examples)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    batch = Collator(tokenizer.pad_token_id)(rows)
    assert "attention_mask" not in batch and int(batch["real_tokens"]) == sum(
        len(e["input_ids"]) for e in examples
    )
    batch.pop("real_tokens")
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        checked = 0
        for r, row in enumerate(rows):
            start = 0
            positions = row["position_ids"] + [0]
            for end in range(1, len(positions)):
                if positions[end] == 0:
                    ids = torch.tensor([row["input_ids"][start:end]])
                    alone = model(input_ids=ids).logits[0]
                    torch.testing.assert_close(packed_logits[r, start:end], alone, atol=1e-5, rtol=1e-4)
                    checked += 1
                    start = end
        assert checked == len(examples)
        # control: the same row with continuous positions (no per-example reset) lets examples see each other
        row = next(r for r in rows if r["position_ids"].count(0) > 1)
        second = row["position_ids"].index(0, 1)
        ids = torch.tensor([row["input_ids"]])
        leaky = model(input_ids=ids).logits[0, second:]
        alone = model(input_ids=torch.tensor([row["input_ids"][second:]])).logits[0]
        assert not torch.allclose(leaky[: alone.shape[0]], alone, atol=1e-3)
    # the first token of every packed example is never a target (no prediction across the boundary)
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert all(row["labels"][i] == IGNORE_INDEX for i in starts)


# ----------------------------------------------------------------------------------------------- runs
def test_lora_loss_falls_on_a_memorisable_set_and_writes_artifacts(model_dir, tmp_path):
    eval_path = write_jsonl(tmp_path / "eval.jsonl", sft_rows(4))
    config = make_config(
        model_dir,
        tmp_path,
        max_steps=30,
        learning_rate=1e-2,
        lora_r=8,
        target_modules=["all-linear"],
        eval_path=str(eval_path),
        eval_every=15,
    )
    recorder = Recorder()
    result = run_training(config, recorder)
    assert result.status == "completed" and result.steps == result.total_steps == 30
    losses = [m["loss"] for _, _, m in recorder.steps]
    assert [s for s, _, _ in recorder.steps] == list(range(1, 31))  # on_step once per optimizer step
    assert losses[-1] < 0.5 * losses[0], losses
    metrics = recorder.steps[-1][2]
    assert {"loss", "learning_rate", "grad_norm", "epoch", "tokens_per_second", "tokens_seen"} <= set(metrics)
    assert metrics["tokens_per_second"] > 0
    assert metrics["tokens_seen"] == 30 * 4 * recorder.starts[0]["train_tokens"] / 8  # 8 rows, 4 per step
    assert recorder.starts == [
        {
            "total_steps": 30,
            "start_step": 0,
            "device": "cpu",
            "train_tokens": recorder.starts[0]["train_tokens"],
            "examples": 8,
        }
    ]
    assert [s for s, _ in recorder.evals] == [15, 30, 30]  # periodic + the final evaluation
    assert result.final_metrics["eval_loss"] < recorder.evals[0][1]["eval_loss"]
    final = Path(result.artifacts_dir)
    assert final == tmp_path / "job" / "final"
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "training_config.json",
    ):
        assert (final / name).exists(), name
    assert not (final / "model.safetensors").exists()
    saved = json.loads((final / "training_config.json").read_text())
    assert saved["method"] == "lora" and saved["resolved"]["device"] == "cpu"
    history = json.loads((final / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, 31))
    assert "eval_loss" in history[14] and history[0]["loss"] == pytest.approx(losses[0])
    # the log lines carry counts and figures only, never training text
    assert not any("paris" in line or "capital" in line for line in recorder.lines)
    # the adapter can be merged into a full model on request
    merge_adapter(model_dir, final, tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").exists()


def test_same_seed_same_losses(model_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        recorder = Recorder()
        run_training(
            make_config(model_dir, tmp_path / name, train_path=None, max_steps=4, lora_dropout=0.1), recorder
        )
        runs.append([m["loss"] for _, _, m in recorder.steps])
    assert runs[0] == runs[1]


def test_packed_lora_run_trains_all_tokens_without_padding(model_dir, tmp_path):
    recorder = Recorder()
    result = run_training(make_config(model_dir, tmp_path, packing=True, max_steps=2), recorder)
    assert result.status == "completed"
    train_tokens = recorder.starts[0]["train_tokens"]
    # 8 short examples pack into rows that all fit one batch: each step sees every token exactly once
    assert recorder.steps[0][2]["tokens_seen"] == train_tokens
    assert recorder.steps[1][2]["tokens_seen"] == 2 * train_tokens
    assert any("packed 8 examples" in line for line in recorder.lines)


def test_on_cuda_training_leaves_cudnn_attention_out(model_dir, tmp_path, monkeypatch):
    """cuDNN's fused attention builds an execution plan per new batch shape: on an H100 that was 15-19 ms of
    CPU per layer call, half the CPU time of a packed LoRA step. On CUDA the trainer runs without it (flash /
    memory-efficient / math stay); on the CPU, and with STUDIO_CUDNN_ATTENTION=1, torch's own choice stands."""
    from training_app.trainer import run as run_module

    backends = torch.backends.cuda
    monkeypatch.delenv("STUDIO_CUDNN_ATTENTION", raising=False)
    assert backends.cudnn_sdp_enabled()
    with run_module._attention_kernels("cuda"):
        assert not backends.cudnn_sdp_enabled()
        assert (
            backends.flash_sdp_enabled()
            and backends.mem_efficient_sdp_enabled()
            and backends.math_sdp_enabled()
        )
    assert backends.cudnn_sdp_enabled()
    with run_module._attention_kernels("cpu"):
        assert backends.cudnn_sdp_enabled()
    monkeypatch.setenv("STUDIO_CUDNN_ATTENTION", "1")
    with run_module._attention_kernels("cuda"):
        assert backends.cudnn_sdp_enabled()
    monkeypatch.delenv("STUDIO_CUDNN_ATTENTION")

    # the training loop itself runs inside the choice: apply the CUDA one here and look from each step
    asked, during = [], []
    real = run_module._attention_kernels

    def as_on_cuda(device):
        asked.append(device)
        return real("cuda")

    class Looking(Recorder):
        def on_step(self, *, step, total_steps, metrics):
            during.append(backends.cudnn_sdp_enabled())

    monkeypatch.setattr(run_module, "_attention_kernels", as_on_cuda)
    assert (
        run_training(make_config(model_dir, tmp_path, packing=True, max_steps=2), Looking()).status
        == "completed"
    )
    assert asked == ["cpu"] and during == [False, False]
    assert backends.cudnn_sdp_enabled()


def test_gradient_checkpointing_gives_the_same_losses(model_dir, tmp_path):
    runs = []
    for name, checkpointing in (("plain", False), ("gc", True)):
        recorder = Recorder()
        config = make_config(model_dir, tmp_path / name, max_steps=2, gradient_checkpointing=checkpointing)
        assert run_training(config, recorder).status == "completed"
        runs.append([m["loss"] for _, _, m in recorder.steps])
    assert runs[1] == pytest.approx(runs[0], rel=1e-4)


def test_qlora_trains_through_bitsandbytes_4bit_on_cpu(model_dir, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from training_app.trainer.run import _load_model

    config = make_config(model_dir, tmp_path, method="qlora", max_steps=3)
    model = _load_model(config, "cpu", torch.float32, torch.float32)
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7  # every linear layer of both decoder layers
    assert (
        four_bit[0].weight.quant_type == "nf4" and four_bit[0].weight.quant_state.nested
    )  # double quantisation
    del model
    recorder = Recorder()
    result = run_training(config, recorder)
    losses = [m["loss"] for _, _, m in recorder.steps]
    assert result.status == "completed" and len(losses) == 3
    assert all(torch.isfinite(torch.tensor(losses)))
    assert (Path(result.artifacts_dir) / "adapter_model.safetensors").exists()
    adapter_cfg = json.loads((Path(result.artifacts_dir) / "adapter_config.json").read_text())
    assert sorted(adapter_cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_dpo_trains_an_adapter_against_the_base(model_dir, tmp_path):
    rows = [{"prompt": q, "chosen": a, "rejected": "bad no"} for q, a in FACTS]
    rows[0] = {"messages": [{"role": "user", "content": FACTS[0][0]}], "chosen": "paris", "rejected": "rome"}
    train = write_jsonl(tmp_path / "dpo.jsonl", rows)
    recorder = Recorder()
    config = make_config(model_dir, tmp_path, method="dpo", train_path=str(train), max_steps=4, dpo_beta=0.5)
    result = run_training(config, recorder)
    assert result.status == "completed" and result.steps == 4
    first, last = recorder.steps[0][2], recorder.steps[-1][2]
    assert {"rewards/margins", "rewards/chosen", "rewards/rejected", "rewards/accuracies"} <= set(last)
    assert first["rewards/margins"] == pytest.approx(
        0.0, abs=1e-6
    )  # the policy starts equal to its reference
    assert last["rewards/margins"] > 0 and last["loss"] < first["loss"]
    assert last["tokens_per_second"] > 0
    # the start event counts the pairs' tokens as training feeds them (prompt twice, both answers): one
    # epoch's tokens_seen; it said 0 for every preference job before
    train_tokens = recorder.starts[0]["train_tokens"]
    epoch_steps = -(-len(rows) // config.batch_size)
    assert train_tokens > 0 and recorder.steps[epoch_steps - 1][2]["tokens_seen"] == train_tokens
    assert (Path(result.artifacts_dir) / "adapter_model.safetensors").exists()
    assert not (Path(result.artifacts_dir) / "model.safetensors").exists()


def test_full_sft_saves_full_weights(model_dir, tmp_path):
    result = run_training(make_config(model_dir, tmp_path, method="sft", max_steps=2, learning_rate=1e-3))
    final = Path(result.artifacts_dir)
    assert (final / "model.safetensors").exists() and (final / "config.json").exists()
    assert not (final / "adapter_model.safetensors").exists()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(final)).config.num_hidden_layers == 2


# ----------------------------------------------------------------------------- checkpoints, stop, resume
def test_stop_then_resume_continues_the_step_counter_and_history(model_dir, tmp_path):
    config = make_config(model_dir, tmp_path, max_steps=6, checkpoint_every=2, keep_checkpoints=2)
    first = Recorder(stop_after=4)  # should_stop says True at the end of step 4
    stopped = run_training(config, first)
    assert stopped.status == "stopped" and stopped.steps == 4 and first.polls == 4
    assert stopped.artifacts_dir is None and stopped.last_checkpoint.endswith(f"checkpoint-{stopped.steps}")
    assert [s for s, _, _ in first.steps] == list(range(1, stopped.steps + 1))
    checkpoint = Path(stopped.last_checkpoint)
    for name in (
        "adapter_model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
        "trainer_state.json",
    ):
        assert (checkpoint / name).exists(), name
    assert not list((tmp_path / "job" / "checkpoints").glob(".tmp-*"))

    second = Recorder()
    resumed = run_training(config, second)
    assert resumed.status == "completed" and resumed.resumed_from_step == stopped.steps
    assert second.starts[0]["start_step"] == stopped.steps and second.starts[0]["total_steps"] == 6
    assert [s for s, _, _ in second.steps] == list(range(stopped.steps + 1, 7))  # only new steps reported
    assert second.steps[0][2]["tokens_seen"] > first.steps[-1][2]["tokens_seen"]  # the token count continues
    history = json.loads((Path(resumed.artifacts_dir) / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    names = sorted(p.name for p in (tmp_path / "job" / "checkpoints").iterdir())
    assert names == ["checkpoint-4", "checkpoint-6"]  # keep_checkpoints newest only
    assert latest_checkpoint(tmp_path / "job").endswith("checkpoint-6")


def test_resume_matches_an_uninterrupted_run(model_dir, tmp_path):
    straight = Recorder()
    run_training(
        make_config(model_dir, tmp_path / "a", train_path=None, max_steps=4, checkpoint_every=2), straight
    )
    config = make_config(model_dir, tmp_path / "b", train_path=None, max_steps=4, checkpoint_every=2)
    run_training(config, Recorder(stop_after=2))
    resumed = Recorder()
    run_training(config, resumed)
    expected = [m["loss"] for _, _, m in straight.steps][2:]
    assert [m["loss"] for _, _, m in resumed.steps] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("victim", ["adapter_model.safetensors", "optimizer.pt"])
def test_corrupt_newest_checkpoint_is_reported_not_silently_restarted(model_dir, tmp_path, victim):
    config = make_config(model_dir, tmp_path, max_steps=3, checkpoint_every=2)
    run_training(config, Recorder(stop_after=2))
    target = tmp_path / "job" / "checkpoints" / "checkpoint-2" / victim
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpoint, match="checkpoint-2") as info:
        run_training(config, Recorder())
    assert info.value.code == "corrupt_checkpoint" and victim in info.value.message
    assert info.value.checkpoint.endswith("checkpoint-2")


def test_mismatched_checkpoint_is_corrupt(model_dir, tmp_path):
    run_training(make_config(model_dir, tmp_path, max_steps=3, checkpoint_every=2), Recorder(stop_after=2))
    with pytest.raises(CorruptCheckpoint, match="checkpoint-2"):
        run_training(make_config(model_dir, tmp_path, max_steps=3, checkpoint_every=2, lora_r=4))


def test_disk_full_while_checkpointing_keeps_earlier_checkpoints(model_dir, tmp_path, monkeypatch):
    from transformers import Trainer

    original = Trainer._save_optimizer_and_scheduler
    calls = []

    def flaky(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 2:
            original(self, output_dir)  # part of the second checkpoint is written, then the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", flaky)
    with pytest.raises(DiskFull) as info:
        run_training(make_config(model_dir, tmp_path, max_steps=6, checkpoint_every=2), Recorder())
    assert info.value.code == "disk_full"
    checkpoints = tmp_path / "job" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2"]  # no half-written checkpoint-4
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", original)
    resumed = run_training(make_config(model_dir, tmp_path, max_steps=6, checkpoint_every=2), Recorder())
    assert resumed.resumed_from_step == 2 and resumed.status == "completed"


# ------------------------------------------------------------------------------------ validation, CLI
def test_validate_explains_each_bad_setting(model_dir, tmp_path):
    good = make_config(model_dir, tmp_path)
    assert good.validate() == []
    assert TrainConfig.from_dict(good.to_dict()) == good

    def problems(**changes):
        values = good.to_dict()
        values.update(changes)
        return " | ".join(TrainConfig(**values).validate())

    assert "Unknown method 'ppo'" in problems(method="ppo")
    assert "lora_r" in problems(lora_r=0)
    assert "lora_alpha" in problems(lora_alpha=0)
    assert "Learning rate" in problems(learning_rate=0)
    assert "Learning rate" in problems(learning_rate=5)
    assert "Batch size" in problems(batch_size=0)
    assert "grad_accum" in problems(grad_accum=0)
    assert "Epochs" in problems(epochs=-1, max_steps=None)
    assert "Max steps must be at least 1" in problems(max_steps=0)
    assert "either a number of epochs or max steps" in problems(epochs=None, max_steps=None)
    message = problems(max_length=1024)
    assert "Max length (1024)" in message and "context length (256 tokens)" in message
    assert "base model folder does not exist" in problems(model_dir=str(tmp_path / "nope"))
    assert "training file does not exist" in problems(train_path=str(tmp_path / "nope.jsonl"))
    assert "needs an evaluation file" in problems(eval_every=10)
    assert "schedule" in problems(lr_scheduler="wavy")
    assert problems(method="sft") == "" and problems(method="dpo") == ""


def test_qlora_without_bitsandbytes_is_a_config_error(model_dir, tmp_path, monkeypatch):
    from training_app.trainer import config as config_module

    monkeypatch.setattr(config_module, "bitsandbytes_available", lambda: False)
    monkeypatch.setattr("training_app.trainer.run.bitsandbytes_available", lambda: False)
    config = make_config(model_dir, tmp_path, method="qlora")
    assert any("QLoRA needs the bitsandbytes package" in p for p in config.validate())
    with pytest.raises(ConfigError, match="QLoRA needs the bitsandbytes package") as info:
        run_training(config)
    assert info.value.code == "config"


def test_cli_prints_json_lines(model_dir, tmp_path, capsys):
    from training_app.trainer.__main__ import main

    config = make_config(model_dir, tmp_path, max_steps=2)
    job = tmp_path / "job.json"
    job.write_text(json.dumps(config.to_dict()))
    assert main(["--config", str(job)]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] in ("log", "start") and kinds.count("step") == 2 and kinds[-1] == "result"
    assert events[-1]["status"] == "completed" and events[-1]["steps"] == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**config.to_dict(), "batch_size": 0}))
    assert main(["--config", str(bad)]) == 2
    error = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert error["event"] == "error" and error["code"] == "config" and "Batch size" in error["message"]


# ---------------------------------------------------------------------------------- memory, errors
SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
}


def test_count_lora_parameters_by_hand():
    # q: 64->64, k/v: 64->32 (2 kv heads x 16), o: 64->64; r=8 -> 8*(128+96+96+128)=3584 per layer, 2 layers
    assert count_lora_parameters(SMALL, 8, None) == 7168
    # + gate/up 64->128 and down 128->64: 3 * 8 * 192 = 4608 per layer
    assert count_lora_parameters(SMALL, 8, ["all-linear"]) == 2 * (3584 + 4608)
    assert count_lora_parameters(SMALL, 8, ["q_proj"]) == 2 * 8 * 128


def test_estimate_memory_by_hand_and_suggestion():
    cpu = {"name": "cpu", "kind": "cpu", "total_bytes": 10 * 1024**3}
    est = estimate_memory(
        model_config=SMALL,
        n_params=50_000,
        method="lora",
        batch_size=2,
        max_length=16,
        lora_r=8,
        target_modules=None,
        gradient_checkpointing=False,
        device=cpu,
    )
    assert est.weights_bytes == 50_000 * 4
    assert est.adapter_bytes == 7168 * 4
    assert est.optimizer_bytes == 7168 * 8
    assert est.gradients_bytes == 7168 * 4
    # per layer 4 * 2*16 * (10*64 + 4*128) = 147456; 2 layers; logits 2*4*32*100 = 25600
    assert est.activations_bytes == 2 * 147456 + 25600
    assert est.total_bytes == 200_000 + 28672 + 57344 + 28672 + 320512
    assert est.fits and est.suggestion == "" and est.as_dict()["device_name"] == "cpu"

    gpu = {"name": "cuda:0", "kind": "cuda", "total_bytes": 4_000_000, "label": "tiny"}
    kwargs = {
        "model_config": SMALL,
        "n_params": 50_000,
        "method": "lora",
        "max_length": 256,
        "lora_r": 8,
        "target_modules": None,
        "gradient_checkpointing": False,
        "device": gpu,
    }
    big = estimate_memory(batch_size=8, **kwargs)
    assert big.weights_bytes == 100_000  # bf16 on a GPU
    # 214688 fixed + 5408 per token (2 layers x 2 bytes x 1152 + 8 x 100 logits): b=2 -> 2983584 <= 3.6e6
    assert not big.fits and big.suggestion.startswith("Use batch size 2 (with gradient accumulation ×4")
    assert estimate_memory(batch_size=2, **kwargs).total_bytes == 214688 + 512 * 5408
    assert not estimate_memory(batch_size=4, **kwargs).fits  # the largest batch that fits is suggested
    longer = estimate_memory(batch_size=1, **{**kwargs, "max_length": 1024})
    assert longer.suggestion == "Use max length 512."
    hopeless = estimate_memory(batch_size=8, **{**kwargs, "device": {**gpu, "total_bytes": 1000}})
    assert not hopeless.fits and "Pick a smaller base model" in hopeless.suggestion
    q = estimate_memory(batch_size=1, **{**kwargs, "method": "qlora", "device": cpu, "n_params": 100_000})
    linear = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128)  # 73728 weights in 4-bit, the rest fp32 on CPU
    assert q.weights_bytes == int(linear * (0.5 + 1 / 64 + 4 / 16384)) + (100_000 - linear) * 4
    assert available_devices()[0]["name"] == "cpu" and available_devices()[0]["total_bytes"] > 0


def test_explain_maps_raw_errors_to_plain_ones():
    assert isinstance(
        explain(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")), OutOfMemory
    )
    assert isinstance(explain(RuntimeError("CUDA out of memory. Tried to allocate")), OutOfMemory)
    assert isinstance(
        explain(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory")), OutOfMemory
    )
    assert isinstance(explain(MemoryError()), OutOfMemory)
    oom = explain(MemoryError())
    assert oom.code == "oom" and "batch size" in oom.suggestion and "QLoRA" in oom.suggestion
    full = explain(OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(full, DiskFull) and full.code == "disk_full"
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert isinstance(explain(wrapped), DiskFull)
    other = explain(ValueError("boom"))
    assert type(other) is TrainerError and other.code == "internal"
    data = DataError("Line 3 is bad.")
    assert explain(data) is data


# --------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_real_smollm2_lora_steps(tmp_path, smollm2_dir):
    model_path = str(smollm2_dir)
    config = make_config(model_path, tmp_path, max_steps=3, batch_size=2, max_length=256, learning_rate=1e-3)
    recorder = Recorder()
    result = run_training(config, recorder)
    losses = [m["loss"] for _, _, m in recorder.steps]
    assert result.status == "completed" and len(losses) == 3
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] * 1.05
    assert (Path(result.artifacts_dir) / "adapter_model.safetensors").exists()


# ---------------------------------------------------------- review findings: masking, averages, dropped rows
def _byte_level_tokenizer_without_template(path: Path):
    """A GPT-2 style (byte-level BPE) tokenizer and no chat template: the space after "assistant:" is
    merged into the answer's first word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS), "user: where is the parcel", "assistant: it ships tomorrow"] * 20
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")
    tokenizer.save_pretrained(str(path))
    return tokenizer


def test_fallback_template_trains_every_token_of_the_answer(tmp_path):
    tokenizer = _byte_level_tokenizer_without_template(tmp_path / "tok")
    assert not tokenizer.chat_template
    conversation = [
        {"role": "user", "content": "where is the parcel"},
        {"role": "assistant", "content": "it ships tomorrow"},
    ]
    example = tokenize_chat(tokenizer, conversation, 512)
    trained = [
        i for i, label in zip(example["input_ids"], example["labels"], strict=True) if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(trained) == " it ships tomorrow<eos>"


def test_a_model_without_chat_template_trains_sft_and_dpo_and_keeps_the_template(model_dir, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    config_path = bare / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config.pop("chat_template", None)
    config_path.write_text(json.dumps(tok_config))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    recorder = Recorder()
    result = run_training(make_config(bare, tmp_path / "sft", max_steps=1), recorder)
    assert any("no chat template" in line for line in recorder.lines)
    saved = json.loads((Path(result.artifacts_dir) / "tokenizer_config.json").read_text())
    template = saved.get("chat_template") or (Path(result.artifacts_dir) / "chat_template.jinja").read_text()
    assert "role" in template and "content" in template
    pairs = write_jsonl(
        tmp_path / "dpo.jsonl", [{"prompt": q, "chosen": a, "rejected": "bad no"} for q, a in FACTS]
    )
    dpo = run_training(make_config(bare, tmp_path / "dpo", method="dpo", train_path=str(pairs), max_steps=1))
    assert dpo.status == "completed"


def test_train_loss_average_covers_the_steps_before_a_resume(model_dir, tmp_path):
    config = make_config(model_dir, tmp_path, train_path=None, max_steps=4, checkpoint_every=2)
    run_training(config, Recorder(stop_after=2))
    result = run_training(config, Recorder())
    metrics = json.loads((Path(result.artifacts_dir) / "metrics.json").read_text())
    losses = [h["loss"] for h in metrics["history"] if "loss" in h]
    assert len(losses) == 4
    assert metrics["final"]["train_loss_avg"] == pytest.approx(sum(losses) / 4, rel=1e-9)


def test_dpo_pairs_that_do_not_fit_are_reported_and_none_fitting_is_a_data_error(model_dir, tmp_path):
    long_prompt = " ".join(["where is my parcel"] * 10)
    rows = [{"prompt": q, "chosen": a, "rejected": "bad no"} for q, a in FACTS[:3]]
    rows.append({"prompt": long_prompt, "chosen": "paris", "rejected": "rome"})
    recorder = Recorder()
    config = make_config(
        model_dir, tmp_path / "some", method="dpo", train_path=str(write_jsonl(tmp_path / "d.jsonl", rows)),
        max_steps=1, max_length=40, batch_size=1,
    )  # fmt: skip
    run_training(config, recorder)
    assert any("1 of 4 pairs skipped" in line for line in recorder.lines)
    assert recorder.starts[0]["examples"] == 3
    only_long = write_jsonl(tmp_path / "l.jsonl", [rows[-1]] * 2)
    config = make_config(
        model_dir, tmp_path / "none", method="dpo", train_path=str(only_long), max_steps=1, max_length=40
    )
    with pytest.raises(DataError, match="No preference pair's prompt fits"):
        run_training(config, Recorder())


def test_eval_rows_that_do_not_fit_are_reported_and_none_left_is_a_data_error(model_dir, tmp_path):
    long_question = [
        {
            "messages": [
                {"role": "user", "content": " ".join(WORDS * 2)},
                {"role": "assistant", "content": "paris"},
            ]
        }
    ]  # the answer starts beyond max_length; the training rows fit
    evals = write_jsonl(tmp_path / "e.jsonl", long_question * 2)
    config = make_config(model_dir, tmp_path, eval_path=str(evals), eval_every=1, max_length=64)
    with pytest.raises(DataError, match="No evaluation row has an assistant answer"):
        run_training(config, Recorder())


def test_a_run_that_no_longer_owns_its_job_leaves_the_artifacts_alone(model_dir, tmp_path):
    class Superseded(Recorder):
        def may_publish(self):
            return False

    recorder = Superseded()
    result = run_training(make_config(model_dir, tmp_path, max_steps=1), recorder)
    assert result.status == "stopped" and result.artifacts_dir is None
    assert not (tmp_path / "job" / "final").exists()
    assert not [p.name for p in (tmp_path / "job").iterdir() if p.name.startswith(".tmp-final")]
    assert any("a newer attempt owns this job" in line for line in recorder.lines)


def test_a_superseded_attempt_leaves_the_newer_attempts_scratch_folder_alone(model_dir, tmp_path):
    """Two attempts of a job can be alive at once (the watchdog requeued one it thought dead). Each writes
    its final artifacts into a scratch folder of its own: the older one, refused publishing, must not
    delete or write into the one the newer attempt is filling."""

    class Superseded(Recorder):
        def may_publish(self):
            return False

    job = tmp_path / "job"
    others = [job / ".tmp-final", job / ".tmp-final-4242-0badf00d"]  # a shared name, another attempt's
    for folder in others:
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"the newer attempt's weights")
    result = run_training(make_config(model_dir, tmp_path, max_steps=1), Superseded())
    assert result.status == "stopped"
    for folder in others:
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_model.safetensors"]
        assert (folder / "adapter_model.safetensors").read_bytes() == b"the newer attempt's weights"
    # the attempt that owns the job publishes, then removes the scratch folders dead attempts left
    completed = run_training(make_config(model_dir, tmp_path, max_steps=1), Recorder())
    assert completed.status == "completed" and (job / "final" / "adapter_model.safetensors").exists()
    assert not [p.name for p in job.iterdir() if p.name.startswith(".tmp-final")]
