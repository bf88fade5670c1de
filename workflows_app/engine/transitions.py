"""Firing FSM transitions with their audit rows, inside one transaction.

:class:`Change` is the unit of work of every engine command: it holds the
locked instance, its steps and the database time, fires transitions (each one
appending exactly one ``TransitionLog`` row), and at the end saves what changed
with ``update_fields`` and queues broker messages for after the commit.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django_fsm import ConcurrentTransition, can_proceed, has_transition_perm

from workflows_app.engine import dispatch, held, rows, stuck
from workflows_app.engine.actors import Actor
from workflows_app.engine.errors import AlreadyChanged, NotPermitted, TransitionRejected
from workflows_app.engine.locking import lock_instance_with_steps
from workflows_app.engine.signatures import error_signature
from workflows_app.models import (
    TERMINAL_STATES,
    ActorKind,
    Alert,
    StepDefinition,
    StepExecution,
    TransitionLog,
    WorkflowDefinition,
    WorkflowInstance,
)
from workflows_app.monitoring import metrics
from workflows_app.webhooks import outbox

STEP_FIELDS = [
    "state",
    "compensation_state",
    "attempt",
    "attempts_allowed",
    "compensation_attempt",
    "compensation_attempts_allowed",
    "run",
    "run_base_attempt",
    "run_base_compensation_attempt",
    "last_failure_permanent",
    "data_repaired",
    "next_attempt_at",
    "deadline_at",
    "redispatch_at",
    "redispatches",
    "last_error",
    "error_signature",
    "output",
    "succeeded_at",
    "compensated_at",
    "wake_at",
    "claimed_by",
    "claimed_at",
]
# claimed_by is a foreign key: its column (and __dict__ key) is claimed_by_id.
STEP_ATTNAMES = [f"{name}_id" if name == "claimed_by" else name for name in STEP_FIELDS]
INSTANCE_FIELDS = [
    "state",
    "version",
    "attention_kind",
    "attention_reason",
    "started_at",
    "finished_at",
    "last_progress_at",
    "deadline_at",
    "stuck_check_at",
    "stuck",
    "stuck_kind",
    "stuck_reason",
    "stuck_since",
    "alert_due",
    "redispatch_at",
    "pivot_passed",
    "restart_position",
    "outputs",
]


# An instance's steps in order, with their definitions (compiled once).
_STEPS = rows.CompiledSelect(
    lambda instance_id: StepExecution.objects.filter(instance_id=instance_id).order_by(
        "position"
    ),
    StepExecution._meta.get_field("instance"),
)
_STEP_DEFINITIONS = rows.CompiledSelect(
    lambda definition_id: StepDefinition.objects.filter(definition_id=definition_id),
    StepDefinition._meta.get_field("definition"),
)
# The step definitions of published definitions, by definition: a published
# definition is frozen (edits make a new draft version), so every
# transaction need not read and decode them again. Keyed with the time of
# publishing, so a definition row made anew under an old id is read afresh.
_published_steps: dict[tuple[int, Any], dict[int, StepDefinition]] = {}


def step_definitions(definition: WorkflowDefinition) -> dict[int, StepDefinition]:
    """The definition's steps by id; a published definition's read once per
    process."""
    if definition.status != WorkflowDefinition.Status.PUBLISHED:
        return {sd.pk: sd for sd in _STEP_DEFINITIONS.rows(definition.pk)}
    key = (definition.pk, definition.published_at)
    found = _published_steps.get(key)
    if found is None:
        found = {sd.pk: sd for sd in _STEP_DEFINITIONS.rows(definition.pk)}
        if len(_published_steps) > 1000:
            _published_steps.clear()
        _published_steps[key] = found
    return found


CHANGED_MEANWHILE = (
    "This instance changed meanwhile; look at its current state and try again."
)


class Change:
    def __init__(self, instance: WorkflowInstance, now: datetime, actor: Actor) -> None:
        self.instance = instance
        self.now = now
        self.actor = actor
        self._steps: list[StepExecution] | None = None
        # Steps read with the lock (Change.open), not yet given their
        # instance and definitions.
        self._loaded_steps: list[StepExecution] | None = None
        self._dirty_steps: dict[int, StepExecution] = {}
        self._instance_dirty = False
        self._extra_fields: set[str] = set()
        self._logs: list[TransitionLog] = []
        # Rows besides the instance, its steps and its history (attempts),
        # written with them in one batch at save.
        self._writes: list[rows.Write] = []
        self._after_commit: list[Callable[[], None]] = []
        self._dispatches: list[tuple[StepExecution, str, timedelta]] = []
        # Merged into the data of every history row (e.g. the bulk job that
        # caused the change), so the timeline can say where an action came from.
        self.tags: dict[str, Any] = {}
        # A stuck instance that moves on ends its alert episode in this change.
        self._stuck_at_open = instance.stuck
        # The step rows' versions as read (engine.held), and what was held
        # when the change was not read under the lock.
        self._xmins: dict[int, str] = {}
        self._held: held.Held | None = None

    @classmethod
    def open(cls, instance_id: Any, actor: Actor) -> Change:
        locked = lock_instance_with_steps(instance_id)
        change = cls(locked.instance, locked.now, actor)
        change._loaded_steps = locked.steps
        change._xmins = locked.xmins
        return change

    @classmethod
    def resume(cls, kept: held.Held, actor: Actor) -> Change:
        """A change of what a worker kept from its last transaction, not read
        again: its save checks first that the rows are still as kept
        (engine.held), and fails with AlreadyChanged otherwise."""
        change = cls(kept.instance, kept.now(), actor)
        change._loaded_steps = kept.steps
        change._xmins = kept.xmins
        change._held = kept
        return change

    # -- reading ------------------------------------------------------------
    @property
    def steps(self) -> list[StepExecution]:
        if self._steps is None:
            loaded = self._loaded_steps
            self._steps = (
                loaded if loaded is not None else _STEPS.rows(self.instance.id)
            )
            definitions = step_definitions(self.instance.definition)
            for step in self._steps:
                step._state.fields_cache["instance"] = self.instance
                step._state.fields_cache["step_definition"] = definitions[
                    step.step_definition_id
                ]
        return self._steps

    def step(
        self, *, step_id: int | None = None, position: int | None = None
    ) -> StepExecution:
        for step in self.steps:
            if step.id == step_id or (step_id is None and step.position == position):
                return step
        raise TransitionRejected("this step does not belong to the instance")

    def check_version(self, expected_version: int | None) -> None:
        if expected_version is not None and expected_version != self.instance.version:
            raise AlreadyChanged(CHANGED_MEANWHILE)

    # -- writing ------------------------------------------------------------
    def fire(
        self,
        obj: WorkflowInstance | StepExecution,
        name: str,
        *args: Any,
        reason: str = "",
        data: dict[str, Any] | None = None,
        check_user: bool = False,
    ) -> None:
        """Run transition ``name`` on ``obj`` and append its history row."""
        bound = getattr(obj, name)
        field = bound._django_fsm.field.name
        source = getattr(obj, field)
        if self.instance.state in TERMINAL_STATES:
            # Closed means closed: after its outcome nothing of an instance
            # changes state again, whoever asks.
            raise TransitionRejected(
                f"the instance is {self.instance.state}: nothing changes any more"
            )
        if not can_proceed(bound):
            what = obj.name if isinstance(obj, StepExecution) else "the instance"
            raise TransitionRejected(
                f"{name.replace('_', ' ')} is not allowed while {what} is {source}"
            )
        if check_user and not has_transition_perm(bound, self.actor.user):
            raise NotPermitted(f"you are not allowed to {name.replace('_', ' ')}")
        bound(*args)
        step = obj if isinstance(obj, StepExecution) else None
        self._log(
            name,
            step=step,
            field=field,
            source=source,
            target=getattr(obj, field),
            reason=reason,
            data=data,
        )
        if step is not None:
            self._dirty_steps[step.id] = step
        self._touch()

    def note(
        self,
        name: str,
        *,
        step: StepExecution | None = None,
        reason: str = "",
        data: dict[str, Any] | None = None,
    ) -> None:
        """A timeline entry that changes no state (ignored duplicate, stale result)."""
        self._log(
            name, step=step, field="", source="", target="", reason=reason, data=data
        )

    def record_creation(self, *, reason: str, data: dict[str, Any]) -> None:
        """The first history row: the instance came to exist as ``accepted``."""
        self._log(
            "accept",
            step=None,
            field="state",
            source="",
            target=self.instance.state,
            reason=reason,
            data=data,
        )

    def mark_step(self, step: StepExecution) -> None:
        self._dirty_steps[step.id] = step

    def mark_instance(self, *extra_fields: str) -> None:
        """The instance changed; ``extra_fields`` are columns outside
        ``INSTANCE_FIELDS`` (kept out of every save: the input is large)."""
        self._instance_dirty = True
        self._extra_fields.update(extra_fields)

    def insert(self, obj: Any) -> None:
        """A new row (its primary key is not read back), written at save."""
        self._writes.append(rows.Insert([obj]))

    def insert_all(self, objs: list[Any]) -> None:
        """New rows of one model, as :meth:`insert`."""
        if objs:
            self._writes.append(rows.Insert(objs))

    def update(self, model: Any, values: dict[str, Any], **filters: Any) -> None:
        """``UPDATE model SET values WHERE filters``, written at save."""
        self._writes.append(rows.Update(model, values, filters))

    def after_commit(self, fn: Callable[[], None]) -> None:
        self._after_commit.append(fn)

    def dispatch_step(
        self, step: StepExecution, direction: str, *, delay: timedelta | None = None
    ) -> None:
        """Queue the attempt's message for after the commit; the sweeper re-sends
        it at ``redispatch_at`` if nobody has claimed the work by then."""
        wait = delay or timedelta(0)
        step.redispatch_at = (
            self.now + wait + timedelta(seconds=settings.SAGA_REDISPATCH_AFTER)
        )
        step.redispatches = 0
        self.mark_step(step)
        self._dispatches.append((step, direction, wait))

    def take_dispatch(
        self, accept: Callable[[StepExecution, str, timedelta], bool]
    ) -> tuple[StepExecution, str] | None:
        """Withdraw the first queued dispatch that ``accept`` wants to run here."""
        for index, (step, direction, wait) in enumerate(self._dispatches):
            if accept(step, direction, wait):
                del self._dispatches[index]
                return step, direction
        return None

    def save(self, *, last: bool = False, keep: str | None = None) -> held.Held | None:
        """Write everything changed in one batch, then queue the follow-ups
        after commit. ``last``: the caller's transaction runs no statement
        after this one, which may then carry its COMMIT (rows.write).

        ``keep``: the task token of the attempt this change claimed for its
        worker to run next. Returns what the worker may keep for the step
        after it (engine.held), or None. A change made by :meth:`resume`
        must be ``last``."""
        instance = self.instance
        writes: list[rows.Write] = []
        if self._instance_dirty:
            fence = instance.fence()
            instance.version += 1
            fields = instance.changed([*INSTANCE_FIELDS, *sorted(self._extra_fields)])
            writes.append(rows.FencedUpdate(instance, fields, fence))
        for step in self._dirty_steps.values():
            step.error_signature = error_signature(step.last_error)
            fields = step.changed(STEP_ATTNAMES) or ["state"]
            writes.append(rows.FencedUpdate(step, fields, step.fence()))
        if self._stuck_at_open and not instance.stuck:
            self._end_alert_episode()
        writes += self._writes
        if self._logs:
            writes.append(rows.Insert(self._logs))
        # Webhook rows are written after the batch, by the ORM: then the
        # batch is not the transaction's last statement.
        deliveries = (
            outbox.state_event_deliveries(instance, self._logs, self.now)
            if self._logs
            else []
        )
        last = last and not deliveries
        guard = held.guard(self._held) if self._held is not None else []
        after = None
        if keep is not None and last and self._steps is not None:
            after = held.snapshot(instance.id, keep)
        if guard and not last:
            raise rows.NotInOneMessage("a resumed change must be the last write")
        snapshot = None
        try:
            try:
                snapshot = rows.write(writes, last=last, guard=guard, after=after)
            except rows.NotInOneMessage:
                if guard:
                    raise
                rows.write(writes, last=last)  # without the snapshot: keep nothing
        except ConcurrentTransition as exc:
            raise AlreadyChanged(CHANGED_MEANWHILE) from exc
        written = []
        for write in writes:
            if isinstance(write, rows.FencedUpdate):
                write.obj.written()  # type: ignore[attr-defined]
                if isinstance(write.obj, StepExecution):
                    written.append(write.obj.pk)
        if self._logs:
            transaction.on_commit(metrics.recorder(instance, self._logs), robust=True)
        outbox.queue_state_events(deliveries)
        for step, direction, wait in self._dispatches:
            self._after_commit.append(
                dispatch.attempt_sender(
                    self.instance.id,
                    step.id,
                    direction,
                    step.step_definition.timeout,
                    wait,
                )
            )
        for fn in self._after_commit:
            transaction.on_commit(fn, robust=True)
        self._logs, self._after_commit, self._dirty_steps = [], [], {}
        self._writes = []
        self._dispatches = []
        self._instance_dirty = False
        self._extra_fields = set()
        self._stuck_at_open = instance.stuck
        if snapshot is None or self._steps is None:
            return None
        return held.kept(instance, self._steps, self._xmins, written, snapshot)

    # -- internals ----------------------------------------------------------
    def _end_alert_episode(self) -> None:
        """The instance moved on: its open alerts are over (in this transaction,
        so no page shows a stale alert), and a new hold opens a new one. A
        late-effect alert stays until a person acknowledges it."""
        ended = list(
            Alert.objects.filter(instance_id=self.instance.id, resolved_at__isnull=True)
            .exclude(kind=Alert.Kind.LATE_EFFECT)
            .values_list("id", "kind")
        )
        if not ended:
            return
        why = self._moved_on()
        Alert.objects.filter(pk__in=[pk for pk, _ in ended]).update(
            resolved_at=self.now,
            resolved_reason=why[:300],
            next_send_at=None,
            escalate_at=None,
        )
        for pk, kind in ended:
            self._log(
                "alert_resolved",
                step=None,
                field="",
                source="",
                target="",
                reason=f"{Alert.Kind(kind).label} is over: {why}",
                data={"alert": pk},
            )

    def _moved_on(self) -> str:
        """What moved the instance on in this unit of work, and who did it
        (its first state change), as an alert's resolution says it."""
        moved = next((log for log in self._logs if log.field), None)
        if moved is None:
            return "the instance moved on"
        step = f" of {moved.step.name}" if moved.step is not None else ""
        who = moved.actor_label or moved.actor_kind
        return f"the instance moved on: {moved.transition}{step} by {who}"

    def _log(
        self,
        name: str,
        *,
        step: StepExecution | None,
        field: str,
        source: str,
        target: str,
        reason: str,
        data: dict[str, Any] | None,
    ) -> None:
        actor = self.actor
        self._logs.append(
            rows.new(
                TransitionLog,
                {
                    "step": step,
                    "user": actor.user if actor.kind == ActorKind.OPERATOR else None,
                },
                instance_id=self.instance.id,
                field=field,
                source=source,
                target=target,
                transition=name,
                actor_kind=actor.kind,
                actor_label=actor.label,
                reason=reason[:5000],
                data={**(data or {}), **self.tags},
            )
        )

    def _touch(self) -> None:
        """Any transition is progress: it clears "stuck" and restarts its clock."""
        instance = self.instance
        self._instance_dirty = True
        if instance.state in TERMINAL_STATES:
            instance.last_progress_at = self.now
            instance.stuck_check_at = None
            instance.redispatch_at = None
            instance.finished_at = instance.finished_at or self.now
        elif not self._progress_recorded_lately():
            instance.last_progress_at = self.now
            instance.stuck_check_at = self.now + instance.definition.stuck_after
        if instance.state != WorkflowInstance.State.NEEDS_ATTENTION:
            stuck.clear_stuck(instance)

    def _progress_recorded_lately(self) -> bool:
        """Whether the progress clock already says "now", to within
        ``SAGA_PROGRESS_RESOLUTION`` (and a hundredth of the stuck rule): an
        instance moving through quick steps then keeps its clock, so its
        row's update changes no indexed column and PostgreSQL writes it
        without touching the table's many indexes (a HOT update). Only while
        the state stays and the stuck clock runs by the plain rule."""
        instance = self.instance
        last, check = instance.last_progress_at, instance.stuck_check_at
        if last is None or check is None or instance.stuck:
            return False
        if instance.fence().get("state") != instance.state:
            return False
        rule = instance.definition.stuck_after
        resolution = min(settings.SAGA_PROGRESS_RESOLUTION, rule.total_seconds() / 100)
        return (
            timedelta(0) <= self.now - last < timedelta(seconds=resolution)
            and check >= last + rule
        )
