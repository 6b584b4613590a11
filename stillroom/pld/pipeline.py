"""`stillroom pld`: the four phases into one run folder, then the comparison on the test split.

Resuming is replaying: every teacher and student completion lives in the run's durable cache, every step is
deterministic given those completions (seeded samples, deterministic embeddings and DBSCAN), so rerunning the
same command after a crash, a kill or a spend-cap stop makes no repeated teacher call and rebuilds the same
rulebook, then carries on where the run stopped.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from rich.console import Console

from stillroom.backends import load_backend, open_cached_backend
from stillroom.backends.base import GenerationParams
from stillroom.config import PLDConfig
from stillroom.evaluate.runner import EvalResult, evaluate
from stillroom.locking import run_folder_lock
from stillroom.pld.cluster import Embedder, cluster_instructions, coverage_report, load_embedder
from stillroom.pld.extract import extract_instructions
from stillroom.pld.prompts import TEACHER_STOPS
from stillroom.pld.resolve import Resolution, resolve_conflicts
from stillroom.pld.rulebook import Rulebook
from stillroom.pld.synthesize import synthesize_rules
from stillroom.route import BuildCost, Deployment, evaluate_deployment, open_run, record, select
from stillroom.runs import RunFolder
from stillroom.tasks.task import Task

console = Console()


def open_backends(cfg: PLDConfig, run: RunFolder, teacher=None, student=None):
    """Teacher and student, each wrapped in the run's durable cache. One model object when both specs match,
    so the embedded demo loads Gemma once. The spend cap applies to the teacher."""
    if teacher is None:
        teacher = load_backend(cfg.teacher)
    if student is None:
        student = teacher if cfg.student == cfg.teacher else load_backend(cfg.student)
    # Separate wrappers even when one model plays both parts: the teacher's meter (build cost, spend cap)
    # must count only teacher calls.
    t = open_cached_backend(cfg.teacher, run.cache_path, cfg.spend, backend=teacher)
    s = open_cached_backend(cfg.student, run.cache_path, None, backend=student)
    return t, s


def run_pld(cfg: PLDConfig, run_dir: Path, *, teacher=None, student=None, embedder: Embedder | None = None,
            task: Task | None = None, wait: bool | None = None) -> dict:
    """Run PLD end to end; returns the metrics written to metrics.json.

    Task, model specs and every example's fit are checked before the run folder is created; the folder is
    held (`stillroom.locking`) while it is written; `wait` queues behind a process that holds it.
    """
    sel = select(cfg.task, limit=cfg.test_limit, train_limit=cfg.extract_sample, val_limit=cfg.val_limit, task=task,
                 need_labels=True)
    teacher = teacher or load_backend(cfg.teacher)
    student = student or (teacher if cfg.student == cfg.teacher else load_backend(cfg.student))
    overlong = fit_pld_examples(cfg, sel, teacher, student)
    with run_folder_lock(run_dir, wait=wait):
        return _run_pld(cfg, run_dir, teacher, student, embedder, sel, overlong)


def fit_pld_examples(cfg: PLDConfig, sel, teacher, student) -> dict:
    """Apply the task's overlong policy to the selection in place (extraction prompts checked against the
    teacher; zero-shot, k-shot and chain-of-thought prompts against the student) and return the counts.
    Makes no call."""
    from stillroom.pld.prompts import extraction_messages
    from stillroom.tasks.fit import fit_examples
    from stillroom.tasks.prompts import render_chat

    task, shots = sel.task, sel.shots(cfg.shots)
    counts = {"overlong": 0, "truncated": 0, "skipped": 0}

    def student_prompts(ex):
        out = [(render_chat(task, ex, s, None), 16) for s in ([], shots)]  # evaluate()'s answer budget
        if cfg.cot:
            out.append((render_chat(task, ex, [], None, reason=True), cfg.cot_max_tokens))
        return out

    for name, backend, prompts_of in (
        ("train", teacher, lambda ex: [(extraction_messages(task, ex, strict=True), cfg.teacher_max_tokens)]),
        ("val", student, student_prompts),
        ("test", student, student_prompts),
    ):
        kept, c = fit_examples(task, getattr(sel, name), backend, prompts_of, policy=cfg.task.overlong, what=name)
        setattr(sel, name, kept)
        counts = {k: counts[k] + c[k] for k in counts}
    return {"policy": cfg.task.overlong, **counts}


def _run_pld(cfg: PLDConfig, run_dir: Path, teacher, student, embedder, sel, overlong: dict) -> dict:
    started = time.perf_counter()
    task, train, val, test = sel.task, sel.train, sel.val, sel.test
    run, config_dict = open_run(cfg, run_dir)
    teacher_b, student_b = open_backends(cfg, run, teacher, student)
    tparams = GenerationParams(max_tokens=cfg.teacher_max_tokens, temperature=0.0, stop=TEACHER_STOPS)
    notes: list[str] = []
    try:
        # Phase 1: extraction.
        instructions = extract_instructions(task, train, teacher_b, tparams)
        run.write_jsonl("extractions.jsonl", [asdict(i) for i in instructions])
        ok = [i for i in instructions if i.ok]
        failed = len(instructions) - len(ok)
        if failed:
            notes.append(f"Extraction: {failed} of {len(instructions)} teacher replies were unreadable after one retry "
                         "and were recorded as failed (see extractions.jsonl).")
        # Phase 2: clustering and synthesis.
        embed = embedder or load_embedder(cfg.embedder, base_url=cfg.teacher.base_url, api_key_env=cfg.teacher.api_key_env)
        emb = embed([i.text for i in ok]) if ok else np.zeros((0, 1))
        label_set = list(task.labels) if task.labels else sorted({str(e.label) for e in train})

        def student_eval(rb: Rulebook | None, examples, name: str) -> EvalResult:
            return evaluate(task, examples, student_b, system_prompt=rb.system_prompt() if rb else None,
                            method=cfg.student_method, description=name)

        sweep = cfg.eps_sweep or [cfg.eps]
        candidates = []
        for eps in sweep:
            clustering = cluster_instructions(emb, eps, cfg.min_samples)
            rb = synthesize_rules(task, ok, emb, clustering, teacher_b, tparams)
            score = None
            if len(sweep) > 1:
                score = student_eval(rb, val, f"val eps={eps}").metrics["macro_f1"]
            candidates.append((eps, clustering, rb, score))
        eps, clustering, rulebook, _ = max(candidates, key=lambda c: (c[3] or 0.0, -abs(c[0] - cfg.eps)))
        coverage = coverage_report([i.label for i in ok], clustering, label_set)
        coverage["sweep"] = [{"eps": c[0], "clusters": len(c[1].clusters), "noise_share": c[1].noise_share, "val_macro_f1": c[3]} for c in candidates]
        run.write_json("clusters.json", {**coverage, "assignments": [
            {"example_id": i.example_id, "label": i.label, "cluster": a, "instruction": i.text}
            for i, a in zip(ok, clustering.assignments, strict=True)]})
        if not clustering.clusters:
            notes.append(f"Clustering: every instruction was noise at eps={eps}, min_samples={cfg.min_samples}; no "
                         "rule was synthesised. The conflict loop starts from an empty rulebook. Try a larger eps, "
                         "a smaller min_samples or eps_sweep.")
        if coverage["uncovered_labels"]:
            notes.append("Coverage: no rule speaks for label(s) " + ", ".join(map(str, coverage["uncovered_labels"]))
                         + " (a known weakness of clustering: minority labels can vanish).")
        if rulebook.meta.get("synthesis_fallbacks"):
            notes.append(f"Synthesis: {rulebook.meta['synthesis_fallbacks']} cluster(s) got an unreadable rule twice; "
                         "their medoid instruction stands in (origin 'medoid').")

        # Phase 3: conflict resolution, every version kept.
        def keep(rb: Rulebook, val_res: EvalResult | None) -> None:
            run.write_text(f"rulebook_v{rb.version}.json", rb.to_json())

        resolution: Resolution = resolve_conflicts(
            task, rulebook, teacher_b, lambda rb: student_eval(rb, val, f"val v{rb.version}"), tparams,
            max_rounds=cfg.max_rounds, patience=cfg.patience, max_failures=cfg.failures_per_round,
            max_successes=cfg.successes_per_round, seed=cfg.task.seed, on_version=keep,
        )
        final = resolution.best
        final.meta.update({"val_macro_f1": resolution.best_val.metrics["macro_f1"] if resolution.best_val else None})
        # Phase 4: the deployable artefacts.
        run.write_text("rulebook.json", final.to_json())
        run.write_text("rulebook.md", final.to_markdown())
        run.write_text("system_prompt.txt", final.system_prompt() + "\n")
        build_s = time.perf_counter() - started
        build_cost = teacher_b.meter.summary()

        ablation = []
        if cfg.ablation and final.rules:
            base = resolution.best_val.metrics["macro_f1"]
            for k, r in enumerate(final.rules):
                rb = Rulebook(task=final.task, rules=[x for j, x in enumerate(final.rules) if j != k], version=final.version)
                f1 = student_eval(rb, val, f"ablate {r.id}").metrics["macro_f1"]
                ablation.append({"rule": r.id, "text": r.text, "val_macro_f1_without": f1, "effect": base - f1})

        # The comparison on the test split: same student, same examples.
        conditions: dict[str, EvalResult] = {}
        if cfg.compare_baselines:
            conditions["zero-shot"] = student_eval(None, test, "test zero-shot")
            if cfg.shots:
                conditions[f"{cfg.shots}-shot"] = evaluate(task, test, student_b, shots=sel.shots(cfg.shots),
                                                           method=cfg.student_method, description=f"test {cfg.shots}-shot")
            if cfg.cot:
                conditions["chain-of-thought"] = evaluate(task, test, student_b, method="cot",
                                                          cot_max_tokens=cfg.cot_max_tokens, description="test CoT")
        deployed = Deployment(name="PLD", backend=student_b, model=cfg.student.spec, system_prompt=final.system_prompt(),
                              method=cfg.student_method)
        conditions["PLD"] = evaluate_deployment(sel, deployed)
        for name, r in conditions.items():
            if r.metrics.get("invalid_rate") == 1.0:
                notes.append(f"{name}: the student never produced a valid label ({r.metrics['n']} answers, all invalid).")
    finally:
        run.write_json("usage.json", {"teacher": teacher_b.meter.summary(), "student": student_b.meter.summary()})

    sp_tokens = student_b.count_tokens(final.system_prompt()) if final.rules else 0
    metrics = {
        "task": task.name,
        "teacher": teacher_b.identity,
        "student": student_b.identity,
        "examples": {"train_extracted": len(train), "val": len(val), "test": len(test)},
        "overlong": overlong,
        "extraction": {"instructions": len(instructions), "readable": len(ok), "failed": failed},
        "clustering": {k: v for k, v in coverage.items() if k != "per_cluster"},
        "conflict_rounds": [asdict(r) for r in resolution.rounds],
        "rulebook": {"version": final.version, "rules": len(final.rules), "system_prompt_tokens": sp_tokens},
        "build": {"seconds": build_s, **{f"teacher_{k}": v for k, v in build_cost.items()}},
        "ablation": ablation,
        "conditions": {n: {"method": r.method, **r.metrics, "system_prompt_tokens": sp_tokens if n == "PLD" else 0}
                       for n, r in conditions.items()},
        "notes": notes,
    }
    from stillroom.pld.report import pld_report

    resumed = build_cost.get("calls", 0) == 0 and build_cost.get("run_calls", 0) > 0
    cost = BuildCost.from_meter(build_cost, seconds=build_s)
    artifacts = {k: str(run.file(k)) for k in ("rulebook.json", "rulebook.md", "system_prompt.txt")}
    extra = {k: v for k, v in metrics.items() if k not in ("conditions", "notes", "task")}
    record(run, sel, route="pld", deployed=deployed, results=conditions, cost=cost, config_dict=config_dict,
           title=f"Stillroom PLD: {task.name}", metrics_extra=extra, notes=notes, artifacts=artifacts,
           resumed=resumed, report_html=pld_report(metrics, final, config_dict))
    return {**metrics, "build": {**metrics["build"], **{"seconds": run.read_json("result.json")["build"]["seconds"]}}}
