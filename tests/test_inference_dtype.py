"""The dtype evaluation and serving load a model in (STUDIO_INFERENCE_DTYPE).

On an H100, SmolLM2-135M's greedy answers in bfloat16 depended on which prompts shared the batch (2 of 16
matched one-prompt-at-a-time generation), in float32 they did not (16 of 16). "auto" keeps models of at
most 1B parameters in float32 on a GPU; the CPU always uses float32."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from eval_app import inference
from eval_app.inference import LoadedModel, ModelSpec, inference_dtype


@pytest.fixture
def bf16_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


@pytest.mark.parametrize("choice", ["auto", "float32", "bfloat16", "float16"])
def test_the_cpu_always_loads_float32(settings, tiny_model_dir, choice):
    settings.STUDIO_INFERENCE_DTYPE = choice
    assert inference_dtype(str(tiny_model_dir), "cpu") is torch.float32


def test_auto_keeps_a_small_model_in_float32_on_a_gpu(settings, tiny_model_dir, bf16_gpu):
    settings.STUDIO_INFERENCE_DTYPE = "auto"
    assert inference_dtype(str(tiny_model_dir), "cuda") is torch.float32


def test_auto_loads_a_model_over_the_limit_in_bfloat16(settings, tiny_model_dir, bf16_gpu, monkeypatch):
    settings.STUDIO_INFERENCE_DTYPE = "auto"
    from training_app.trainer.convert import describe_model_dir

    parameters = describe_model_dir(tiny_model_dir)["parameters"]
    monkeypatch.setattr(inference, "AUTO_FLOAT32_MAX_PARAMETERS", parameters)
    assert inference_dtype(str(tiny_model_dir), "cuda") is torch.float32  # at the limit: still float32
    monkeypatch.setattr(inference, "AUTO_FLOAT32_MAX_PARAMETERS", parameters - 1)
    assert inference_dtype(str(tiny_model_dir), "cuda") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert inference_dtype(str(tiny_model_dir), "cuda") is torch.float32  # no bfloat16 on that GPU


def test_auto_falls_back_to_bfloat16_when_the_size_cannot_be_read(settings, tmp_path, bf16_gpu):
    settings.STUDIO_INFERENCE_DTYPE = "auto"
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\x01")  # cut short: loading reports it, not this
    assert inference_dtype(str(tmp_path), "cuda") is torch.bfloat16
    assert inference_dtype(str(tmp_path / "missing"), "cuda") is torch.bfloat16


@pytest.mark.parametrize(
    "choice,dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)]
)
def test_an_explicit_choice_is_used_on_a_gpu(settings, tiny_model_dir, choice, dtype):
    settings.STUDIO_INFERENCE_DTYPE = choice
    assert inference_dtype(str(tiny_model_dir), "cuda") is dtype


def test_the_loaded_model_is_in_the_chosen_dtype(settings, tiny_model_dir, monkeypatch):
    chosen = []

    def bfloat16_here(weights_dir, device):
        chosen.append((weights_dir, device))
        return torch.bfloat16

    monkeypatch.setattr(inference, "inference_dtype", bfloat16_here)
    spec = ModelSpec(key="t", label="tiny", base_dir=str(tiny_model_dir))
    model = LoadedModel(spec, device="cpu")
    assert chosen == [(str(tiny_model_dir), "cpu")]
    assert {p.dtype for p in model.model.parameters()} == {torch.bfloat16}


def test_an_unknown_value_is_refused_at_start_naming_the_variable(tmp_path):
    env = {"STUDIO_INFERENCE_DTYPE": "fp8", "STUDIO_VAR_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import django, os; os.environ['DJANGO_SETTINGS_MODULE']='studio.settings'; django.setup()",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert (
        "STUDIO_INFERENCE_DTYPE must be 'auto', 'float32', 'bfloat16' or 'float16', not 'fp8'"
        in result.stderr
    )
