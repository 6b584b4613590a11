"""Run identity: a run folder and a resume digest are named by what defines the work, never by spend caps,
timeouts, concurrency or the name of the key variable; and the package has no import cycles."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

try:
    from tests.helpers_fake_server import FakeOpenAIServer
except ImportError:  # pragma: no cover - depends on how pytest sets sys.path
    from helpers_fake_server import FakeOpenAIServer

from stillroom.config import EvalConfig
from stillroom.kd.data import KDDataConfig
from stillroom.runs import digest_of, identity_of, run_dir_for

PACKAGE = Path(__file__).resolve().parents[1] / "stillroom"


def test_caps_timeouts_concurrency_and_key_name_do_not_change_the_run_folder():
    a = EvalConfig.model_validate({"task": {"spec": "d.jsonl"}, "spend": {"max_tokens": 1500}})
    b = EvalConfig.model_validate({"task": {"spec": "d.jsonl"}, "spend": {"max_tokens": 100000, "max_cost_usd": 2},
                                   "model": {"timeout_s": 5, "max_concurrency": 1, "max_retries": 0,
                                             "api_key_env": "OTHER_KEY", "batch_size": 2}})
    assert run_dir_for("eval", a) == run_dir_for("eval", b)
    assert "spend" not in identity_of(a) and "timeout_s" not in identity_of(a)["model"]
    c = EvalConfig.model_validate({"task": {"spec": "d.jsonl"}, "shots": 3})
    d = EvalConfig.model_validate({"task": {"spec": "d.jsonl", "seed": 1}})
    assert len({run_dir_for("eval", x) for x in (a, c, d)}) == 3


def training_digest(cfg) -> str:
    """What a route's resume check compares: the digest without the evaluation-only fields."""
    return digest_of(cfg, leave_out=("evaluation",))


def test_training_digest_changes_with_training_fields_only():
    base = {"task": {"spec": "d.jsonl"}, "student": "s"}
    d0 = training_digest(KDDataConfig.model_validate(base))
    assert training_digest(KDDataConfig.model_validate({**base, "eval_limit": 5, "eval_before": False})) == d0
    assert training_digest(KDDataConfig.model_validate({**base, "spend": {"max_tokens": 10},
                                                        "teacher": {"timeout_s": 3, "max_concurrency": 1}})) == d0
    assert training_digest(KDDataConfig.model_validate({**base, "max_steps": 7})) != d0
    assert training_digest(KDDataConfig.model_validate({**base, "teacher": {"spec": "openai:x"}})) != d0


def test_eval_stopped_by_its_cap_resumes_in_the_same_folder_with_a_higher_cap(tmp_path, monkeypatch):
    from stillroom.cli import app

    monkeypatch.setenv("STILLROOM_RUNS", str(tmp_path / "runs"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"e{i}", "input": f"case {i}", "label": ["yes", "no"][i % 2]}) + "\n"
                            for i in range(40)))
    with FakeOpenAIServer() as srv:
        args = ["eval", "--task", str(data), "--model", "openai:m", "--base-url", srv.base_url, "--method", "generate",
                "--split", "test"]
        # Each call reserves its worst case (~145 tokens: its input's byte bound, template overhead, 16 answer
        # tokens) while the fake server bills 18, so a 300-token cap stops part-way through the 12 prompts.
        first = CliRunner().invoke(app, args + ["--max-spend-tokens", "300"])
        assert first.exit_code == 2 and "cap" in first.output
        paid = len(srv.requests)
        assert 0 < paid < 12
        second = CliRunner().invoke(app, args + ["--max-spend-tokens", "100000"])
        assert second.exit_code == 0, second.output
        folders = list((tmp_path / "runs").iterdir())
        assert len(folders) == 1  # the same run folder
        prompts = [json.dumps(r["body"].get("messages") or r["body"].get("prompt"), sort_keys=True) for r in srv.requests]
        assert len(prompts) == len(set(prompts))  # no prompt paid twice
        usage = json.loads((folders[0] / "usage.json").read_text())
        assert usage["cache_hits"] == paid


def _imports(path: Path, module: str) -> set[str]:
    """Every stillroom module a file imports, function-local imports included."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("stillroom")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.rsplit(".", node.level)[0]
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name.startswith("stillroom"):
                out.add(name)
    return out


def test_no_import_cycles():
    modules = {}
    for f in PACKAGE.rglob("*.py"):
        rel = f.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        modules[name] = f

    def resolve(name):  # `from stillroom.x import y` may name a module y or a symbol of x
        while name and name not in modules:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name

    graph = {m: {resolve(i) for i in _imports(f, m)} - {m, "", "stillroom"} for m, f in modules.items()}

    def with_packages(m, deps):
        # Importing stillroom.a.b runs stillroom/a/__init__.py first: that package's __init__ is an edge too
        # (config → models → backends/__init__ → config was a loop only through it). A module's own packages are
        # already being imported when it runs, so those are not edges.
        out = set()
        for d in deps:
            parts = d.split(".")
            for i in range(2, len(parts) + 1):
                p = ".".join(parts[:i])
                if p in modules and not m.startswith(p + "."):
                    out.add(p)
        return out - {m}

    graph = {m: with_packages(m, deps) for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles[:10])


#: design.md's layers, lowest first: a module imports only from its own layer or lower ones.
LAYERS = [
    {"errors", "paths"},
    {"runs", "ui"},
    {"config", "options"},
    {"backends"},
    {"tasks"},
    {"models"},
    {"evaluate", "train", "report", "locking"},
    {"route"},
    {"pld", "kd", "gad", "prune", "prompting", "integrations"},
    {"compare"},
    {"cli", "__main__", ""},
]
#: Imports allowed to run up a layer, each with its reason (at most one).
UPWARD: dict[tuple[str, str], str] = {}


def test_imports_run_in_one_direction():
    level = {name: i for i, names in enumerate(LAYERS) for name in names}
    up = []
    for f in PACKAGE.rglob("*.py"):
        rel = f.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        top = module.split(".")[1] if "." in module else ""
        for dep in _imports(f, module):
            dtop = dep.split(".")[1] if dep.count(".") else ""
            if dtop and top != dtop and level[dtop] > level[top] and (top, dtop) not in UPWARD:
                up.append(f"{module} -> {dep}")
    assert len(UPWARD) <= 1
    assert not up, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(up))


@pytest.mark.parametrize("module", ["stillroom.gad.cli", "stillroom.kd.cli", "stillroom.prune.cli", "stillroom.compare.cli"])
def test_route_clis_do_not_import_the_main_cli(module):
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    assert "stillroom.cli" not in _imports(path, module)
