"""Timers and steps for a person in the saga property machine.

``test_saga_property.py`` draws these steps into its definitions; this module
holds what they add: how such a step is declared, the rules that act on it
(the sweeper wakes a timer as time passes; operators wake it early or extend
it; people claim, release, complete with a right or a wrong form, or reject
a step for a person) and what the teardown's people do (complete what waits
for them, at once or only after it went overdue; wake or extend a timer).
None of it calls a participant, so the fault schedule and the ledger are
untouched; the saga checker knows their transitions
(``tests/saga_invariant.py``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.utils import timezone
from hypothesis import strategies as st

from workflows_app.engine import operate
from workflows_app.engine.commands import waits as wait_commands
from workflows_app.engine.errors import (
    InvalidInput,
    NotPermitted,
    TransitionRejected,
)
from workflows_app.models import StepExecution, TransitionLog

# Most steps call a participant; two in seven wait.
KINDS = ("activity", "activity", "activity", "activity", "activity", "timer", "human")
# A timer waits for a few seconds (a rule's time step passes it), longer,
# or until a time in the input; ``until_missing``: the input lacks it (fails
# for good). The teardown's hour passes every one of them.
TIMER_WAITS = (5, 45, 600, "until", "until_missing")
# A person's time rule (the step's timeout): shorter than the machine's big
# time step, so a step left alone goes overdue (stuck, with an alert).
TIME_RULES = (5, 60)
# What the teardown's people do with a step that waits for them: complete it,
# reject it once (the failure policy applies, then it is completed when it
# comes back), let it go overdue first, or claim it, have it released by
# someone else, then complete it.
PEOPLE = ("complete", "reject", "late", "release")
# What the teardown's operator does with a timer that waits: nothing (the
# sweeper wakes it as the hour passes), wake it now, or extend it once.
TIMER_PEOPLE = ("sweeper", "wake", "extend")
FORM = [{"name": "approved", "type": "boolean", "required": True}]
WAIT_PATH = "input.wake_at"
# ``release``: claimed by one, released by the other (with a reason);
# ``claimed_by_other``: claimed by one, the other's completion is refused.
PERSON_OPS = (
    "claim",
    "release",
    "claimed_by_other",
    "complete",
    "complete_wrong_form",
    "reject",
)
TIMER_OPS = ("wake", "extend", "extend_earlier")
REFUSED = (TransitionRejected, NotPermitted, InvalidInput)
# Transitions and notes of the waits that a run counts (and a long run must
# have seen, see coverage_gaps).
COUNTED = (
    "begin_wait",
    "wake",
    "wake_early",
    "timer_extended",
    "refuse_wait",
    "step_claimed",
    "step_unclaimed",
    "complete_task",
    "reject_task",
    "human_step_overdue",
    "stop_waiting",
)


def draw_wait(draw: Any, step: dict[str, Any], kind: str) -> None:
    """Make ``step`` (a drawn activity) a timer or a step for a person."""
    step["kind"] = kind
    step.update(awaits_event=False, no_undo=True)
    if kind == "timer":
        step["wait"] = draw(st.sampled_from(TIMER_WAITS))
    elif kind == "human":
        step["time_rule"] = draw(st.sampled_from(TIME_RULES))


def declared(step: dict[str, Any]) -> dict[str, Any]:
    """The StepDefinition fields of a drawn wait (``make_definition``'s)."""
    kind = step.get("kind", "activity")
    if kind == "timer":
        wait = step["wait"]
        by_input = isinstance(wait, str)
        return {
            "kind": kind,
            "action": "",
            "compensation": "",
            "wait_for": None if by_input else timedelta(seconds=wait),
            "wait_until": WAIT_PATH if by_input else "",
        }
    return {
        "kind": kind,
        "action": "",
        "compensation": "",
        "timeout": timedelta(seconds=step["time_rule"]),
        "form_fields": FORM,
    }


def wake_at_input(seconds: int = 20) -> dict[str, Any]:
    """The input a timer ``until input.wake_at`` reads (a near time)."""
    return {"wake_at": (timezone.now() + timedelta(seconds=seconds)).isoformat()}


def starting_input(steps: list[dict[str, Any]]) -> dict[str, Any]:
    waits = [s.get("wait") for s in steps if s.get("kind") == "timer"]
    if "until" in waits:
        return wake_at_input()
    return {}


def waiting(instance_id: str, kind: str) -> list[StepExecution]:
    return list(
        StepExecution.objects.filter(
            instance_id=instance_id,
            state="waiting",
            step_definition__kind=kind,
        ).order_by("position")
    )


class WaitActions:
    """Mixed into the property machine: operators and people on waits."""

    instance_id: str
    stats: Any
    operators: Any

    def _instance_version(self) -> int: ...  # the machine's

    def _state_rows(self) -> int: ...  # the machine's

    def _wait_act(
        self,
        name: str,
        user: Any,
        *,
        version: int | None,
        late: bool = False,
        **kwargs: Any,
    ) -> bool:
        try:
            outcome = operate.act(
                self.instance_id,
                name,
                user=user,
                reason=f"{name} by {user.username}",
                expected_version=version,
                **kwargs,
            )
        except REFUSED:
            when = "after the end" if late else "refused"
            self.stats[f"operator {when}: {name}"] += 1
            return False
        assert outcome.done, "no wait action is under four eyes here"
        self.stats[f"operator applied: {name}"] += 1
        return True

    def person_acts(self, op: str, who: int, stale: bool) -> None:
        """A person works on a step that waits for them (if one does)."""
        steps = waiting(self.instance_id, "human")
        if not steps:
            self.stats["person found nothing waiting"] += 1
            return
        step, user = steps[0], self.operators[who]
        other = self.operators[1 - who]
        current = self._instance_version()
        version = current - 1 if stale else current
        if op in {"claim", "release", "claimed_by_other"}:
            if not self._claim(step, user, version) or op == "claim":
                return
            if op == "release":
                self._claim(step, other, None, release=True)
                return
            # Someone else completes it: refused, it is claimed.
            refused = not self._wait_act(
                "complete_human_step",
                other,
                version=None,
                step_id=step.pk,
                data={"output": {"approved": True}},
            )
            assert refused, "a step claimed by one was completed by another"
            return
        before = self._state_rows()
        data: dict[str, Any] = {"reject": True}
        if op == "complete":
            data = {"output": {"approved": True}}
        elif op == "complete_wrong_form":
            data = {"output": {"approved": "maybe", "extra": 1}}
        applied = self._wait_act(
            "complete_human_step", user, version=version, step_id=step.pk, data=data
        )
        if op == "complete_wrong_form":
            assert not applied, "a wrong form completed a step"
            assert self._state_rows() == before, "a wrong form wrote a state"
        assert not (applied and stale), "S10: a completion of a stale version applied"

    def _claim(
        self,
        step: StepExecution,
        user: Any,
        version: int | None,
        *,
        release: bool = False,
    ) -> bool:
        """Claim (or release, with a reason) a step for a person from the
        inbox; against a stale version it is refused."""
        name = "release" if release else "claim"
        command = wait_commands.step_unclaim if release else wait_commands.step_claim
        extra = {"reason": "they are away today"} if release else {}
        stale = version is not None and version != self._instance_version()
        try:
            command(
                self.instance_id, step.pk, user=user, expected_version=version, **extra
            )
        except REFUSED:
            self.stats[f"person refused: {name}"] += 1
            return False
        assert not stale, f"S10: a {name} against a stale version applied"
        self.stats[f"person applied: {name}"] += 1
        return True

    def timer_acts(self, op: str, who: int, stale: bool) -> None:
        """An operator wakes a waiting timer now, or extends it."""
        steps = waiting(self.instance_id, "timer")
        if not steps:
            self.stats["operator found no timer waiting"] += 1
            return
        step, user = steps[0], self.operators[who]
        current = self._instance_version()
        version = current - 1 if stale else current
        if op == "wake":
            applied = self._wait_act(
                "wake_timer", user, version=version, step_id=step.pk
            )
        else:
            assert step.wake_at is not None
            earlier = op == "extend_earlier"
            until = step.wake_at + timedelta(seconds=-60 if earlier else 45)
            applied = self._wait_act(
                "extend_timer",
                user,
                version=version,
                step_id=step.pk,
                data={"until": until.isoformat()},
            )
            assert not (applied and earlier), "a timer was extended to an earlier time"
        assert not (applied and stale), f"S10: {op} against a stale version applied"

    def people_finish(self, person: str, seen: set[int]) -> str:
        """The teardown's people: complete what waits for them, maybe after
        it went overdue once (``late``), or reject it once (``reject``: then
        complete it when it comes back). Returns what they do next time."""
        for step in waiting(self.instance_id, "human"):
            if person == "late" and step.pk not in seen:
                seen.add(step.pk)  # left overdue for this round
                continue
            if person == "release":
                # Claimed by one, released by the other, done by the first.
                self._claim(step, self.operators[1], None)
                self._claim(step, self.operators[0], None, release=True)
                step.claimed_by_id, person = None, "complete"
            if step.claimed_by_id is not None:
                # Whoever claimed it completes it.
                user = next(u for u in self.operators if u.pk == step.claimed_by_id)
            else:
                user = self.operators[0]
            reject = person == "reject"
            self._wait_act(
                "complete_human_step",
                user,
                version=None,
                step_id=step.pk,
                data={"reject": True} if reject else {"output": {"approved": True}},
            )
            if reject:
                person = "complete"
        return person

    def timers_finish(self, op: str) -> str:
        """The teardown's operator and a waiting timer: leave it to the
        sweeper, wake it now, or extend it once (the sweeper wakes it then).
        Returns what they do next time."""
        steps = waiting(self.instance_id, "timer") if op != "sweeper" else []
        for step in steps[:1]:
            data = {"by_seconds": 90} if op == "extend" else None
            name = "extend_timer" if op == "extend" else "wake_timer"
            self._wait_act(
                name, self.operators[0], version=None, step_id=step.pk, data=data
            )
            return "sweeper"
        return op

    def nothing_after_the_end(self, kinds: set[str]) -> None:
        """A person completing, or an operator waking, a finished instance's
        wait is refused and changes nothing (S2)."""
        before = self._state_rows()
        name, data = ("wake_timer", None)
        if "human" in kinds:
            name, data = "complete_human_step", {"output": {"approved": True}}
        applied = self._wait_act(
            name, self.operators[0], version=None, late=True, data=data
        )
        assert not applied, f"S2: {name} applied to a finished instance"
        assert self._state_rows() == before, "S2: a wait action changed a state"


def count_waits(instance_id: str, stats: Any) -> None:
    """What the example's waits went through (one query)."""
    rows = TransitionLog.objects.filter(
        instance_id=instance_id, transition__in=COUNTED
    ).values_list("transition", "actor_kind")
    for transition, actor in rows:
        stats[f"wait: {transition}"] += 1
        if transition == "wake":
            stats[f"wait: timer woken by the sweeper ({actor})"] += 1


def coverage_gaps(stats: Any) -> list[str]:
    """What a long run must have seen of the waits."""
    return [f"wait: {t}" for t in COUNTED if not stats[f"wait: {t}"]]
