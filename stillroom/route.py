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
import contextlib
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

    return load_task(task_cfg.spec, **task_cfg.load_options())


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


@contextlib.contextmanager
def clock_stopped_after(folder: str | Path):
    """Stop the folder's build clock when the block ends, however it ends (an error or Ctrl-C writes the
    invocation's exact time; after `record` it is already stopped)."""
    try:
        yield
    finally:
        stop_clock(folder)


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
    """The backend that answers (a cached backend, or an in-memory `HFBackend` of a trained model); None with
    `load`."""
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
    load: Any = None
    """Instead of `backend`: a function that returns it, called only when this condition is evaluated and
    dropped after (a baseline model is then never in memory next to the trained one)."""


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


def evaluate_deployment(sel: Selection, dep: Deployment, examples: Sequence[Example] | None = None, *,
                        timed: bool = True) -> EvalResult:
    """Step 4 for every route: the one evaluator, on the shared test examples (or `examples`). `timed`: latency
    measured (`stillroom.evaluate.latency`); off for model selection, where only quality counts."""
    if dep.backend is None and dep.load is not None:
        dep.backend = dep.load()
    return evaluate(sel.task, list(sel.test if examples is None else examples), dep.backend, shots=dep.shots,
                    system_prompt=dep.system_prompt, method=dep.method, max_new_tokens=dep.max_new_tokens,
                    cot_max_tokens=dep.max_new_tokens, description=dep.name, timed=timed)


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
    if m.get("gold_labels") is False:  # free text with no gold answers: nothing to measure quality against
        return {"n": m["n"], "accuracy": None, "accuracy_ci95": None, "macro_f1": None, "macro_f1_ci95": None,
                "invalid_rate": m["invalid_rate"], "per_class_f1": {}, "gold_labels": False}
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
                       "instruction": sel.task.instruction,
                       "system_prompt_tokens": sp_tokens, **served_size(dep)},
        "quality": quality_record(sel, res, seed=sel.seed),
        "latency": {"p50_s": m.get("latency_p50_s"), "p95_s": m.get("latency_p95_s"), "method": m.get("latency_method")},
        "tokens": {"input_per_answer": m.get("input_tokens_mean"), "output_per_answer": m.get("output_tokens_mean")},
        "build": asdict(cost),
        "artifacts": dict(artifacts or {}),
        "notes": list(notes),
        **({"extra": dict(extra)} if extra else {}),
    }


def record(run: RunFolder, sel: Selection, *, route: str, deployed: Deployment, results: Mapping[str, EvalResult],
           cost: BuildCost, config_dict: Mapping, title: str, metrics_extra: Mapping | None = None,
           notes: Sequence[str] = (), artifacts: Mapping[str, str] | None = None, usage: Mapping | None = None,
           resumed: bool = False, report_html: Any = None, deployments: Mapping[str, Deployment] | None = None) -> dict:
    """Step 5 for every route: predictions.jsonl (every condition), metrics.json, result.json (the deployed
    condition) and report.html. `results` holds every evaluated condition, the deployed one included.

    When `resumed` (nothing was rebuilt in this invocation), the build cost first recorded in this run folder
    is kept, so a rerun reports what building really cost, not the seconds of a cache replay. `report_html` is
    the page, or a function of the metrics that writes it (a route's own report)."""
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
    warnings = {n: w for n, r in results.items() if (w := doubtful_result(sel.task, r, n))}
    notes = list(dict.fromkeys([*warnings.values(), *notes]))
    result = result_record(route, sel, deployed, results[deployed.name], cost, artifacts=artifacts, notes=notes)
    result["warnings"] = [warnings[deployed.name]] if deployed.name in warnings else []
    metrics = {
        "task": sel.task.name, "route": route, "examples": len(sel.test),
        **dict(metrics_extra or {}),
        "conditions": {n: {"method": r.method, **r.metrics, **_prompt_tokens((deployments or {}).get(n))}
                       for n, r in results.items()},
        "build": asdict(cost), "notes": list(notes),
    }
    run.write_json("metrics.json", metrics)
    run.write_json(RESULT_FILE, result)
    if callable(report_html):
        report_html = report_html(metrics)
    html = report_html or eval_report(title, {n: r.metrics for n, r in results.items()}, config_dict, usage=usage,
                                      notes=list(notes))
    run.write_text("report.html", html)
    return metrics


def _prompt_tokens(dep: Deployment | None) -> dict:
    if dep is None or dep.backend is None:
        return {}
    return {"system_prompt_tokens": dep.backend.count_tokens(dep.system_prompt) if dep.system_prompt else 0}


def doubtful_result(task: Task, res: EvalResult, name: str) -> str | None:
    """A warning when an evaluated condition's answers are (nearly) one class (`one_class_warning`); options
    that differ per example are compared by position (A, B, ...)."""
    from stillroom.evaluate.metrics import one_class_warning
    from stillroom.evaluate.runner import metric_labels

    if task.kind == "free_text":
        return None
    by_id = {ex.id: ex for ex in task.examples}
    gold = [metric_labels(task, by_id[p["id"]], p["gold"]) if p["id"] in by_id else p["gold"] for p in res.predictions]
    pred = [metric_labels(task, by_id[p["id"]], p["pred"]) if p["id"] in by_id else p["pred"] for p in res.predictions]
    return one_class_warning(gold, pred, name=name)


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


# ------------------------------------------------------------------------------------------------ the sequence


@dataclass
class RouteContext:
    """What `build` gets from `run_route`: the config, the selection, the held run folder, and the helpers every
    route shares (its training pool, the teacher through the run's cache, the resume check)."""

    cfg: Any
    sel: Selection
    run: RunFolder
    prepared: Any = None
    """What the route's `prepare` returned (resolved model paths, loaded backends), before the folder existed."""
    notes: list[str] = field(default_factory=list)
    teacher: Any = None
    """The cached teacher, once `open_teacher` was called: its meter is the build's teacher cost."""
    rebuilt: bool = False
    """Whether a stage was (re)built in this invocation rather than found finished (see `finished`)."""

    @property
    def task(self) -> Task:
        return self.sel.task

    def shots(self, k: int) -> list[Example]:
        """k solved training examples (the same k everywhere in the route: `Selection.shots`)."""
        return self.sel.shots(k)

    def train_pool(self, *shot_lists: Sequence[Example], labelled: bool = False) -> list[Example]:
        """The selected training examples, without the ones shown as shots (and, with `labelled`, without the
        unlabelled ones)."""
        used = {ex.id for shots in shot_lists for ex in shots}
        return [e for e in self.sel.train if e.id not in used and (not labelled or e.label is not None)]

    def open_teacher(self, backend_cfg, backend=None, *, capped: bool = True):
        """The teacher wrapped in the run's durable cache (every call paid once), with the config's spend cap."""
        from stillroom.backends import open_cached_backend

        spend = getattr(self.cfg, "spend", None) if capped else None
        self.teacher = open_cached_backend(backend_cfg, self.run.cache_path, spend, backend=backend)
        return self.teacher

    def evaluate(self, dep: Deployment, examples: Sequence[Example]) -> EvalResult:
        """The one evaluator on examples of the build's own choosing (model selection on the validation split);
        the deployments `build` returns are evaluated by `run_route`, not here."""
        return evaluate_deployment(self.sel, dep, examples, timed=False)

    def digest(self, leave_out: Sequence[str] = ("evaluation",)) -> str:
        """The identity digest of what this route builds (`stillroom.runs.digest_of`, evaluation fields left out)."""
        from stillroom.runs import digest_of

        return digest_of(self.cfg, leave_out)

    def finished(self, info: Mapping | None, *folders: str, leave_out: Sequence[str] = ("evaluation",),
                 key: str = "config_digest") -> bool:
        """The one resume check: a stage is finished when each of its model `folders` in the run folder is
        complete and `info[key]` (what the stage recorded) equals the digest of the settings that shape it. A
        stage found unfinished marks this invocation as rebuilding."""
        from stillroom.backends.embedded import is_converted

        done = (info or {}).get(key) == self.digest(leave_out) and all(is_converted(self.run.file(f)) for f in folders)
        if not done:
            self.rebuilt = True
        return done


@dataclass
class Built:
    """What a route's `build` returns: what to deploy (the deployed condition last, baselines before it, each
    evaluated by `run_route` with the one evaluator) and what the build was."""

    deployments: list[Deployment]
    steps: int = 0
    """Training steps of the build (as recorded by the stage, also when it was reused)."""
    cost: BuildCost | None = None
    """Set when the cost is not the teacher meter's (e.g. teacher tokens of a logit cache)."""
    extra: dict = field(default_factory=dict)
    """Route-specific entries of metrics.json."""
    artifacts: dict = field(default_factory=dict)
    usage: Any = None
    """A function giving usage.json's content, written after evaluation (also when it fails)."""
    report: Any = None
    """The route's own report.html: a function of the metrics (default: the shared evaluation report)."""
    after_eval: Any = None
    """A function of the evaluated results returning notes about them."""
    deployed: str | None = None
    """The condition recorded in result.json (default: the last deployment)."""


@dataclass
class RouteResult:
    """What `run_route` returns: metrics.json's content, every evaluated condition, and the run folder."""

    metrics: dict
    results: dict[str, EvalResult]
    run: RunFolder


def select_for(cfg, *, task: Task | None = None, need_labels: bool = False) -> Selection:
    """`select` with a config's selection block (`stillroom.config.SelectionBlock`)."""
    return select(cfg.task, split=cfg.eval_split, limit=cfg.eval_limit, train_limit=getattr(cfg, "train_limit", None),
                  val_limit=getattr(cfg, "val_limit", None), task=task, need_labels=need_labels)


def run_route(cfg, run_dir: str | Path, build, *, route: str, title, prepare=None, task: Task | None = None,
              need_labels: bool = False, wait: bool | None = None) -> RouteResult:
    """Every route's sequence: select → check (`prepare`, before any folder exists) → hold and open the run
    folder → `build(ctx)` (the route's own step, resumable through `ctx.finished` and the durable cache) →
    evaluate each returned `Deployment` with the one evaluator → build cost → record.

    `prepare(cfg, sel)` does what can fail on the config or the data (model paths, prompts' fit) and may narrow
    the selection; its result is `ctx.prepared`. `wait` queues behind a process that holds the folder. A rerun
    with nothing changed rebuilds nothing: the build cost first recorded is kept (`record(resumed=True)`)."""
    from stillroom.locking import run_folder_lock

    sel = select_for(cfg, task=task, need_labels=need_labels)
    prepared = prepare(cfg, sel) if prepare is not None else None
    with run_folder_lock(run_dir, wait=wait), clock_stopped_after(run_dir):
        run, config_dict = open_run(cfg, run_dir)
        ctx = RouteContext(cfg=cfg, sel=sel, run=run, prepared=prepared)
        timer = Timer()
        built = build(ctx)
        if built is None:  # another rank of a multi-process launch: the main process evaluates and records
            return RouteResult({}, {}, run)
        seconds = timer.seconds
        results = evaluate_all(sel, built, run)
        notes = ctx.notes + (list(built.after_eval(results)) if built.after_eval else [])
        deployed = next(d for d in built.deployments if d.name == (built.deployed or built.deployments[-1].name))
        cost = built.cost or BuildCost.from_meter(ctx.teacher.meter.summary() if ctx.teacher else None)
        cost.seconds, cost.training_steps = cost.seconds or seconds, cost.training_steps or built.steps
        resumed = not ctx.rebuilt and (ctx.teacher is None or ctx.teacher.meter.calls == 0)
        usage = built.usage() if built.usage else None
        metrics = record(run, sel, route=route, deployed=deployed, results=results, cost=cost, config_dict=config_dict,
                         title=title(ctx) if callable(title) else title, metrics_extra=built.extra, notes=notes, artifacts=built.artifacts,
                         usage=usage,
                         resumed=resumed, report_html=built.report,
                         deployments={d.name: d for d in built.deployments})
    return RouteResult(metrics, results, run)


def evaluate_all(sel: Selection, built: Built, run: RunFolder) -> dict[str, EvalResult]:
    """Step 4: each deployment on the shared examples, in order; a lazily loaded baseline is freed after its
    evaluation. usage.json is written even when a spend cap or Ctrl-C stops the evaluation."""
    results: dict[str, EvalResult] = {}
    last = built.deployed or built.deployments[-1].name
    try:
        for dep in built.deployments:
            lazy = dep.backend is None
            results[dep.name] = evaluate_deployment(sel, dep)
            if lazy and dep.name != last:
                dep.backend = None
                from stillroom.models import release_memory

                release_memory()
    finally:
        if built.usage:
            run.write_json("usage.json", built.usage())
    return results


def evaluate_model_folder(folder: str | Path, sel: Selection, *, route: str, config: Mapping,
                          cost: BuildCost | None = None) -> dict:
    """Steps 3-5 for a model a compression command made outside a route (a merge, a healed model): deploy the
    folder, evaluate it on `sel`'s test examples (`select`, taken before the model was built so a bad task fails
    first), and record result.json, predictions, metrics and the report in the folder."""
    from stillroom.backends.hf import HFBackend

    folder = Path(folder)
    dep = Deployment(name=route, backend=HFBackend(str(folder)), model=str(folder), model_dir=folder)
    results = {route: evaluate_deployment(sel, dep)}
    return record(RunFolder(folder), sel, route=route, deployed=dep, results=results, cost=cost or BuildCost(),
                  config_dict=config, title=f"Stillroom {route}: {sel.task.name}")
