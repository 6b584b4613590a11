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


@pytest.mark.parametrize("path", [ROOT / "stillroom/configs/compare_demo.yaml", *sorted((ROOT / "examples").glob("compare_*.yaml"))])
def test_shipped_compare_configs_validate_with_every_route_budget(path):
    from stillroom.compare.config import CompareConfig
    from stillroom.compare.routes import plan_routes

    cfg = load_yaml_config(path, CompareConfig)
    plans = plan_routes(cfg)  # each route's own config is validated here, budgets included
    from stillroom.compare.config import ALL_ROUTES

    assert {p.name for p in plans} == set(cfg.routes or ALL_ROUTES)
    assert all(p.config is not None for p in plans if not p.skip_reason)


def test_unknown_field_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("task: {spec: x.jsonl}\nteacher: {spec: gemma3-270m, temprature: 0.3}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: field 'teacher\.temprature'"):
        load_yaml_config(p, PLDConfig)


def test_config_never_holds_a_key_only_its_variable_name():
    assert "api_key" not in PLDConfig.model_fields["teacher"].annotation.model_fields


def test_cross_field_checks_fail_at_load(tmp_path):
    from stillroom.config import EvalConfig, validate_config
    from stillroom.errors import ConfigError
    from stillroom.gad.config import GADConfig
    from stillroom.kd.data import KDDataConfig
    from stillroom.kd.trainer import KDLogitsConfig
    from stillroom.prune.route import PruneHealConfig

    task = {"spec": "d.jsonl"}
    cases = [
        (KDLogitsConfig, {"task": task, "student": "s", "top_k": 0}, "only available with teacher_mode 'online'"),
        (KDLogitsConfig, {"task": task, "student": "s", "on_policy": True, "divergence": "tvd"}, "fkl, rkl and jsd"),
        (KDDataConfig, {"task": task, "student": "s", "samples": 3}, "needs temperature > 0"),
        (PruneHealConfig, {"task": task, "block": "5:2"}, "START < END"),
        (PruneHealConfig, {"task": task, "drop": 0, "healing": "self-data"}, "use healing 'sft'"),
        (EvalConfig, {"task": task, "system_prompt_file": str(tmp_path / "missing.txt")}, "missing.txt"),
        (GADConfig, {"task": task, "student": "s", "lora": {"rank": 4}}, "lora.rank"),
    ]
    for model, data, needle in cases:
        with pytest.raises(ConfigError, match=needle):
            validate_config(model, data)
    # `lora: false` is full fine-tuning; a block of settings keeps its own values.
    assert validate_config(GADConfig, {"task": task, "student": "s", "lora": False}).lora.enabled is False
    assert validate_config(KDDataConfig, {"task": task, "student": "s", "lora": {"r": 4}}).lora.r == 4


@pytest.mark.parametrize("old,new,model", [
    ("test_limit", "eval_limit", "stillroom.config:PLDConfig"),
    ("extract_sample", "train_limit", "stillroom.config:PLDConfig"),
    ("limit", "eval_limit", "stillroom.config:EvalConfig"),
    ("split", "eval_split", "stillroom.config:EvalConfig"),
    ("test_limit", "eval_limit", "stillroom.compare.config:CompareConfig"),
    ("steps", "max_steps", "stillroom.prune.route:PruneHealConfig"),
    ("teacher_base_url", "teacher.base_url", "stillroom.kd.trainer:KDLogitsConfig"),
])
def test_an_old_field_name_gets_one_error_naming_the_new_one(tmp_path, old, new, model):
    import importlib

    module, _, name = model.partition(":")
    cls = getattr(importlib.import_module(module), name)
    p = tmp_path / "c.yaml"
    p.write_text(f"task: {{spec: x.jsonl}}\nstudent: s\n{old}: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_yaml_config(p, cls)
    assert str(exc.value) == f"{p}: '{old}' was renamed: use '{new}'"


def test_every_yaml_in_the_repo_loads():
    # The shipped demos and examples, and every config a bench script builds, validate with today's names.
    from stillroom.compare.config import CompareConfig
    from stillroom.compare.routes import plan_routes

    for path in [*sorted((ROOT / "stillroom/configs").glob("*.yaml")), *sorted((ROOT / "examples").glob("*.yaml"))]:
        model = CompareConfig if path.name.startswith("compare") else PLDConfig
        cfg = load_yaml_config(path, model)
        if model is CompareConfig:
            assert all(p.config is not None for p in plan_routes(cfg) if not p.skip_reason)


def _bench(name: str):
    import importlib.util
    import sys

    sys.path.insert(0, str(ROOT / "bench"))  # the bench scripts import their `_common` helper from there
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bench_scripts_configs_validate(tmp_path):
    # compare_study plans every route with its budgets; kd_quality builds its KD and SeqKD configs (pld_vs_dspy's
    # PLD config is exercised end to end by test_dspy_lm).
    from stillroom.compare.routes import plan_routes

    study = _bench("compare_study")
    cfg = study.study_config(study.parse_args([]), "gemma3-270m")
    assert all(p.config is not None for p in plan_routes(cfg) if not p.skip_reason)
    kd = _bench("kd_quality")
    cfgs = kd.kd_configs(kd.parse_args([]), tmp_path / "teacher", tmp_path / "student")
    assert cfgs["fkl"].eval_limit == cfgs["seqkd"].eval_limit == 60 and cfgs["seqkd"].teacher_shots == 3
