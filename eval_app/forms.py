"""Forms of the evaluation-run pages: a new run and the canary registry."""

from __future__ import annotations

from django import forms
from django.conf import settings

from datasets_app.models import DatasetVersion

from .models import Canary, EvalRun, ModelVersion


def _versions():
    return ModelVersion.objects.select_related("registered_model", "base_model").order_by(
        "registered_model__name", "-number"
    )


class VersionChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, obj: ModelVersion) -> str:
        return f"{obj} ({obj.base_model.name}, {obj.get_status_display().lower()})"


class EvalRunForm(forms.Form):
    candidate = VersionChoiceField(queryset=_versions(), label="Candidate version")
    baseline_kind = forms.ChoiceField(
        choices=EvalRun.BaselineKind.choices,
        label="Baseline",
        initial=EvalRun.BaselineKind.BASE,
        widget=forms.RadioSelect,
    )
    baseline_version = VersionChoiceField(
        queryset=_versions(),
        required=False,
        label="Baseline version",
        help_text="Only when the baseline is “a chosen version”; it must share the candidate's tokenizer.",
    )
    dataset_version = forms.ModelChoiceField(
        queryset=DatasetVersion.objects.select_related("dataset").order_by("dataset__name", "-number"),
        label="Dataset version",
        help_text="Its golden (or eval) examples are the prompts both models answer.",
    )
    split = forms.ChoiceField(choices=[("golden", "Golden"), ("eval", "Eval")], initial="golden")
    max_new_tokens = forms.IntegerField(label="Max new tokens", min_value=1, max_value=4096)
    temperature = forms.FloatField(
        min_value=0, max_value=2, initial=0.0, help_text="0 = greedy (the same answers every time)."
    )
    seed = forms.IntegerField(min_value=0, initial=0)
    batch_size = forms.IntegerField(min_value=1, max_value=256, help_text="Prompts generated together.")
    limit = forms.IntegerField(
        required=False, min_value=1, help_text="Use only the first N examples of the split (empty = all)."
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["max_new_tokens"].initial = settings.STUDIO_EVAL_MAX_NEW_TOKENS
        self.fields["batch_size"].initial = settings.STUDIO_EVAL_BATCH_SIZE

    def params(self) -> dict:
        return {
            k: self.cleaned_data.get(k)
            for k in ("max_new_tokens", "temperature", "seed", "batch_size", "limit")
        }


class CanaryForm(forms.ModelForm):
    class Meta:
        model = Canary
        fields = ["value", "label"]
        help_texts = {
            "value": "The exact string planted in the training data (matched case-insensitively in outputs).",
            "label": "What it marks, e.g. “support set March import”; shown instead of the value.",
        }
        widgets = {"value": forms.TextInput(attrs={"autocomplete": "off"})}
        error_messages = {"value": {"unique": "This canary is already registered."}}

    def clean_value(self) -> str:
        value = self.cleaned_data["value"]
        if len(value.strip()) < 6:
            raise forms.ValidationError(
                "A canary needs at least 6 characters; short strings would match ordinary answers."
            )
        return value
