"""Training domain operations: the base model catalog (base_models) and training jobs (jobs)."""

from .base_models import (
    SMOLLM2_NAME,
    BaseModelRefused,
    StatusChange,
    add_base_model,
    register_bundled_smollm2,
    register_gguf,
    register_local_dir,
    set_status,
)

__all__ = [
    "SMOLLM2_NAME",
    "BaseModelRefused",
    "StatusChange",
    "add_base_model",
    "register_bundled_smollm2",
    "register_gguf",
    "register_local_dir",
    "set_status",
]
