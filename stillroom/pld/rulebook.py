"""The rulebook is data: every rule with its id, text, version, cluster, the training examples behind it and the
labels it covers. It round-trips through rulebook.json, reads as rulebook.md, and deploys as a plain-text
system prompt. A person can edit rulebook.json and re-score it with `stillroom eval --rulebook FILE`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stillroom.errors import TaskDataError

HEADER = "Follow these rules to decide the answer."


@dataclass
class Rule:
    """One consolidated instruction and its provenance."""

    id: str
    text: str
    version: int = 1
    cluster: int | None = None
    """DBSCAN cluster it was synthesised from (None for rules written by the conflict resolver)."""
    example_ids: list[str] = field(default_factory=list)
    """Training examples whose extracted instructions formed this rule."""
    labels: list[str] = field(default_factory=list)
    """Gold labels of those examples: the labels this rule speaks for."""
    origin: str = "synthesis"
    """'synthesis', 'resolution' (rewritten by the conflict resolver) or 'edited' (by a person)."""


@dataclass
class Rulebook:
    """An ordered list of rules, versioned as the conflict loop revises it."""

    task: str
    rules: list[Rule]
    version: int = 1
    meta: dict = field(default_factory=dict)

    def system_prompt(self) -> str:
        """The student's system prompt: a numbered list of the rules."""
        if not self.rules:
            return ""
        lines = [HEADER] + [f"{i}. {r.text.strip()}" for i, r in enumerate(self.rules, 1)]
        return "\n".join(lines)

    def covered_labels(self) -> set[str]:
        """The gold labels of the examples behind the rules (provenance, not what the rules say)."""
        return {lab for r in self.rules for lab in r.labels}

    def named_labels(self, label_set) -> list[str]:
        """The labels of `label_set` that some rule's text names (whole words, any case; '_' and '-' read as
        spaces). This is the rulebook's real coverage: a rule synthesised from a cluster of examples of three
        labels may still speak of one of them only."""
        import re

        def norm(x: str) -> str:
            return " " + re.sub(r"[\W_]+", " ", x.casefold()).strip() + " "

        texts = [norm(r.text) for r in self.rules]
        return [lab for lab in label_set if norm(str(lab)).strip() and any(norm(str(lab)) in t for t in texts)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n"

    def to_markdown(self) -> str:
        """A readable rulebook: each rule with its provenance."""
        out = [f"# Rulebook for {self.task} (version {self.version})", ""]
        if not self.rules:
            out.append("_No rules: the student runs zero-shot._")
        for i, r in enumerate(self.rules, 1):
            out.append(f"{i}. {r.text.strip()}")
            src = f"cluster {r.cluster}" if r.cluster is not None else r.origin
            ids = ", ".join(r.example_ids[:12]) + (" ..." if len(r.example_ids) > 12 else "")
            out.append(f"   - id `{r.id}`, v{r.version}, {src}; labels: {', '.join(r.labels) or '-'}; examples: {ids or '-'}")
        return "\n".join(out) + "\n"

    @classmethod
    def from_dict(cls, d: dict, source: str = "rulebook") -> Rulebook:
        try:
            rules = [Rule(**r) for r in d["rules"]]
            return cls(task=d.get("task", ""), rules=rules, version=int(d.get("version", 1)), meta=d.get("meta", {}))
        except (KeyError, TypeError) as exc:
            raise TaskDataError(f"not a rulebook ({exc}); expected {{'task', 'rules': [{{'id', 'text', ...}}]}}", path=source) from None


def load_rulebook(path: str | Path) -> Rulebook:
    """Read rulebook.json (or a plain-text file: one rule a line, numbering optional)."""
    p = Path(path)
    if not p.exists():
        raise TaskDataError("rulebook file does not exist", path=str(p))
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            return Rulebook.from_dict(json.loads(text), source=str(p))
        except json.JSONDecodeError as exc:
            raise TaskDataError(f"malformed JSON: {exc.msg}", path=str(p), line=exc.lineno) from None
    rules = []
    for line in text.splitlines():
        s = line.strip().lstrip("-*").strip()
        if not s or s == HEADER:
            continue
        head, dot, rest = s.partition(". ")
        if dot and head.isdigit():
            s = rest
        rules.append(Rule(id=f"r{len(rules) + 1}", text=s, origin="edited"))
    return Rulebook(task=p.stem, rules=rules)
