"""bench/pld_vs_dspy: Prompt-Level Distillation against DSPy's instruction optimisers, same models, same data.

On one classification task, with the same teacher and student backends, PLD and DSPy's instruction optimisers
(MIPROv2 instruction-only: `max_bootstrapped_demos=0, max_labeled_demos=0`; GEPA) each build a prompt for the
student; the teacher is PLD's teacher and DSPy's prompt/reflection model, the student is PLD's student and
DSPy's task model. DSPy talks to the models through `stillroom.integrations.dspy_lm.StillroomLM`, so its calls
go through Stillroom's durable cache and are counted exactly like PLD's (`CachedBackend.calls`).

Every method is then scored on the SAME test examples with the SAME student (a test cache that starts empty,
one example per call, so latencies are those of real, unbatched calls):
- zero-shot and PLD through Stillroom's evaluator (`evaluate(task, test, student, system_prompt=...)`), PLD
  with its rulebook as the system prompt, answering by the evaluator's default for the student ('auto':
  log-likelihood over the labels on a local model; `--student-method generate` to generate instead), and with
  `--extra-generate` also by generation, the way DSPy's programs must answer;
- DSPy's programs (the unoptimised one too) by calling them on each example and mapping `answer` with
  `parse_choice`; a program that raises (DSPy could not parse the student's reply, even after its JSONAdapter
  retry) counts as an invalid answer.
Macro-F1 comes from `stillroom.evaluate.metrics.classification_metrics` for all of them (DSPy's own Evaluate
averages per-example scores, which is accuracy, not macro-F1).

Teacher budget: PLD runs first; its teacher-call count sets MIPROv2's `num_candidates` (by MIPROv2's own
per-candidate call count) unless given. Both counts are reported. GEPA's budget is in student metric calls
(`--gepa-metric-calls`); its teacher calls (one reflection per iteration) are reported as they come.

    .venv/bin/python bench/pld_vs_dspy.py --dry-run          # scripted models, seconds ('--dry-run broken':
                                                             # replies that break DSPy's format)
    .venv/bin/python bench/pld_vs_dspy.py --torch-threads 1 --extra-generate   # embedded Gemma-3 270M, CPU
                                                             # (~40 min on a busy 2-core machine)

Writes bench/results/pld_vs_dspy.json (the dry run writes bench/.work/pld_vs_dspy-dry/pld_vs_dspy.json) and
prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import re
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # `_common`, also when this file is loaded by path (tests)

from _common import machine_load  # noqa: E402  (bench/ is on sys.path when run as a script)
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from stillroom.backends.cache import CachedBackend, ResponseCache  # noqa: E402
from stillroom.backends.usage import UsageMeter  # noqa: E402
from stillroom.backends.usage import percentile as _pct  # noqa: E402
from stillroom.config import BackendConfig, PLDConfig, TaskConfig  # noqa: E402
from stillroom.evaluate.metrics import classification_metrics  # noqa: E402
from stillroom.evaluate.runner import evaluate, parse_choice  # noqa: E402
from stillroom.pld.cluster import hashing_embed  # noqa: E402
from stillroom.tasks.task import Example, Task, sample  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 130)
RESULT_KEYS = ("macro_f1", "accuracy", "invalid_rate", "output_tokens_p50", "latency_p50_s", "teacher_calls",
               "build_seconds")


# --------------------------------------------------------------------------------------------- backends
class Alias:
    """The same model object under a second name.

    `run_pld` merges teacher and student into one cached backend when they are the same object, which would
    count the student's validation calls as teacher calls. Teacher and student here are one loaded model (one
    copy in memory) behind two names, so each gets its own counter.
    """

    def __init__(self, backend):
        self._backend = backend

    def __getattr__(self, name):
        return getattr(self._backend, name)


def cached(backend, path: Path) -> CachedBackend:
    """`backend` behind the durable cache at `path`, with a fresh meter (counts this process's calls)."""
    return CachedBackend(backend, ResponseCache(path), UsageMeter())


# --------------------------------------------------------------------------------------------- dry run
def dry_backends(task: Task, broken: bool = False):
    """Scripted teacher and student that understand PLD's and DSPy's prompts (for a fast end-to-end check).

    The student answers correctly only when its prompt carries a rule or instruction mentioning 'sport'
    (which the scripted teacher writes); otherwise it always says the first label. DSPy-formatted prompts
    get DSPy-formatted replies, so every DSPy code path runs. `broken=True` mimics a small base model instead:
    replies that ignore DSPy's output format (the failure paths).
    """
    from stillroom.backends.scripted import ScriptedBackend
    from stillroom.pld.prompts import EXTRACT_SYSTEM, RESOLVE_SYSTEM, SYNTH_SYSTEM

    gold = {ex.input.strip(): ex.label for ex in task.examples}
    labels = list(task.labels or [])
    rule = "Judge sports statements by whether the athlete's action belongs to the athlete's sport."

    def dspy_reply(system: str, user: str, value_for) -> str:
        outs = system.split("Your output fields are:")[-1].split("All interactions")[0]
        fields = re.findall(r"(?m)^\d+\. `(\w+)`", outs)
        if "Respond with a JSON object" in user:  # DSPy's JSONAdapter (its fallback after a ChatAdapter failure)
            return json.dumps({f: value_for(f) for f in fields})
        return "".join(f"[[ ## {f} ## ]]\n{value_for(f)}\n\n" for f in fields) + "[[ ## completed ## ]]"

    def teacher(prompt, params):
        system = prompt[0]["content"] if isinstance(prompt, list) else ""
        user = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        if system == EXTRACT_SYSTEM:
            return json.dumps({"reasoning": "r", "instruction": rule})
        if system == SYNTH_SYSTEM:
            return json.dumps({"rule": rule})
        if system == RESOLVE_SYSTEM:
            return json.dumps({"analysis": "a", "rules": [rule, "Answer with the label only."]})
        if "Your output fields are:" in system:
            if broken:
                return "{answer}" if "JSON" in user else "1. plausible\n2. implausible\n3."
            return dspy_reply(system, user, lambda f: rule if "instruction" in f else f"A short {f.replace('_', ' ')}.")
        raise AssertionError(f"dry teacher: unexpected prompt {json.dumps(prompt)[:300]}")

    def student(prompt, params):
        system = prompt[0]["content"] if isinstance(prompt, list) else ""
        user = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        knows = "sport" in system.lower()
        m = re.search(r"\[\[ ## text ## \]\]\n(.*?)\n\n", user, flags=re.S)
        x = m.group(1).strip() if m else user.strip()
        x = x[len(task.input_prefix):] if x.startswith(task.input_prefix) else x
        answer = gold.get(x.strip(), labels[0]) if knows else labels[0]
        if "Your output fields are:" in system:
            if broken:
                return f" {answer}\n\nStatement: {x}" if "JSON" not in user else "{answer}"
            return dspy_reply(system, user, lambda f: answer)
        return answer

    return ScriptedBackend(teacher, "dry-teacher"), ScriptedBackend(student, "dry-student")


# --------------------------------------------------------------------------------------------- scoring
def summarise(records: list[dict], labels: list[str]) -> dict:
    gold = [r["gold"] for r in records]
    pred = [r["pred"] for r in records]
    q = classification_metrics(gold, pred, labels)
    return {
        "n": q["n"],
        "macro_f1": q["macro_f1"],
        "accuracy": q["accuracy"],
        "invalid_rate": q["invalid_rate"],
        "per_class_f1": {lab: v["f1"] for lab, v in q["per_class"].items()},
        "output_tokens_p50": float(_pct([r["output_tokens"] for r in records], 50)),
        "latency_p50_s": round(float(_pct([r["latency_s"] for r in records], 50)), 4),
    }


def eval_stillroom(task: Task, test: list[Example], student, system_prompt: str | None, method: str) -> dict:
    """Zero-shot / PLD on the test set through Stillroom's evaluator, one example per call (unbatched)."""
    res = evaluate(task, test, student, system_prompt=system_prompt or None, method=method, chunk_size=1,
                   description=f"test {'PLD' if system_prompt else 'zero-shot'}")
    recs = [{"gold": p["gold"], "pred": p["pred"], "output_tokens": p["output_tokens"], "latency_s": p["latency_s"]}
            for p in res.predictions]
    out = summarise(recs, list(task.labels))
    out["method"] = res.method
    if method == "loglik":
        out["note"] = "log-likelihood scoring over the labels: no generation, never invalid"
    return out


def dspy_program_on_test(program, test: list[Example], lm, backend: CachedBackend, task: Task,
                         name: str = "dspy") -> tuple[dict, list]:
    """Run a DSPy program on each test example; map `answer` with parse_choice; failures count as invalid."""
    import dspy

    from stillroom.integrations.dspy_lm import history_texts
    from stillroom.ui import progress_bar

    recs = []
    with dspy.context(lm=lm), progress_bar() as bar:
        job = bar.add_task(f"test {name}", total=len(test))
        for ex in test:
            h0, u0, calls0 = len(lm.history), len(lm.usage_log), backend.calls
            t0 = time.perf_counter()
            answer, error = None, None
            try:
                answer = program(text=dspy_input(ex)).answer
            except Exception as exc:  # DSPy raises when it cannot parse the student's reply
                error = type(exc).__name__
            wall = time.perf_counter() - t0
            used = lm.usage_log[u0:]
            raws = history_texts(lm, h0)
            opts = list(task.options(ex))
            recs.append({
                "id": ex.id, "gold": ex.label,
                "pred": parse_choice(str(answer), opts) if answer is not None else None,
                "raw_pred": parse_choice(raws[0], opts) if raws and raws[0] else None,
                "answer": answer, "raw": raws[0][:200] if raws and raws[0] else None, "error": error,
                "lm_calls": len(used), "real_calls": backend.calls - calls0,
                # Backend time and tokens of the student calls behind this answer (a cache hit carries the
                # original call's figures), the same measure Stillroom's evaluator reports; wall time apart.
                "output_tokens": sum(u["output_tokens"] for u in used),
                "latency_s": sum(u["latency_s"] for u in used), "wall_s": wall,
            })
            bar.advance(job)
    out = summarise(recs, list(task.labels))
    raw = classification_metrics([r["gold"] for r in recs], [r["raw_pred"] for r in recs], list(task.labels))
    out.update({
        "method": "dspy program (ChatAdapter, JSON fallback)",
        "program_errors": sum(r["error"] is not None for r in recs),
        "student_lm_calls_per_example_mean": float(np.mean([r["lm_calls"] for r in recs])) if recs else 0.0,
        # Wall time of program(...) where the student was really called (None when every answer was a replay).
        "wall_p50_s": (round(float(_pct(walls, 50)), 4) if (walls := [r["wall_s"] for r in recs if r["real_calls"]])
                       else None),
        # What the student's first reply says when read as leniently as Stillroom reads PLD's answers: separates
        # "the student got the format wrong" from "the student got the answer wrong".
        "lenient_raw_macro_f1": raw["macro_f1"],
        "lenient_raw_invalid_rate": raw["invalid_rate"],
    })
    return out, recs


# --------------------------------------------------------------------------------------------- DSPy
def dspy_input(ex: Example) -> str:
    return ex.input + ("\nOptions: " + "; ".join(ex.choices) if ex.choices else "")


def dspy_program(task: Task):
    import dspy

    labels = ", ".join(task.labels or [])

    class TaskSignature(dspy.Signature):
        text: str = dspy.InputField()
        answer: str = dspy.OutputField(desc=f"exactly one of: {labels}" if labels else "the answer")

    # The same instruction the zero-shot and PLD student sees (PLD adds its rulebook on top).
    return dspy.Predict(TaskSignature.with_instructions(task.instruction.strip() or task.name))


def dspy_examples(task: Task, exs: list[Example]):
    import dspy

    return [dspy.Example(text=dspy_input(e), answer=e.label).with_inputs("text") for e in exs]


def make_metrics(task: Task):
    import dspy

    def parsed(example, pred):
        opts = list(task.labels) if task.labels else [o.strip() for o in example.text.split("\nOptions: ")[-1].split(";")]
        ans = getattr(pred, "answer", None) if pred is not None else None
        return (parse_choice(str(ans), opts) if ans is not None else None), ans

    def metric(example, pred, trace=None):
        return float(parsed(example, pred)[0] == example.answer)

    def gepa_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        p, ans = parsed(gold, pred)
        ok = p == gold.answer
        fb = (f"Correct: the answer is {gold.answer}." if ok else
              f"Wrong: the correct answer is {gold.answer}; the model answered {ans!r}"
              + ("" if p is not None else " (not one of the allowed labels)") + ".")
        return dspy.Prediction(score=float(ok), feedback=fb)

    return metric, gepa_metric


def mipro_teacher_calls(n_candidates: int, n_train: int, view: int = 10, program_aware: bool = True) -> int:
    """MIPROv2's nominal prompt-model calls with one predictor: dataset summary + per-candidate proposals."""
    summary = 1 + max(0, min(9, math.ceil(n_train / view) - 1)) + 1
    return summary + n_candidates * (3 if program_aware else 1)


def run_mipro(args, task, train, val, teacher_lm, student_lm, t_backend, s_backend, n_candidates, n_trials):
    import dspy

    metric, _ = make_metrics(task)
    program = dspy_program(task)
    opt = dspy.MIPROv2(metric=metric, prompt_model=teacher_lm, task_model=student_lm, max_bootstrapped_demos=0,
                       max_labeled_demos=0, auto=None, num_candidates=n_candidates, num_threads=1,
                       max_errors=10**6, seed=args.seed, verbose=False)
    return _compile("dspy_miprov2", lambda: opt.compile(program, trainset=dspy_examples(task, train),
                                                        valset=dspy_examples(task, val), num_trials=n_trials,
                                                        minibatch=False),
                    student_lm, t_backend, s_backend,
                    {"num_candidates": n_candidates, "num_trials": n_trials, "instruction_only": True,
                     "minibatch": False, "nominal_teacher_calls": mipro_teacher_calls(n_candidates, len(train))},
                    resumed=args.resume)


def run_gepa(args, task, train, val, teacher_lm, student_lm, t_backend, s_backend, metric_calls):
    import dspy

    _, gepa_metric = make_metrics(task)
    program = dspy_program(task)
    # add_format_failure_as_feedback: a small student breaks DSPy's output format; without this GEPA leaves those
    # examples out of reflection and, when every reply breaks it, never calls the reflection model at all.
    opt = dspy.GEPA(metric=gepa_metric, reflection_lm=teacher_lm, max_metric_calls=metric_calls,
                    reflection_minibatch_size=3, num_threads=1, seed=args.seed, track_stats=True,
                    add_format_failure_as_feedback=True)
    return _compile("dspy_gepa", lambda: opt.compile(program, trainset=dspy_examples(task, train),
                                                     valset=dspy_examples(task, val)),
                    student_lm, t_backend, s_backend,
                    {"max_metric_calls": metric_calls, "reflection_minibatch_size": 3,
                     "add_format_failure_as_feedback": True},
                    resumed=args.resume)


def _requests(b: CachedBackend) -> tuple[int, int]:
    return b.calls, b.meter.cache_hits


def call_counts(t_real: int, t_hits: int, s_real: int, s_hits: int, resumed: bool) -> dict:
    """Model calls of a build. In a fresh run a cache hit is a repeated identical request (the model is not
    called, so it is not counted); after --resume, hits are mostly replays of the earlier invocation's real
    calls, so they are counted too (approximately: flagged in the notes)."""
    return {
        "teacher_calls": t_real + (t_hits if resumed else 0),
        "teacher_cache_hits": t_hits,
        "student_calls_build": s_real + (s_hits if resumed else 0),
        "student_cache_hits_build": s_hits,
        "resumed": resumed,
    }


def _compile(name, fn, student_lm, t_backend, s_backend, settings, resumed=False):
    import dspy

    console.rule(f"[bold]{name}: compile")
    (tc0, th0), (sc0, sh0) = _requests(t_backend), _requests(s_backend)
    t0 = time.perf_counter()
    status, error, program = "ok", None, None
    try:
        with dspy.context(lm=student_lm):
            program = fn()
    except Exception as exc:
        status, error = "failed", f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
        console.print(f"[red]{name} failed:[/red] {error}")
        traceback.print_exc()
    (tc1, th1), (sc1, sh1) = _requests(t_backend), _requests(s_backend)
    build = {
        "status": status,
        "error": error,
        **call_counts(tc1 - tc0, th1 - th0, sc1 - sc0, sh1 - sh0, resumed),
        "build_seconds": round(time.perf_counter() - t0, 1),
        "settings": settings,
    }
    if program is not None:
        build["prompt"] = program.predictors()[0].signature.instructions
        details = getattr(program, "detailed_results", None)  # GEPA with track_stats
        if details is not None:
            build["gepa"] = {"candidates": len(getattr(details, "candidates", []) or []),
                             "val_aggregate_scores": list(getattr(details, "val_aggregate_scores", []) or []),
                             "total_metric_calls": getattr(details, "total_metric_calls", None),
                             "num_full_val_evals": getattr(details, "num_full_val_evals", None)}
    return program, build


# --------------------------------------------------------------------------------------------- PLD
def run_pld_build(args, task, model_t, model_s, work: Path, embedder, val_examples):
    from stillroom.pld.pipeline import run_pld

    cfg = PLDConfig(
        task=TaskConfig(spec=args.task, seed=args.seed),
        teacher=BackendConfig(spec=args.teacher), student=BackendConfig(spec=args.student),
        train_limit=args.extract_sample, val_limit=args.val, eval_limit=args.test, max_rounds=args.max_rounds,
        teacher_max_tokens=args.teacher_max_tokens, student_method=args.student_method, shots=0, cot=False,
        embedder=args.embedder,
    )
    console.rule("[bold]PLD: build")
    t0 = time.perf_counter()
    m = run_pld(cfg, work / "pld", teacher=model_t, student=model_s, embedder=embedder, task=task)
    wall = time.perf_counter() - t0
    run = work / "pld"
    b = m["build"]
    # The route's build cost (run_route's BuildCost) counts the build's teacher calls from the run folder's
    # durable cache, earlier invocations included, so they are not added again on --resume; the cache hits are
    # in the run's usage.json (this invocation's meter).
    usage = json.loads((run / "usage.json").read_text()) if (run / "usage.json").exists() else {}
    res = {
        "status": "ok",
        "teacher_calls": b["teacher_calls"],
        "teacher_cache_hits": (usage.get("teacher") or {}).get("cache_hits"),
        "resumed": args.resume,
        "build_seconds": round(b["seconds"], 1),
        "pld_wall_seconds_incl_own_test_eval": round(wall, 1),
        "rules": m["rulebook"]["rules"],
        "system_prompt_tokens": m["rulebook"]["system_prompt_tokens"],
        "extraction": m["extraction"],
        "clustering": {k: m["clustering"].get(k) for k in ("clusters", "noise", "noise_share", "uncovered_labels", "sweep")},
        "conflict_rounds": [{k: r[k] for k in ("accepted", "val_macro_f1_before", "val_macro_f1_after", "note")}
                            for r in m["conflict_rounds"]],
        "pld_own_test": {n: {k: c.get(k) for k in ("method", "macro_f1", "accuracy", "invalid_rate")}
                         for n, c in m["conditions"].items()},
        "pld_notes": m["notes"],
        "prompt": (run / "system_prompt.txt").read_text().strip(),
        "settings": {"extract_sample": args.extract_sample, "val": args.val, "max_rounds": args.max_rounds,
                     "eps": cfg.eps, "min_samples": cfg.min_samples,
                     "embedder": args.embedder if embedder is None else "hashing (dry run)",
                     "student_method": args.student_method},
    }
    res.update(pld_student_requests(res, len(val_examples)))
    return res


def pld_student_requests(res: dict, n_val: int) -> dict:
    """The student's build requests in PLD: one per validation example per validation pass (the first
    rulebook, each candidate the resolver wrote, and each eps of a sweep). Counted from the run's record, since
    log-likelihood scoring bypasses the response cache and its meter (usage.json shows 0 student calls)."""
    passes = 1 + sum(r["val_macro_f1_after"] is not None for r in res["conflict_rounds"])
    sweep = res.get("clustering", {}).get("sweep") or []
    passes += len(sweep) if len(sweep) > 1 else 0
    return {"student_calls_build": passes * n_val, "student_cache_hits_build": None,
            "student_validation_passes": passes}


# --------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="bigbench:sports_understanding")
    ap.add_argument("--teacher", default="gemma3-270m")
    ap.add_argument("--student", default="gemma3-270m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extract-sample", type=int, default=24, help="PLD extraction examples = DSPy trainset")
    ap.add_argument("--val", type=int, default=20, help="validation examples (PLD conflict loop, DSPy valset)")
    ap.add_argument("--test", type=int, default=40)
    ap.add_argument("--max-rounds", type=int, default=1, help="PLD conflict-resolution rounds")
    ap.add_argument("--teacher-max-tokens", type=int, default=48, help="per teacher call, PLD and DSPy alike")
    ap.add_argument("--student-max-tokens", type=int, default=16,
                    help="per DSPy student call (its reply format needs ~10 tokens of field markers)")
    ap.add_argument("--student-method", default="auto", choices=["auto", "loglik", "generate"],
                    help="how the PLD / zero-shot student answers, in PLD's loop and on test (Stillroom's "
                         "evaluator; 'auto' = log-likelihood where the backend can score). DSPy can only generate.")
    ap.add_argument("--extra-generate", action="store_true",
                    help="also score zero-shot and PLD by generation (like DSPy) when the primary method is loglik")
    ap.add_argument("--engine", default="auto", choices=["auto", "transformers", "llamacpp"],
                    help="engine of the embedded models (BackendConfig.engine; 'auto': llama.cpp on a CPU machine "
                         "with xllamacpp, transformers otherwise)")
    ap.add_argument("--embedder", default="minilm")
    ap.add_argument("--methods", default="pld,miprov2,gepa",
                    help="comma list of pld, miprov2, gepa (zero-shot and the unoptimised DSPy program always run)")
    ap.add_argument("--mipro-candidates", default="auto",
                    help="MIPROv2 num_candidates; 'auto' matches PLD's teacher calls by MIPROv2's call count")
    ap.add_argument("--mipro-trials", default="auto", help="MIPROv2 num_trials; 'auto' uses MIPROv2's own rule")
    ap.add_argument("--gepa-metric-calls", type=int, default=40, help="GEPA max_metric_calls (student evaluations)")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (1 is fastest on a busy CPU)")
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--resume", action="store_true",
                    help="keep the work folder: finished phases are loaded, unfinished ones replay the durable cache")
    ap.add_argument("--dry-run", nargs="?", const="good", choices=["good", "broken"], default=None,
                    help="scripted teacher and student: checks the wiring in seconds ('broken': replies that ignore "
                         "DSPy's output format, like a small base model's)")
    ap.add_argument("--verbose", action="store_true")
    return ap.parse_args(argv)


class Phases:
    """Finished build phases on disk, so `--resume` neither repeats nor re-times them."""

    def __init__(self, work: Path):
        self.dir = work / "phases"
        self.dir.mkdir(parents=True, exist_ok=True)

    def load(self, name: str) -> dict | None:
        p = self.dir / f"{name}.json"
        return json.loads(p.read_text()) if p.exists() else None

    def save(self, name: str, result: dict, program=None) -> None:
        if program is not None:
            program.save(str(self.dir / f"{name}.program.json"))
        (self.dir / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))

    def program(self, name: str, task: Task):
        p = self.dir / f"{name}.program.json"
        if not p.exists():
            return None
        prog = dspy_program(task)
        prog.load(str(p))
        return prog


def main(argv=None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="Implementing custom LMs through BaseLM", category=DeprecationWarning)
    import dspy

    if not args.verbose:  # after importing dspy, which configures its own loggers
        for name in ("dspy", "dspy.teleprompt.gepa.gepa", "optuna", "gepa", "LiteLLM", "httpx"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)

    from stillroom.integrations.dspy_lm import StillroomLM
    from stillroom.tasks import load_task

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    work = args.work_dir or ROOT / "bench" / ".work" / ("pld_vs_dspy-dry" if args.dry_run else "pld_vs_dspy")
    out_path = args.out or (work / "pld_vs_dspy.json" if args.dry_run else ROOT / "bench" / "results" / "pld_vs_dspy.json")
    if not args.resume:
        # Fresh by default: the call counts below are then real model calls, not replays of an earlier run.
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    phases = Phases(work)
    started, load_start = time.perf_counter(), machine_load()
    # What a build depends on; --resume refuses a work folder built with other settings.
    build_settings = {k: getattr(args, k) for k in (
        "task", "teacher", "student", "seed", "extract_sample", "val", "test", "max_rounds", "teacher_max_tokens",
        "student_max_tokens", "student_method", "embedder", "engine", "mipro_candidates", "mipro_trials", "gepa_metric_calls",
        "dry_run")}
    settings_file = phases.dir / "settings.json"
    if settings_file.exists() and json.loads(settings_file.read_text()) != build_settings:
        raise SystemExit(f"--resume: {work} was built with other settings ({settings_file}); drop --resume")
    settings_file.write_text(json.dumps(build_settings, indent=2))
    command = "python bench/pld_vs_dspy.py " + " ".join(sys.argv[1:] if argv is None else argv)
    loaded: list[str] = []

    task = load_task(args.task)
    if task.kind != "classification" or not task.labels:
        raise SystemExit(f"{args.task}: this benchmark needs a classification task with a label set")
    splits = task.splits(seed=args.seed)
    # Exactly the samples run_pld draws, so DSPy trains and validates on the same examples PLD does.
    train = sample(splits.train, args.extract_sample, seed=args.seed)
    val = sample(splits.val, args.val, seed=args.seed)
    test = sample(splits.test, args.test, seed=args.seed)

    if args.dry_run:
        model_t, model_s = dry_backends(task, broken=args.dry_run == "broken")
        embedder = hashing_embed
        device = "none (scripted backends)"
    else:
        import torch

        from stillroom.backends import load_backend

        model = load_backend(BackendConfig(spec=args.teacher, engine=args.engine))
        model_t = model
        model_s = (Alias(model) if args.student == args.teacher
                   else load_backend(BackendConfig(spec=args.student, engine=args.engine)))
        embedder = None
        device = (f"{getattr(model, 'device', 'cpu')}; {os.cpu_count()} CPU cores ({platform.machine()}), "
                  f"torch {torch.__version__} with {torch.get_num_threads()} thread(s); shared machine")

    results: dict = {}
    notes: list[str] = []

    # 1. PLD.
    if "pld" in methods:
        results["pld"] = phases.load("pld")
        if results["pld"] is None:
            results["pld"] = {**run_pld_build(args, task, model_t, model_s, work, embedder, val), "built_by": command}
            phases.save("pld", results["pld"])
        else:
            loaded.append("pld")
        results["pld"].update(pld_student_requests(results["pld"], len(val)))
    pld_calls = results.get("pld", {}).get("teacher_calls")

    # 2. DSPy optimisers: teacher = prompt/reflection model, student = task model, each counted. Each optimiser
    # gets its own cache file (as PLD has its own), so none replays another's calls for free.
    programs = {}
    for name in ("miprov2", "gepa"):
        if name not in methods:
            continue
        key = f"dspy_{name}"
        saved = phases.load(key)
        if saved is not None:
            results[key], programs[key] = saved, phases.program(key, task)
            loaded.append(key)
            continue
        t_backend = cached(model_t, work / f"{key}_cache.sqlite")
        s_backend = cached(model_s, work / f"{key}_cache.sqlite")
        teacher_lm = StillroomLM(t_backend, max_tokens=args.teacher_max_tokens)
        student_lm = StillroomLM(s_backend, max_tokens=args.student_max_tokens)
        if name == "miprov2":
            if args.mipro_candidates == "auto":
                n = 2
                while mipro_teacher_calls(n + 1, len(train)) <= (pld_calls or 20):
                    n += 1
            else:
                n = int(args.mipro_candidates)
            trials = int(max(2 * math.log2(n), 1.5 * n)) if args.mipro_trials == "auto" else int(args.mipro_trials)
            prog, res = run_mipro(args, task, train, val, teacher_lm, student_lm, t_backend, s_backend, n, trials)
        else:
            prog, res = run_gepa(args, task, train, val, teacher_lm, student_lm, t_backend, s_backend,
                                 args.gepa_metric_calls)
        res["dspy_lm_requests"] = {"teacher": teacher_lm.requests, "student": student_lm.requests}
        res["built_by"] = command
        programs[key], results[key] = prog, res
        phases.save(key, res, prog)

    # 3. Test: the same examples, the same student, its own cache (latencies are those of real calls).
    console.rule("[bold]test")
    test_backend = cached(model_s, work / "test_cache.sqlite")
    method = args.student_method
    if method == "auto":
        method = "loglik" if test_backend.supports_score else "generate"
    results["zero_shot"] = {**eval_stillroom(task, test, test_backend, None, method), "teacher_calls": 0,
                            "build_seconds": 0.0, "status": "ok"}
    if "pld" in results:
        results["pld"].update(eval_stillroom(task, test, test_backend, results["pld"]["prompt"], method))
    test_lm = StillroomLM(test_backend, max_tokens=args.student_max_tokens)
    base_metrics, recs = dspy_program_on_test(dspy_program(task), test, test_lm, test_backend, task, "dspy_unoptimised")
    results["dspy_unoptimised"] = {**base_metrics, "teacher_calls": 0, "build_seconds": 0.0, "status": "ok",
                                   "prompt": dspy_program(task).predictors()[0].signature.instructions,
                                   "sample_replies": [r["raw"] for r in recs[:3]]}
    for key, prog in programs.items():
        if prog is not None:
            m, recs = dspy_program_on_test(prog, test, test_lm, test_backend, task, key)
            results[key].update(m)
            results[key]["sample_replies"] = [r["raw"] for r in recs[:3]]
        else:
            results[key].update({k: None for k in RESULT_KEYS if k not in results[key]})
    extras = {}
    if args.extra_generate and method != "generate":
        extras["zero_shot_generate"] = eval_stillroom(task, test, test_backend, None, "generate")
        if "pld" in results:
            extras["pld_generate"] = eval_stillroom(task, test, test_backend, results["pld"]["prompt"], "generate")

    # 4. Notes: facts read off the numbers.
    if "pld" in results and "dspy_miprov2" in results:
        r = results["dspy_miprov2"]
        notes.append(f"Teacher calls: PLD {results['pld']['teacher_calls']}, MIPROv2 {r['teacher_calls']}. MIPROv2's "
                     f"num_candidates={r['settings']['num_candidates']} is the largest whose nominal call count "
                     f"({r['settings']['nominal_teacher_calls']}: dataset summary + 3 calls per candidate) does not "
                     "exceed PLD's; DSPy's JSONAdapter retry after each unparseable reply adds calls beyond it.")
    if "dspy_gepa" in results:
        r = results["dspy_gepa"]
        notes.append(f"GEPA's budget is student metric calls (max_metric_calls={r['settings']['max_metric_calls']}); "
                     f"it made {r['teacher_calls']} teacher (reflection) calls"
                     + (f", plus {r['teacher_cache_hits']} identical repeated requests answered by the cache"
                        if r.get("teacher_cache_hits") and not r.get("resumed") else "") + ".")
    for key in ("dspy_miprov2", "dspy_gepa"):
        r = results.get(key)
        if r and r["status"] != "ok":
            notes.append(f"{key} did not finish compiling ({(r['error'] or '')[:160]}) after {r['teacher_calls']} "
                         "teacher calls; it has no optimised program to test (dspy_unoptimised is what a DSPy user keeps).")
        elif r and r.get("prompt") == results["dspy_unoptimised"]["prompt"]:
            explored = (r.get("gepa") or {}).get("candidates")
            notes.append(f"{key} kept the original instruction" + (
                " (GEPA accepted no candidate beyond its seed program)."
                if explored == 1 else " (no proposed instruction scored higher on validation)."))
    for key, r in results.items():
        if key.startswith("dspy") and r.get("program_errors"):
            notes.append(f"{key}: DSPy could not parse the student's reply on {r['program_errors']} of {r['n']} test "
                         f"examples (ChatAdapter, then its JSONAdapter retry: {r['student_lm_calls_per_example_mean']:.2f} "
                         f"student calls per example); read leniently with parse_choice, the first replies give "
                         f"macro-F1 {r['lenient_raw_macro_f1']:.3f} (invalid {r['lenient_raw_invalid_rate']:.3f}).")
    if "pld" in results and not results["pld"]["rules"]:
        notes.append("PLD ended with an empty rulebook (see pld.pld_notes), so on test it is the zero-shot prompt.")
    if method == "loglik":
        notes.append("Zero-shot and PLD answer as Stillroom's evaluator does by default on a local student: by "
                     "log-likelihood over the labels (never invalid, no output tokens). DSPy programs must generate "
                     "and parse" + ("; extras.*_generate score zero-shot and PLD by generation too." if extras else "."))
    notes.append("Latency: per test example, one example per call; the student's backend time for all calls behind "
                 "one answer (DSPy: the ChatAdapter call plus the JSONAdapter retry when the reply does not parse). "
                 "Build seconds are wall time; PLD's pipeline batches its teacher and validation calls, DSPy sends "
                 "them one at a time.")
    if any(r.get("resumed") for r in results.values() if isinstance(r, dict)):
        notes.append("Some build phases were resumed (--resume): their cache hits are counted as calls, and their "
                     "seconds cover only the last invocation.")
    if loaded:
        notes.append(f"Build phases {', '.join(loaded)} were loaded from an earlier invocation in the same work "
                     "folder with the same settings (their calls and seconds are that invocation's); this one re-ran "
                     "the test phase, replaying the test cache's recorded answers and latencies.")
    if not args.dry_run:
        notes.append("Shared 2-core CPU machine: other jobs ran at the same time, so seconds are indicative only.")

    payload = {
        "benchmark": "pld_vs_dspy",
        "task": task.name,
        "task_spec": args.task,
        "labels": list(task.labels),
        "examples": {"train": len(train), "val": len(val), "test": len(test)},
        "teacher": args.teacher if args.dry_run else f"{args.teacher} ({_identity(model_t)})",
        "student": args.student if args.dry_run else f"{args.student} ({_identity(model_s)})",
        "device": device,
        "engine": None if args.dry_run else {"requested": args.engine,
                                             "resolved": type(getattr(model_t, "_backend", model_t)).__name__},
        "dry_run": args.dry_run or False,
        "seed": args.seed,
        "command": command,
        "dspy_version": dspy.__version__,
        "budgets": {"teacher_max_tokens": args.teacher_max_tokens, "student_max_tokens_dspy": args.student_max_tokens,
                    "student_max_tokens_stillroom_generate": 16, "student_method": method},
        **results,
        "extras": extras,
        "total_seconds": round(time.perf_counter() - started, 1),
        "load": {"start": load_start, "end": machine_load()},
        "notes": notes,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n")
    print_table(payload)
    console.print(f"wrote {out_path}")
    return payload


def _identity(backend) -> str:
    return str(getattr(backend, "identity", "")).replace(str(Path.home()), "~")


def print_table(payload: dict) -> None:
    t = Table(title=f"PLD vs DSPy on {payload['task']} (test n={payload['examples']['test']}; "
                    f"teacher {payload['teacher']}, student {payload['student']})")
    for col in ("method", "macro-F1", "acc", "invalid", "out tok p50", "latency p50 s", "teacher calls", "build s"):
        t.add_column(col, justify="left" if col == "method" else "right")

    def f(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)

    for k in ("zero_shot", "pld", "dspy_unoptimised", "dspy_miprov2", "dspy_gepa"):
        if k not in payload:
            continue
        r = payload[k]
        name = k + ("" if r.get("status", "ok") == "ok" else f" ({r['status']})")
        t.add_row(name, f(r.get("macro_f1")), f(r.get("accuracy")), f(r.get("invalid_rate")),
                  f(r.get("output_tokens_p50"), "{:.0f}"), f(r.get("latency_p50_s"), "{:.2f}"),
                  str(r.get("teacher_calls", "-")), f(r.get("build_seconds"), "{:.0f}"))
    for k, r in payload.get("extras", {}).items():
        t.add_row(k, f(r.get("macro_f1")), f(r.get("accuracy")), f(r.get("invalid_rate")),
                  f(r.get("output_tokens_p50"), "{:.0f}"), f(r.get("latency_p50_s"), "{:.2f}"), "-", "-")
    console.print(t)


if __name__ == "__main__":
    main()
