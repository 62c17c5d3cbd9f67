"""Job presets: a method plus hyperparameters an engineer can start from and then adjust."""

from __future__ import annotations

# Keys are TrainConfig fields (training_app/trainer/config.py). Every preset is a complete configuration.
COMMON = {
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "learning_rate": 2e-4,
    "lr_scheduler": "cosine",
    "warmup_ratio": 0.03,
    "epochs": 1.0,
    "max_steps": None,
    "batch_size": 4,
    "grad_accum": 1,
    "max_length": 1024,
    "packing": False,
    "assistant_only_loss": True,
    "seed": 42,
    "eval_every": 0,
    "checkpoint_every": 50,
    "dpo_beta": 0.1,
    "gradient_checkpointing": False,
}

PRESETS: dict[str, dict] = {
    "smoke": {
        "label": "Smoke test",
        "help": "A few LoRA steps on short sequences to check the pipeline end to end.",
        "method": "lora",
        "config": {
            **COMMON,
            "lora_r": 8,
            "lora_alpha": 16,
            "max_steps": 5,
            "batch_size": 2,
            "max_length": 256,
            "checkpoint_every": 2,
            "warmup_ratio": 0.0,
            "lr_scheduler": "constant",
        },
    },
    "lora_standard": {
        "label": "LoRA standard",
        "help": "LoRA r=16 on the attention projections, 3 epochs, packed sequences, eval every 50 steps.",
        "method": "lora",
        "config": {**COMMON, "epochs": 3.0, "grad_accum": 4, "packing": True, "eval_every": 50},
    },
    "qlora_large": {
        "label": "QLoRA large model",
        "help": "4-bit NF4 base with double quantisation, r=64 on all linear layers, gradient checkpointing.",
        "method": "qlora",
        "config": {
            **COMMON,
            "target_modules": ["all-linear"],
            "lora_r": 64,
            "lora_alpha": 16,
            "learning_rate": 1e-4,
            "batch_size": 2,
            "grad_accum": 8,
            "max_length": 2048,
            "packing": True,
            "gradient_checkpointing": True,
        },
    },
    "dpo": {
        "label": "DPO",
        "help": "Direct preference optimisation with a LoRA adapter on preference pairs (beta 0.1).",
        "method": "dpo",
        "config": {
            **COMMON,
            "learning_rate": 5e-5,
            "batch_size": 2,
            "grad_accum": 4,
            "max_length": 1024,
            "lr_scheduler": "linear",
            "warmup_ratio": 0.1,
        },
    },
}


def preset_config(name: str) -> tuple[str, dict]:
    """(method, config) of a preset; KeyError for an unknown name."""
    preset = PRESETS[name]
    return preset["method"], dict(preset["config"])
