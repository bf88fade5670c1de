"""The chaos run's verdict, read from the database at quiescence.

=========================  ==================================================
figure                     counted
=========================  ==================================================
started                    instances the run started (the engine accepted)
faults injected            by kind: participant faults, worker kills,
                           broker and database restarts, stray messages
lost                       a start the engine has no instance for, an
                           instance without history, and every instance that
                           is neither terminal nor held with a reason
duplicate effects          more than one applied ledger row for one step,
                           run and direction (keys of one call that differ)
changes after an outcome   state-changing history rows after the instance's
                           terminal row
held without a reason      needs_attention with no attention kind or reason
invariant violations       instances :func:`check_instance` rejects
=========================  ==================================================
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

from tests.saga_invariant import TERMINAL, check_instance, run_of_key
from workflows_app.demo.models import ParticipantEffect
from workflows_app.models import TransitionLog, WorkflowInstance

MUST_BE_ZERO = (
    "lost",
    "duplicate effects",
    "changes after an outcome",
    "held without a reason",
    "invariant violations",
)


@dataclasses.dataclass
class Figures:
    started: int
    faults: Counter[str]
    outcomes: Counter[str]
    info: Counter[str]
    zero: dict[str, int]
    examples: dict[str, list[str]]
    # The checker's full report (history and ledger) of each rejected instance.
    reports: list[str]

    @property
    def ok(self) -> bool:
        return not any(self.zero.values())

    def table(self) -> str:
        lines = [f"{'started':<28}{self.started:>8}"]
        lines.append(f"{'faults injected':<28}{sum(self.faults.values()):>8}")
        lines += [f"  {k:<26}{v:>8}" for k, v in sorted(self.faults.items())]
        lines += [f"{k:<28}{self.zero[k]:>8}" for k in MUST_BE_ZERO]
        lines.append("for information")
        lines += [f"  {k:<26}{v:>8}" for k, v in sorted(self.info.items())]
        lines.append("end states")
        lines += [f"  {k:<26}{v:>8}" for k, v in sorted(self.outcomes.items())]
        for kind, items in self.examples.items():
            if items:
                lines.append(f"{kind}, for example:")
                lines += [f"  {item}" for item in items[:5]]
        if self.reports:
            lines += ["the first instance the checker rejects:", self.reports[0]]
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "faults": dict(self.faults),
            "outcomes": dict(self.outcomes),
            "info": dict(self.info),
            **self.zero,
            "examples": self.examples,
        }


def _lost(business_keys: Iterable[str], examples: list[str]) -> int:
    keys = set(business_keys)
    rows = WorkflowInstance.objects.filter(business_key__in=keys).values(
        "id", "business_key", "state", "attention_kind", "attention_reason"
    )
    found = {r["business_key"] for r in rows}
    lost = [f"{key}: no instance" for key in sorted(keys - found)]
    with_history = set(
        TransitionLog.objects.filter(instance_id__in=[r["id"] for r in rows])
        .values_list("instance_id", flat=True)
        .distinct()
    )
    for r in rows:
        held = r["state"] == "needs_attention" and r["attention_kind"]
        if r["id"] not in with_history:
            lost.append(f"{r['id']}: no history")
        elif r["state"] not in TERMINAL and not held:
            lost.append(f"{r['id']}: left {r['state']}")
    examples += lost
    return len(lost)


def _duplicate_effects(ids: list[Any], examples: list[str]) -> int:
    applied: dict[tuple[Any, ...], list[str]] = defaultdict(list)
    effects = ParticipantEffect.objects.filter(instance_id__in=ids, applied=True)
    for e in effects:
        run = run_of_key(e.idempotency_key)
        applied[(e.instance_id, e.step_name, e.direction, run)].append(
            e.idempotency_key
        )
    dupes = [keys for keys in applied.values() if len(keys) > 1]
    examples += [f"applied twice: {', '.join(keys)}" for keys in dupes]
    return len(dupes)


def _info(ids: list[Any]) -> Counter[str]:
    """Figures that explain a run and may be anything."""
    info: Counter[str] = Counter()
    notes = TransitionLog.objects.filter(instance_id__in=ids, field="")
    for transition in ("message_ignored", "late_outcome_ignored", "flag_stuck"):
        info[f"notes {transition}"] = notes.filter(transition=transition).count()
    ignored = Counter(
        notes.filter(transition="message_ignored").values_list("reason", flat=True)
    )
    for reason, count in ignored.most_common(3):
        info[f"  {reason[:60]}"] = count
    ledger = ParticipantEffect.objects.filter(instance_id__in=ids)
    # A slow call that reached the participant after its undo had run: the
    # participant refuses it (what the ledger's late_refused is for).
    info["calls refused after undo"] = ledger.filter(late_refused__gt=0).count()
    info["participant calls"] = sum(ledger.values_list("calls", flat=True))
    return info


def _changes_after_outcome(ids: list[Any], examples: list[str]) -> int:
    closed: dict[Any, int] = {}
    changes = 0
    rows = (
        TransitionLog.objects.filter(instance_id__in=ids)
        .order_by("instance_id", "id")
        .values_list("instance_id", "id", "step_id", "field", "target", "transition")
    )
    for instance_id, row_id, step_id, field, target, transition in rows:
        if instance_id in closed and field:
            changes += 1
            examples.append(
                f"{instance_id}: {transition} after row {closed[instance_id]}"
            )
        elif step_id is None and field == "state" and target in TERMINAL:
            closed[instance_id] = row_id
    return changes


def _held_without_reason(ids: list[Any], examples: list[str]) -> int:
    held = WorkflowInstance.objects.filter(pk__in=ids, state="needs_attention")
    bad = [
        str(pk)
        for pk, kind, reason in held.values_list(
            "id", "attention_kind", "attention_reason"
        )
        if not kind or not reason.strip()
    ]
    examples += bad
    return len(bad)


def _violations(ids: list[Any], examples: list[str], reports: list[str]) -> int:
    bad = 0
    for pk in ids:
        try:
            check_instance(pk, quiescent=True)
        except AssertionError as exc:
            bad += 1
            rules = [ln[4:] for ln in str(exc).splitlines() if ln.startswith("  - ")]
            examples.append(f"{pk}: {'; '.join(rules)[:400]}")
            reports.append(f"instance {pk}\n{exc}")
    return bad


def collect(business_keys: list[str], faults: Counter[str]) -> Figures:
    instances = WorkflowInstance.objects.filter(business_key__in=business_keys)
    ids = list(instances.values_list("id", flat=True))
    examples: dict[str, list[str]] = {k: [] for k in MUST_BE_ZERO}
    reports: list[str] = []
    zero = {
        "lost": _lost(business_keys, examples["lost"]),
        "duplicate effects": _duplicate_effects(ids, examples["duplicate effects"]),
        "changes after an outcome": _changes_after_outcome(
            ids, examples["changes after an outcome"]
        ),
        "held without a reason": _held_without_reason(
            ids, examples["held without a reason"]
        ),
        "invariant violations": _violations(
            ids, examples["invariant violations"], reports
        ),
    }
    outcomes: Counter[str] = Counter()
    for state, kind in instances.values_list("state", "attention_kind"):
        outcomes[f"{state} ({kind})" if kind else state] += 1
    return Figures(
        len(business_keys), faults, outcomes, _info(ids), zero, examples, reports
    )
