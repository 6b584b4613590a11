"""The shipped configs (demo and documented examples) stay valid as the config models change."""

from pathlib import Path

import pytest

from stillroom.config import PLDConfig, load_yaml_config
from stillroom.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", [ROOT / "stillroom/configs/pld_demo.yaml", *sorted((ROOT / "examples").glob("pld_*.yaml"))])
def test_shipped_pld_configs_validate(path):
    cfg = load_yaml_config(path, PLDConfig)
    assert cfg.task.spec


def test_unknown_field_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("task: {spec: x.jsonl}\nteacher: {spec: gemma3-270m, temprature: 0.3}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: field 'teacher\.temprature'"):
        load_yaml_config(p, PLDConfig)


def test_config_never_holds_a_key_only_its_variable_name():
    assert "api_key" not in PLDConfig.model_fields["teacher"].annotation.model_fields
