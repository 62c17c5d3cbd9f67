"""Framework-free training code: base-model conversion and the training runtime (no Django imports)."""
