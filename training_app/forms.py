"""The job form: dataset version, base model, method, preset and hyperparameters."""

from __future__ import annotations

from django import forms

from datasets_app.models import DatasetVersion

from .models import BaseModel, TrainingJob
from .presets import COMMON, PRESETS
from .services.jobs import SCHEDULERS


class JobForm(forms.Form):
    dataset_version = forms.ModelChoiceField(
        queryset=DatasetVersion.objects.select_related("dataset").order_by("dataset__name", "-number"),
        label="Dataset version",
        help_text="Frozen versions only; DPO needs a preference dataset.",
    )
    base_model = forms.ModelChoiceField(
        queryset=BaseModel.objects.filter(status=BaseModel.Status.ACTIVE), label="Base model"
    )
    method = forms.ChoiceField(choices=TrainingJob.Method.choices)
    preset = forms.ChoiceField(
        choices=[("", "— none —")] + [(k, v["label"]) for k, v in PRESETS.items()], required=False
    )
    model_name = forms.CharField(
        max_length=100,
        required=False,
        label="Model line",
        help_text="Registry name the result is added to, e.g. support-assistant (default: the dataset's name).",
    )
    target_modules = forms.CharField(help_text="Space-separated module names, or all-linear.")
    lora_r = forms.IntegerField(label="LoRA r")
    lora_alpha = forms.IntegerField(label="LoRA alpha")
    lora_dropout = forms.FloatField(label="LoRA dropout")
    learning_rate = forms.FloatField()
    lr_scheduler = forms.ChoiceField(choices=[(s, s) for s in SCHEDULERS], label="Scheduler")
    warmup_ratio = forms.FloatField()
    epochs = forms.FloatField()
    max_steps = forms.IntegerField(required=False, help_text="Overrides epochs when set.")
    batch_size = forms.IntegerField()
    grad_accum = forms.IntegerField(label="Gradient accumulation")
    max_length = forms.IntegerField(label="Max length (tokens)")
    packing = forms.BooleanField(required=False, label="Pack sequences (no attention across examples)")
    assistant_only_loss = forms.BooleanField(required=False, label="Loss on assistant tokens only")
    gradient_checkpointing = forms.BooleanField(required=False)
    seed = forms.IntegerField()
    eval_every = forms.IntegerField(label="Evaluate every N steps", help_text="0 = only at the end.")
    checkpoint_every = forms.IntegerField(label="Checkpoint every N steps")
    dpo_beta = forms.FloatField(label="DPO beta")
    replay_version = forms.ModelChoiceField(
        queryset=DatasetVersion.objects.select_related("dataset").order_by("dataset__name", "-number"),
        required=False,
        label="Replay from",
        help_text="Mix examples of an earlier version in to limit forgetting.",
    )
    replay_percent = forms.FloatField(required=False, initial=0, label="Replay share (%)")
    merge = forms.BooleanField(required=False, label="Also write a merged full model")

    CONFIG_KEYS = tuple(COMMON)

    def config(self) -> dict:
        return {k: self.cleaned_data.get(k) for k in self.CONFIG_KEYS}


def initial_for(preset: str | None) -> dict:
    method, config = "lora", dict(COMMON)
    if preset in PRESETS:
        method, config = PRESETS[preset]["method"], dict(PRESETS[preset]["config"])
    initial = {**config, "method": method, "preset": preset or "", "replay_percent": 0}
    initial["target_modules"] = " ".join(config["target_modules"])
    return initial


class BaseModelForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="e.g. Llama-3.1-8B-Instruct")
    source_kind = forms.ChoiceField(choices=BaseModel.Source.choices, label="Source")
    source = forms.CharField(
        max_length=500,
        label="Path or hub id",
        help_text="Absolute directory or .gguf path on the server, or organisation/model for a hub.",
    )
    license = forms.CharField(max_length=100, required=False)
