"""One route skeleton. Every way of making a cheap model is the same five steps:

1. **select**: the task's seeded splits and the route's samples of them (`select`);
2. **build**: what only the route does (extract rules, cache teacher logits and train, prune and heal, ...);
3. **deploy**: what a user would serve (`Deployment`: a model, a system prompt, shots, an answer method);
4. **evaluate**: the one evaluator on the shared test split (`evaluate_deployment`);
5. **record**: the run folder's files and one `result.json` record (`record`).

Steps 1, 4 and 5 are written here once; a route module supplies step 2 and says what it deploys. Because every
route selects its test examples with the same function from the same seed, two routes given the same task
config and test limit are evaluated on exactly the same examples: `stillroom compare` relies on it.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from stillroom.config import TaskConfig
from stillroom.errors import ConfigError
from stillroom.evaluate.runner import EvalResult, evaluate
from stillroom.evaluate.stats import bootstrap_ci
from stillroom.runs import RunFolder
from stillroom.tasks.task import Example, Splits, Task, sample

RESULT_FILE = "result.json"


# ------------------------------------------------------------------------------------------------ 1. select


@dataclass
class Selection:
    """The task, its seeded splits, and the samples a route uses: `train` (build), `val` (model selection),
    `test` (the shared evaluation examples)."""

    task: Task
    splits: Splits
    train: list[Example]
    val: list[Example]
    test: list[Example]
    seed: int = 0

    def shots(self, k: int) -> list[Example]:
        """k solved training examples for a prompt (a seeded sample of the whole training split)."""
        return sample(self.splits.train, k, seed=self.seed) if k else []


def load_task_config(task_cfg: TaskConfig) -> Task:
    """Load the task a config names (file, BIG-bench or local dataset), validating every example."""
    from stillroom.tasks import load_task

    return load_task(task_cfg.spec, instruction=task_cfg.instruction, labels=task_cfg.labels)


def select(task_cfg: TaskConfig, *, split: str = "test", limit: int | None = None, train_limit: int | None = None,
           val_limit: int | None = None, task: Task | None = None, need_labels: bool = False) -> Selection:
    """Step 1 for every route: load the task, split it with its seed, and take deterministic samples.

    `split`/`limit` choose the evaluated examples (the test split by default); the same config always gives the
    same examples, whichever route asks."""
    task = task or load_task_config(task_cfg)
    if need_labels and task.kind == "free_text":
        raise ConfigError(f"this route needs a label set or options; task {task.name!r} is free text")
    splits = task.splits(seed=task_cfg.seed, val_fraction=task_cfg.val_fraction, test_fraction=task_cfg.test_fraction)
    seed = task_cfg.seed
    return Selection(task=task, splits=splits, train=sample(splits.train, train_limit, seed=seed),
                     val=sample(splits.val, val_limit, seed=seed), test=sample(splits.get(split), limit, seed=seed),
                     seed=seed)


def open_run(cfg, run_dir: str | Path) -> tuple[RunFolder, dict]:
    """The run folder with the config saved (secrets redacted). Returns (run, config as a dict).

    The folder is held for this process (`stillroom.locking`; kept to the end of the process unless the
    caller already holds it in a narrower scope, as `run_eval` and `run_pld` do), so a second process never
    pays for the same calls. Call it after everything that can fail on the config or the data, so a failed
    first run leaves no folder."""
    from stillroom.locking import hold_run_folder

    hold_run_folder(run_dir)
    run = RunFolder(run_dir)
    config_dict = cfg.model_dump(mode="json")
    run.save_config(config_dict)
    start_clock(run)
    return run, config_dict


# ------------------------------------------------------------------------------------------------ build clock
CLOCK_FILE = "build_clock.json"
CLOCK_BEAT_S = 2.0
"""How often an open run folder's clock is written: the most wall time a kill -9 can leave uncounted."""
_clocks: dict[Path, _Clock] = {}
_clocks_lock = threading.Lock()


class _Clock:
    """Wall seconds of every invocation that worked in a run folder, kept in `build_clock.json` and rewritten
    every `CLOCK_BEAT_S` seconds (so even a kill -9 leaves its invocation's time behind). `record` adds the time
    of earlier invocations that never finished to the build's seconds: a build's cost does not shrink because it
    was interrupted and resumed from the cache."""

    def __init__(self, run: RunFolder):
        self.run = run
        self.earlier = list((run.read_json(CLOCK_FILE) or {}).get("invocations") or [])
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._write()
        threading.Thread(target=self._beat, daemon=True, name="stillroom-build-clock").start()

    def _beat(self) -> None:
        while not self._stop.wait(CLOCK_BEAT_S):
            self._write()

    def _write(self, recorded: bool = False) -> None:
        mine = {"seconds": round(time.monotonic() - self.started, 3), "recorded": recorded}
        earlier = [{**e, "recorded": True} for e in self.earlier] if recorded else self.earlier
        try:
            self.run.write_json(CLOCK_FILE, {"invocations": [*earlier, mine]})
        except OSError:  # the clock is a report figure: never let it stop a run
            pass

    def unrecorded_earlier_seconds(self) -> float:
        """Wall seconds of earlier invocations whose build never reached `record` (interrupted ones)."""
        return sum(float(e.get("seconds") or 0.0) for e in self.earlier if not e.get("recorded"))

    def stop(self, recorded: bool = False) -> None:
        self._stop.set()
        self._write(recorded)


@atexit.register
def _write_clocks_at_exit() -> None:
    # Ctrl-C and errors end the process through here: their invocation's time is written exactly.
    with _clocks_lock:
        clocks = list(_clocks.values())
    for clock in clocks:
        clock._write()


def start_clock(run: RunFolder) -> None:
    """Start the run folder's build clock for this invocation (once per folder and process)."""
    key = run.path.resolve()
    with _clocks_lock:
        if key not in _clocks:
            _clocks[key] = _Clock(run)


def stop_clock(folder: str | Path, recorded: bool = False) -> _Clock | None:
    """Stop a run folder's clock (a route finished, or failed inside a longer command such as a compare)."""
    with _clocks_lock:
        clock = _clocks.pop(Path(folder).resolve(), None)
    if clock is not None:
        clock.stop(recorded)
    return clock


# ------------------------------------------------------------------------------------------------ 3. deploy


@dataclass
class Deployment:
    """What a route deploys: what a user would serve, and how it answers."""

    name: str
    """The condition's name in tables (e.g. 'PLD', 'student (KD)')."""
    backend: Any
    """The backend that answers (a cached backend, or an in-memory `HFBackend` of a trained model)."""
    model: str
    """What a user serves: a model spec or a model folder."""
    system_prompt: str | None = None
    shots: Sequence[Example] = ()
    method: str = "auto"
    """'auto', 'loglik', 'generate' or 'cot'."""
    max_new_tokens: int = 16
    """Generation budget per answer ('generate'); for 'cot', the whole reasoning-and-answer budget."""
    model_dir: Path | None = None
    """Folder (or file) of the served weights, for the size on disk; None for an API model."""


@dataclass
class BuildCost:
    """What building a route cost: teacher calls, tokens and USD, wall seconds and training steps.

    Calls, tokens and USD are the build's whole cost, read from the run folder's durable cache through the
    teacher's usage meter: the same on every rerun however many times the build was interrupted (a kill -9 loses
    no paid call, and the calls an earlier invocation paid for are counted, not replayed for free). The `resumed_*`
    fields show separately the part an earlier, interrupted invocation paid for (0 for an uninterrupted build);
    `seconds` includes the wall time of those invocations (`resumed_seconds`, kept by the run folder's build clock)."""

    teacher_calls: int = 0
    teacher_input_tokens: int = 0
    teacher_output_tokens: int = 0
    teacher_cost_usd: float = 0.0
    seconds: float = 0.0
    training_steps: int = 0
    resumed_calls: int = 0
    resumed_tokens: int = 0
    resumed_cost_usd: float = 0.0
    resumed_seconds: float = 0.0

    @classmethod
    def from_meter(cls, summary: Mapping | None, *, seconds: float = 0.0, training_steps: int = 0) -> BuildCost:
        """The build cost from a teacher meter's `summary()`: the run's totals (earlier invocations included)."""
        s = summary or {}

        def run(key: str, cast):
            return cast(s.get(f"run_{key}", s.get(key, 0)) or 0)

        return cls(teacher_calls=run("calls", int), teacher_input_tokens=run("input_tokens", int),
                   teacher_output_tokens=run("output_tokens", int), teacher_cost_usd=run("cost_usd", float),
                   seconds=float(seconds), training_steps=int(training_steps),
                   resumed_calls=int(s.get("earlier_calls", 0) or 0), resumed_tokens=int(s.get("earlier_tokens", 0) or 0),
                   resumed_cost_usd=float(s.get("earlier_cost_usd", 0.0) or 0.0))


# ------------------------------------------------------------------------------------------------ 4. evaluate


def evaluate_deployment(sel: Selection, dep: Deployment, examples: Sequence[Example] | None = None) -> EvalResult:
    """Step 4 for every route: the one evaluator, on the shared test examples (or `examples`)."""
    return evaluate(sel.task, list(sel.test if examples is None else examples), dep.backend, shots=dep.shots,
                    system_prompt=dep.system_prompt, method=dep.method, max_new_tokens=dep.max_new_tokens,
                    cot_max_tokens=dep.max_new_tokens, description=dep.name)


# ------------------------------------------------------------------------------------------------ 5. record


def _labels(task: Task, res: EvalResult) -> list[str] | None:
    labels = res.metrics.get("labels")
    return list(labels) if labels else None


def served_size(dep: Deployment) -> dict:
    """Parameter count of the served model (when it is in memory) and its weights' size on disk."""
    from stillroom.models import parameter_count, size_on_disk

    inner = getattr(dep.backend, "backend", dep.backend)  # a cached backend wraps the real one
    hf_model = getattr(inner, "hf_model", None)
    params = parameter_count(hf_model) if hf_model is not None else None
    folder = dep.model_dir
    if folder is None and hf_model is not None:
        folder = getattr(getattr(hf_model, "config", None), "_name_or_path", None) or None
    return {"parameters": params, "size_on_disk_bytes": size_on_disk(folder)}


def quality_record(sel: Selection, res: EvalResult, *, seed: int = 0) -> dict:
    """Quality of one evaluated condition with 95% bootstrap intervals."""
    m = res.metrics
    gold = [p["gold"] for p in res.predictions]
    pred = [p["pred"] for p in res.predictions]
    if sel.task.kind == "multiple_choice":
        from stillroom.evaluate.runner import metric_labels

        by_id = {ex.id: ex for ex in sel.task.examples}
        gold = [metric_labels(sel.task, by_id[p["id"]], p["gold"]) for p in res.predictions]
        pred = [metric_labels(sel.task, by_id[p["id"]], p["pred"]) for p in res.predictions]
    ci = bootstrap_ci(gold, pred, _labels(sel.task, res) if m.get("macro_f1") is not None else None, seed=seed)
    return {
        "n": m["n"], "accuracy": m["accuracy"], "accuracy_ci95": ci["accuracy"], "macro_f1": m.get("macro_f1"),
        "macro_f1_ci95": ci["macro_f1"], "invalid_rate": m["invalid_rate"],
        "per_class_f1": {k: v["f1"] for k, v in (m.get("per_class") or {}).items()},
    }


def result_record(route: str, sel: Selection, dep: Deployment, res: EvalResult, cost: BuildCost, *,
                  artifacts: Mapping[str, str] | None = None, notes: Sequence[str] = (), extra: Mapping | None = None) -> dict:
    """The one result record every route writes (`result.json`)."""
    m = res.metrics
    sp_tokens = dep.backend.count_tokens(dep.system_prompt) if dep.system_prompt else 0
    return {
        "route": route,
        "condition": dep.name,
        "task": sel.task.name,
        "examples": [ex.id for ex in sel.test],
        "deployment": {"model": dep.model, "method": res.method, "shots": len(dep.shots),
                       "system_prompt_tokens": sp_tokens, **served_size(dep)},
        "quality": quality_record(sel, res, seed=sel.seed),
        "latency": {"p50_s": m.get("latency_p50_s"), "p95_s": m.get("latency_p95_s")},
        "tokens": {"input_per_answer": m.get("input_tokens_mean"), "output_per_answer": m.get("output_tokens_mean")},
        "build": asdict(cost),
        "artifacts": dict(artifacts or {}),
        "notes": list(notes),
        **({"extra": dict(extra)} if extra else {}),
    }


def record(run: RunFolder, sel: Selection, *, route: str, deployed: Deployment, results: Mapping[str, EvalResult],
           cost: BuildCost, config_dict: Mapping, title: str, metrics_extra: Mapping | None = None,
           notes: Sequence[str] = (), artifacts: Mapping[str, str] | None = None, usage: Mapping | None = None,
           resumed: bool = False, report_html: str | None = None) -> dict:
    """Step 5 for every route: predictions.jsonl (every condition), metrics.json, result.json (the deployed
    condition) and report.html. `results` holds every evaluated condition, the deployed one included.

    When `resumed` (nothing was rebuilt in this invocation), the build cost first recorded in this run folder
    is kept, so a rerun reports what building really cost, not the seconds of a cache replay."""
    from stillroom.report.html import eval_report

    previous = run.read_json(RESULT_FILE) or {}
    clock = stop_clock(run.path, recorded=True)
    if resumed and previous.get("build"):
        cost = BuildCost(**{k: previous["build"].get(k, v) for k, v in asdict(cost).items()})
    elif clock is not None and cost.seconds > 0:
        # Built here, perhaps resumed after interruptions: their wall time belongs to the build too.
        earlier = clock.unrecorded_earlier_seconds()
        cost = replace(cost, seconds=cost.seconds + earlier, resumed_seconds=earlier)
    run.write_jsonl("predictions.jsonl", [{"condition": n, **p} for n, r in results.items() for p in r.predictions])
    result = result_record(route, sel, deployed, results[deployed.name], cost, artifacts=artifacts, notes=notes)
    metrics = {
        "task": sel.task.name, "route": route, "examples": len(sel.test),
        **dict(metrics_extra or {}),
        "conditions": {n: {"method": r.method, **r.metrics} for n, r in results.items()},
        "build": asdict(cost), "notes": list(notes),
    }
    run.write_json("metrics.json", metrics)
    run.write_json(RESULT_FILE, result)
    html = report_html or eval_report(title, {n: r.metrics for n, r in results.items()}, config_dict, usage=usage,
                                      notes=list(notes))
    run.write_text("report.html", html)
    return metrics


def read_result(run_dir: str | Path) -> dict | None:
    """A run folder's `result.json`, or None when the route has not finished there."""
    import json

    p = Path(run_dir) / RESULT_FILE
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else None


@dataclass
class Timer:
    """Wall seconds of a build."""

    started: float = field(default_factory=time.perf_counter)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started
