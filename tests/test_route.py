"""The route skeleton (`stillroom.route.run_route`): every deployment a build returns is evaluated on the same
examples, the deployed one is recorded with the build's teacher calls, a rerun that rebuilds nothing keeps the
first build cost, an evaluation-only change re-evaluates without rebuilding; and no route module writes the
sequence itself."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from pydantic import Field

from stillroom.backends.base import GenerationParams
from stillroom.backends.scripted import ScriptedBackend
from stillroom.config import BackendConfig, SelectionBlock, SpendConfig, spend_field
from stillroom.route import Built, Deployment, read_result, run_route

PACKAGE = Path(__file__).resolve().parents[1] / "stillroom"


class ToyConfig(SelectionBlock):
    """A route config made of the shared blocks, as every route's is."""

    teacher: BackendConfig = Field(default_factory=lambda: BackendConfig(spec="scripted:toy"))
    rounds: int = 1
    spend: SpendConfig = spend_field()


def _task(tmp_path: Path) -> Path:
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps({"id": f"e{i}", "input": f"case {i}", "label": ["yes", "no"][i % 2]}) + "\n"
                         for i in range(40)))
    return p


def _toy_build(built_log: list):
    def build(ctx):
        teacher = ctx.open_teacher(ctx.cfg.teacher, ScriptedBackend(lambda p, _: "yes"))
        if not ctx.finished(ctx.run.read_json("train.json")):
            for i in range(ctx.cfg.rounds):  # the build's paid teacher calls
                teacher.generate(f"teach {i}", GenerationParams(max_tokens=4))
            ctx.run.write_json("train.json", {"config_digest": ctx.digest()})
            built_log.append(ctx.cfg.rounds)
        base = Deployment(name="base", backend=None, model="scripted:base", method="generate",
                          load=lambda: ScriptedBackend(lambda p, _: "yes", name="base"))
        deployed = Deployment(name="built", backend=ScriptedBackend(lambda p, _: "no", name="built"),
                              model="scripted:built", method="generate")
        return Built(deployments=[base, deployed], steps=3, usage=teacher.meter.summary)

    return build


def test_run_route_evaluates_every_deployment_and_a_rerun_rebuilds_nothing(tmp_path):
    cfg = ToyConfig(task={"spec": str(_task(tmp_path))}, eval_limit=6, rounds=2)
    built: list = []
    run_dir = tmp_path / "run"
    first = run_route(cfg, run_dir, _toy_build(built), route="toy", title="toy")
    assert set(first.results) == {"base", "built"}
    assert first.results["base"].metrics["n"] == first.results["built"].metrics["n"] == 6
    result = read_result(run_dir)
    assert result["condition"] == "built" and result["route"] == "toy"
    assert result["build"]["teacher_calls"] == 2 and result["build"]["training_steps"] == 3
    assert json.loads((run_dir / "usage.json").read_text())["calls"] == 2

    again = run_route(cfg, run_dir, _toy_build(built), route="toy", title="toy")
    assert built == [2]  # nothing rebuilt, no teacher call
    assert read_result(run_dir)["build"] == result["build"]  # the first build's cost is kept, not the replay's
    assert again.results["built"].metrics["accuracy"] == first.results["built"].metrics["accuracy"]

    # An evaluation-only field (declared on the field, EVALUATION_ONLY) re-evaluates without rebuilding...
    run_route(cfg.model_copy(update={"eval_limit": 4}), run_dir, _toy_build(built), route="toy", title="toy")
    assert built == [2] and read_result(run_dir)["quality"]["n"] == 4
    # ...a field that shapes the build rebuilds.
    run_route(cfg.model_copy(update={"rounds": 3}), run_dir, _toy_build(built), route="toy", title="toy")
    assert built == [2, 3]


ROUTE_PACKAGES = ("pld", "kd", "gad", "prune", "prompting", "compare")
SKELETON_STEPS = {"select", "open_run", "evaluate", "record", "evaluate_deployment"}
#: The one exception: `heal` and `merge slerp` make a model outside any route and, with --task, select its test
#: sample before building it and evaluate the folder with `stillroom.route.evaluate_model_folder`.
ALLOWED = {("stillroom/prune/cli.py", "select")}


def test_no_route_module_writes_the_skeleton_sequence():
    found = []
    for pkg in ROUTE_PACKAGES:
        for f in sorted((PACKAGE / pkg).rglob("*.py")):
            rel = str(f.relative_to(PACKAGE.parent))
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call):
                    name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                    # ctx.evaluate is the skeleton's evaluator for model selection; a bare evaluate() is not.
                    if name == "evaluate" and isinstance(node.func, ast.Attribute):
                        continue
                    if name in SKELETON_STEPS and (rel, name) not in ALLOWED:
                        found.append(f"{rel}:{node.lineno} calls {name}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("path", ["kd/trainer.py", "kd/data.py", "gad/train.py", "prune/route.py",
                                  "pld/pipeline.py", "prompting/job.py"])
def test_route_functions_stay_short(path):
    tree = ast.parse((PACKAGE / path).read_text(encoding="utf-8"))
    long = [f"{n.name}: {n.end_lineno - n.lineno + 1} lines" for n in tree.body
            if isinstance(n, ast.FunctionDef) and (n.name.startswith(("build", "run_", "distill_", "_build"))
                                                  or n.name.endswith("_stage"))
            and n.end_lineno - n.lineno + 1 > 60]
    assert not long, long
