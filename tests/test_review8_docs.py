"""Review 8, documentation pass: what README.md says a command does, it does."""

from __future__ import annotations

import json

from training_app.trainer.__main__ import main as trainer_main
from training_app.trainer.config import TrainConfig


def test_training_config_artifact_is_accepted_back_by_the_trainer_module(tmp_path, capsys):
    """README (Multi-GPU jobs): a job's `training_config.json` artifact lists every setting, to run the job
    under torchrun / accelerate with `python -m training_app.trainer --config`. The artifact also holds
    the run's "resolved" device, precision and library versions, which the module refused as an unknown
    setting."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    train_path = tmp_path / "train.jsonl"
    train_path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    config = TrainConfig(
        method="lora",
        model_dir=str(model_dir),
        output_dir=str(tmp_path / "out"),
        train_path=str(train_path),
        max_steps=2,
    )
    # what training_app.trainer.run writes as final/training_config.json
    artifact = {
        **config.to_dict(),
        "resolved": {"device": "cpu", "precision": "fp32", "world_size": 1, "versions": {"torch": "x"}},
    }
    path = tmp_path / "training_config.json"
    path.write_text(json.dumps(artifact))

    assert TrainConfig.from_dict(artifact) == config
    assert trainer_main(["--config", str(path), "--validate"]) == 0
    event = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert event == {"event": "validate", "ok": True, "problems": []}


def test_every_environment_variable_of_the_settings_is_in_the_readme():
    """README's configuration tables name every variable studio/settings.py reads, and the command-line
    section every management command of the studio's apps."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    settings_text = (root / "studio" / "settings.py").read_text(encoding="utf-8")
    read = set(re.findall(r"""env(?:str|bool|int|float)\(\s*["']([A-Z0-9_]+)["']""", settings_text))
    read |= set(re.findall(r"""_secret\(\s*["']([A-Z0-9_]+)["']""", settings_text))
    assert len(read) > 40
    assert sorted(name for name in read if f"`{name}`" not in readme) == []
    commands = {
        path.stem
        for app in ("studio", "datasets_app", "training_app", "eval_app")
        for path in (root / app / "management" / "commands").glob("*.py")
        if path.stem != "__init__"
    }
    assert sorted(name for name in commands if f"manage.py {name}" not in readme) == []
