from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from ...services import register_bundled_smollm2, register_gguf, register_local_dir


class Command(BaseCommand):
    help = "Register a base model: the bundled SmolLM2 (default), a local HF directory or a GGUF file."

    def add_arguments(self, parser):
        parser.add_argument("--name", default="")
        parser.add_argument("--dir", default="", help="local Hugging Face directory (config + safetensors)")
        parser.add_argument("--gguf", default="", help="GGUF file, converted once to safetensors")
        parser.add_argument("--license", default="")

    def handle(self, *args, **opts):
        try:
            if opts["dir"]:
                model = register_local_dir(
                    opts["name"] or Path(opts["dir"]).name, Path(opts["dir"]), "cli", license=opts["license"]
                )
            elif opts["gguf"]:
                model = register_gguf(
                    opts["name"] or Path(opts["gguf"]).stem,
                    Path(opts["gguf"]),
                    "cli",
                    license=opts["license"],
                )
            else:
                model = register_bundled_smollm2("cli")
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            raise CommandError(str(exc))
        self.stdout.write(
            f"{model.name}: {model.parameters_label} parameters, context {model.context_length}, "
            f"at {model.local_dir}"
        )
