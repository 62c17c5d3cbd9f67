from __future__ import annotations

from pathlib import Path

from django.core.management.base import CommandError

from studio.cli import StudioCommand

from ...services import register_bundled_smollm2, register_gguf, register_local_dir
from ...services.base_models import BaseModelRefused, check_local_dir, check_name


class Command(StudioCommand):
    help = "Register a base model: the bundled SmolLM2 (default), a local HF directory or a GGUF file."

    def add_arguments(self, parser):
        parser.add_argument("--name", default="")
        parser.add_argument("--dir", default="", help="local Hugging Face directory (config + safetensors)")
        parser.add_argument("--gguf", default="", help="GGUF file, converted once to safetensors")
        parser.add_argument("--license", default="")

    path_options = ("dir", "gguf")

    def handle(self, *args, **opts):
        if len(opts["license"]) > 100:
            raise CommandError("--license: at most 100 characters (e.g. Apache-2.0).")
        try:
            if opts["dir"]:
                path = Path(opts["dir"]).resolve()
                name = opts["name"] or path.name
                check_name(name)
                check_local_dir(path)
                model = register_local_dir(name, path, "cli", license=opts["license"])
            elif opts["gguf"]:
                path = Path(opts["gguf"]).resolve()
                name = opts["name"] or path.stem
                check_name(name)
                if path.suffix.lower() != ".gguf" or not path.is_file():
                    raise BaseModelRefused(f"--gguf: {path} is not a .gguf file.")
                model = register_gguf(name, path, "cli", license=opts["license"])
            else:
                model = register_bundled_smollm2("cli")
        except BaseModelRefused as exc:
            raise CommandError(str(exc)) from None
        except Exception as exc:  # unreadable config or weights, a failed conversion: say which, briefly
            raise CommandError(f"The model could not be registered: {type(exc).__name__}: {exc}") from None
        self.stdout.write(
            f"{model.name}: {model.parameters_label} parameters, context {model.context_length}, "
            f"at {model.local_dir}"
        )
