"""Manual actions by support staff: each one permission-checked, fenced on the
state version the operator saw, audited with their name and reason."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.db import transaction
from django_fsm import can_proceed, has_transition_perm

from workflows_app import validation
from workflows_app.engine import four_eyes, progress
from workflows_app.engine.actors import Actor
from workflows_app.engine.blocking import (
    blocking_branches,
    restart_points,
)
from workflows_app.engine.errors import (
    AlreadyChanged,
    InvalidInput,
    NotPermitted,
    TransitionRejected,
)
from workflows_app.engine.four_eyes import Approval
from workflows_app.engine.transitions import Change
from workflows_app.models import (
    Alert,
    Attempt,
    CompensationState,
    StepExecution,
    StepState,
)

Body = Callable[..., Any]


def open_change(
    instance_id: Any,
    *,
    user: Any,
    reason: str,
    action: str,
    expected_version: int | None = None,
    tags: dict[str, Any] | None = None,
    approval: Approval | None = None,
) -> Change:
    """Lock the instance for an operator; ``tags`` (the bulk job or approval
    the action comes from) go into every timeline row it writes. An action
    the workflow puts under four eyes needs its ``approval``."""
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidInput("a reason is required")
    checked_text(reason, "the reason")
    change = Change.open(instance_id, Actor.operator(user))
    change.check_version(expected_version)
    four_eyes.require(change.instance, action, approval)
    change.tags.update(tags or {})
    if approval is not None:
        change.tags.setdefault("approved_by", approval.approved_by)
    return change


def perform(
    action: str,
    body: Body,
    instance_id: Any,
    *,
    user: Any,
    reason: str,
    expected_version: int | None = None,
    tags: dict[str, Any] | None = None,
    approval: Approval | None = None,
    **arguments: Any,
) -> Any:
    """Do an operator action's ``body`` in the caller's transaction: a bulk
    job item or an approval commits it together with its own bookkeeping."""
    change = open_change(
        instance_id,
        user=user,
        reason=reason,
        action=action,
        expected_version=expected_version,
        tags=tags,
        approval=approval,
    )
    result = body(change, reason=reason, **arguments)
    change.save()
    return result


def durable(action: str, body: Body) -> Callable[..., Any]:
    """The public command of an action: its body in a transaction of its own."""

    @transaction.atomic(durable=True)
    def command(instance_id: Any, **arguments: Any) -> Any:
        return perform(action, body, instance_id, **arguments)

    command.__name__ = command.__qualname__ = f"instance_{action}"
    command.__doc__ = body.__doc__
    return command


def checked_text(value: Any, where: str) -> None:
    """The engine's own guard (the pages and the API check first): text that
    PostgreSQL cannot store is refused before anything is written."""
    if not isinstance(value, str):
        raise InvalidInput(f"{where} must be text")
    try:
        validation.check_text(value, where)
    except validation.BadInput as exc:
        raise InvalidInput(str(exc)) from None


def checked_json(value: Any, where: str) -> None:
    try:
        validation.check_json(value, where)
    except validation.BadInput as exc:
        raise InvalidInput(str(exc)) from None


def _blocked_step(
    change: Change, step_id: int | None, transition: str
) -> StepExecution:
    """The step that stops forward progress: the first failed or unknown one,
    or with ``step_id`` any failed or unknown branch of its stage.

    The instance's state is checked first: when it moved on meanwhile (another
    operator, a worker) the refusal says so instead of blaming a step."""
    instance = change.instance
    if not can_proceed(getattr(instance, transition)):
        raise TransitionRejected(
            f"{transition.replace('_', ' ')} is not allowed while the instance "
            f"is {instance.state}"
        )
    branches = blocking_branches(change.steps)
    if step_id is None and branches:
        return branches[0]
    blocked = next((s for s in branches if s.id == step_id), None)
    if blocked is None:
        raise TransitionRejected("no failed or unknown step blocks this instance there")
    return blocked


def retry_step(change: Change, *, reason: str, step_id: int | None = None) -> None:
    """Run the blocking step again now, with a fresh budget of attempts; after
    a repair of its data, as a new run under new idempotency keys."""
    step = _blocked_step(change, step_id, "retry_step")
    if step.data_repaired:
        _retry_repaired(change, step, reason)
        return
    change.fire(
        change.instance,
        "retry_step",
        reason=reason,
        check_user=True,
        data={"step": step.name},
    )
    change.fire(
        step,
        "retry_now",
        step.step_definition.max_attempts,
        reason=reason,
        check_user=True,
    )
    if step.step_definition.kind != "activity":
        # A timer or a step for a person is never sent to a worker: it
        # starts waiting again (a timer reads its time from the input anew).
        progress.advance(change)
        return
    change.dispatch_step(step, "action")


def _retry_repaired(change: Change, step: StepExecution, reason: str) -> None:
    """The step's data was corrected, so its next call is a new request: a new
    run with new keys (a participant that honours keys would otherwise answer
    with its stored result, or refuse the changed parameters). An earlier call
    that may have applied is undone first, as a restart from this step does."""
    definition = step.step_definition
    data = {"step": step.name, "run": step.run + 1, "repaired": True}
    if not step.may_have_applied:
        change.fire(
            change.instance, "retry_step", reason=reason, check_user=True, data=data
        )
        change.fire(
            step,
            "rerun",
            definition.max_attempts,
            True,
            reason="retried with repaired data: a new run",
            data={"run": step.run + 1, "previous_output": step.output},
        )
        progress.advance(change)
        return
    pivot = next((s.position for s in change.steps if s.step_definition.is_pivot), None)
    if not definition.compensation or (pivot is not None and step.position >= pivot):
        raise TransitionRejected(
            f"{step.name}'s earlier call may have applied and cannot be undone "
            "here, so a new call with the repaired data could apply twice: mark "
            "the step done by hand, or close the instance"
        )
    change.fire(
        change.instance,
        "retry_repaired_step",
        step.position,
        reason=reason,
        check_user=True,
        data={**data, "undo": [step.name]},
    )
    progress.advance(change)


def mark_step_done(
    change: Change, *, reason: str, output: Any = None, step_id: int | None = None
) -> None:
    """Record that a person did the blocking step by hand, then move on."""
    checked_json(output, "the output")
    step = _blocked_step(change, step_id, "mark_step_done")
    change.fire(
        change.instance,
        "mark_step_done",
        reason=reason,
        check_user=True,
        data={"step": step.name},
    )
    change.fire(
        step,
        "mark_done",
        output,
        reason=reason,
        check_user=True,
        data={"output": output},
    )
    change.instance.outputs = {**change.instance.outputs, step.name: output}
    progress.advance(change)


def resume(change: Change, *, reason: str) -> None:
    """Continue an instance held because its deadline passed."""
    change.fire(change.instance, "resume", reason=reason, check_user=True)
    # The operator accepted the passed deadline; do not hold again for it.
    change.instance.deadline_at = None
    progress.advance(change)


def compensate(change: Change, *, reason: str) -> None:
    """Undo the started steps before the pivot, in reverse order."""
    change.fire(change.instance, "compensate", reason=reason, check_user=True)
    progress.advance(change)


def cancel(change: Change, *, reason: str) -> None:
    """Cancel: accepted instances end at once, started ones compensate."""
    change.fire(change.instance, "cancel", reason=reason, check_user=True)
    progress.advance(change)


def close_as_failed(change: Change, *, reason: str) -> None:
    """End a held instance as failed: a person takes it from here. Work still
    open is fenced first, in the same transaction: an attempt in flight
    becomes unknown (its late outcome is only noted, and a reported effect
    raises an alert), scheduled and pending retries are dropped."""
    instance = change.instance
    if not can_proceed(instance.close_as_failed):
        raise TransitionRejected(
            f"close as failed is not allowed while the instance is {instance.state}"
        )
    if not has_transition_perm(instance.close_as_failed, change.actor.user):
        raise NotPermitted("you are not allowed to close as failed")
    _fence_open_work(change)
    change.fire(instance, "close_as_failed", reason=reason, check_user=True)


CLOSED_IN_FLIGHT = "the instance was closed while this attempt was in flight"


def _fence_open_work(change: Change) -> None:
    for step in change.steps:
        if step.state == StepState.WAITING and step.step_definition.kind != "activity":
            # A timer or a step for a person: nothing in flight, just a wait.
            change.fire(step, "stop_waiting", reason="the instance was closed")
        elif step.state in {StepState.RUNNING, StepState.WAITING}:
            Attempt.objects.filter(
                step=step, direction=Attempt.Direction.ACTION, number=step.attempt
            ).update(
                outcome=Attempt.Outcome.ABANDONED,
                finished_at=change.now,
                error_message=CLOSED_IN_FLIGHT,
            )
            change.fire(
                step,
                "time_out",
                f"Abandoned: {CLOSED_IN_FLIGHT}",
                reason=CLOSED_IN_FLIGHT,
                data={"attempt": step.attempt, "abandoned": True},
            )
        elif step.state == StepState.SCHEDULED:
            change.fire(step, "unschedule", reason="the instance was closed")
        elif step.state == StepState.RETRYING:
            change.fire(step, "abandon_retry", reason="the instance was closed")
        if step.compensation_state in {
            CompensationState.PENDING,
            CompensationState.RUNNING,
            CompensationState.RETRYING,
        }:
            # Never reached: a held instance has no compensation under way
            # (it holds on a failed one); refuse rather than leave one open.
            raise TransitionRejected(
                f"{step.name}'s compensation is {step.compensation_state}: wait for it"
            )
        if step.deadline_at or step.redispatch_at or step.next_attempt_at:
            step.deadline_at = step.redispatch_at = step.next_attempt_at = None
            change.mark_step(step)


def restart_from_step(
    change: Change, *, reason: str, step_id: int | None = None
) -> None:
    """Run the workflow again from an earlier step: the steps from there to the
    blocked one are compensated first (newest first, where they have a
    compensation), then run again as a new run with new idempotency keys."""
    blocked = _blocked_step(change, None, "restart_from_step")
    if step_id is None:
        raise InvalidInput("choose the step to restart from")
    target = change.step(step_id=step_id)
    points = restart_points(change.steps, blocked)
    if target not in points:
        allowed = [s.name for s in points]
        raise TransitionRejected(
            f"{target.name} is not a restart point of this instance (allowed: "
            f"{', '.join(allowed) or 'none'})"
        )
    undo = [
        s.name
        for s in change.steps
        if s.position >= target.position
        and s.may_have_applied
        and s.step_definition.compensation
    ]
    data: dict[str, Any] = {
        "step": target.name,
        "blocked_step": blocked.name,
        "undo": undo[::-1],
    }
    instance = change.instance
    if instance.deadline_at is not None and instance.deadline_at <= change.now:
        # As with resume: the operator runs it again knowing the deadline
        # passed; otherwise the sweeper would hold it again at once.
        data["deadline_accepted"] = instance.deadline_at.isoformat()
        instance.deadline_at = None
    change.fire(
        instance,
        "restart_from_step",
        target.position,
        reason=reason,
        check_user=True,
        data=data,
    )
    progress.advance(change)


def retry_compensation(change: Change, *, reason: str) -> None:
    """Retry the compensation that exhausted its attempts, then continue undoing."""
    failed = [
        s for s in change.steps if s.compensation_state == CompensationState.FAILED
    ]
    change.fire(
        change.instance,
        "retry_compensation",
        reason=reason,
        check_user=True,
        data={"steps": [s.name for s in failed]},
    )
    for step in failed:
        change.fire(
            step,
            "compensation_retry_now",
            step.step_definition.max_attempts,
            reason=reason,
            check_user=True,
        )
        change.dispatch_step(step, "compensation")
    progress.advance(change)


instance_retry_step = durable("retry_step", retry_step)
instance_mark_step_done = durable("mark_step_done", mark_step_done)
instance_resume = durable("resume", resume)
instance_compensate = durable("compensate", compensate)
instance_cancel = durable("cancel", cancel)
instance_close_as_failed = durable("close_as_failed", close_as_failed)
instance_restart_from_step = durable("restart_from_step", restart_from_step)
instance_retry_compensation = durable("retry_compensation", retry_compensation)


@transaction.atomic(durable=True)
def alert_acknowledge(alert_id: int, *, user: Any, reason: str = "") -> None:
    """An operator takes the alert: no escalation; it stays open until the
    instance moves on."""
    if not user.has_perm("workflows_app.acknowledge_alert"):
        raise NotPermitted("you are not allowed to acknowledge alerts")
    instance_id = Alert.objects.values_list("instance_id", flat=True).get(pk=alert_id)
    # One lock order everywhere: the instance row first, then the alert.
    change = Change.open(instance_id, Actor.operator(user))
    alert = Alert.objects.select_for_update().get(pk=alert_id)
    if alert.resolved_at is not None or alert.acknowledged_at is not None:
        raise AlreadyChanged(f"this alert is already {alert.status}")
    # A late effect is not an episode that ends when the instance moves (it is
    # closed): a person taking it is its end.
    late = alert.kind == Alert.Kind.LATE_EFFECT
    Alert.objects.filter(pk=alert.pk).update(
        acknowledged_at=change.now,
        acknowledged_by=user,
        escalate_at=None,
        **(
            {
                "resolved_at": change.now,
                "resolved_reason": f"acknowledged by {user.get_username()}"[:300],
                "next_send_at": None,
            }
            if late
            else {}
        ),
    )
    change.note(
        "alert_acknowledged",
        reason=reason or "acknowledged",
        data={"alert": alert.pk, "kind": alert.kind},
    )
    change.save()
