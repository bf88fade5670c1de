"""Replaying the audit trail: the history alone must explain every state.

``replay(instance)`` folds the instance's ``TransitionLog`` rows, oldest first,
from the initial states (the instance does not exist before its ``accept``
row; every step starts ``pending`` / ``none``) and fails at the first row that
does not continue the chain of its object and field: a source that is not the
current state (a gap, a lost row) or a (source, transition, target) that is
not an edge of the model's state machine (an illegal jump).

``assert_history_consistent(instance)`` also compares the fold with the
persisted states and checks who is recorded on every row.

``recorded_transitions()`` collects every django-fsm transition fired while
it is open (from the ``post_transition`` signal), so a test can prove that
each one has its history row, and no row lacks its transition.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

from django_fsm.signals import post_transition

from workflows_app.models import (
    ActorKind,
    CompensationState,
    StepExecution,
    StepState,
    TransitionLog,
    WorkflowInstance,
)

Key = tuple[int | None, str]  # (step id, or None for the instance; field name)

# The first row of every instance: it came to exist as ``accepted``.
ACCEPT = ("", "accept", WorkflowInstance.State.ACCEPTED)
STEP_INITIAL = {
    "state": StepState.PENDING,
    "compensation_state": CompensationState.NONE,
}
# Operator transitions may also be asked for through the API (cancel).
PERMISSIONED_ACTORS = frozenset({ActorKind.OPERATOR, ActorKind.API})


def transition_table(model: type[Any], field_name: str) -> dict[tuple[str, str], str]:
    """``{(source, transition name): target}`` of one FSM field, from django-fsm."""
    field = model._meta.get_field(field_name)
    return {(t.source, t.name): t.target for t in field.get_all_transitions(model)}


def permissions(model: type[Any], field_name: str) -> dict[tuple[str, str], Any]:
    """``{(source, transition name): permission or None}`` of one FSM field."""
    field = model._meta.get_field(field_name)
    return {(t.source, t.name): t.permission for t in field.get_all_transitions(model)}


def _edges() -> dict[Key, dict[tuple[str, str], str]]:
    """Legal edges per (object kind, field); the key's first item is only a tag."""
    return {
        (None, "state"): {
            **transition_table(WorkflowInstance, "state"),
            ACCEPT[:2]: ACCEPT[2],
        },
        (0, "state"): transition_table(StepExecution, "state"),
        (0, "compensation_state"): transition_table(
            StepExecution, "compensation_state"
        ),
    }


def _rows(instance: WorkflowInstance) -> list[TransitionLog]:
    return list(
        TransitionLog.objects.filter(instance_id=instance.pk)
        .select_related("user")
        .order_by("id")
    )


def replay(instance: WorkflowInstance) -> dict[Key, str]:
    """Fold the history of ``instance`` into ``{(step id or None, field): state}``.

    Raises ``AssertionError`` at the first row that breaks the chain. Rows with
    an empty ``field`` are notes (nothing changed) and are skipped."""
    states: dict[Key, str] = {(None, "state"): ""}
    for step_id in StepExecution.objects.filter(instance_id=instance.pk).values_list(
        "id", flat=True
    ):
        for field, initial in STEP_INITIAL.items():
            states[(step_id, field)] = initial
    edges = _edges()
    for row in _rows(instance):
        if row.field == "":
            assert row.source == row.target == "", (
                f"note #{row.id} ({row.transition}) carries a state change"
            )
            continue
        key = (row.step_id, row.field)
        assert key in states, (
            f"row #{row.id} ({row.transition}) names {key}, which is not a state "
            "field of this instance or of one of its steps"
        )
        assert row.source == states[key], (
            f"row #{row.id} {row.transition} {row.source}->{row.target} on {key}: "
            f"the history left it {states[key]!r} (a missing or extra row)"
        )
        legal = edges[(None if row.step_id is None else 0, row.field)]
        assert legal.get((row.source, row.transition)) == row.target, (
            f"row #{row.id} {row.transition} {row.source}->{row.target} on {key} "
            "is not a transition of the state machine"
        )
        states[key] = row.target
    return states


def _persisted(instance: WorkflowInstance) -> dict[Key, str]:
    fresh = WorkflowInstance.objects.get(pk=instance.pk)
    states: dict[Key, str] = {(None, "state"): fresh.state}
    for step in StepExecution.objects.filter(instance_id=instance.pk):
        states[(step.id, "state")] = step.state
        states[(step.id, "compensation_state")] = step.compensation_state
    return states


def _operator_only() -> set[str]:
    names = set()
    for model, field in (
        (WorkflowInstance, "state"),
        (StepExecution, "state"),
        (StepExecution, "compensation_state"),
    ):
        names |= {name for (_, name), perm in permissions(model, field).items() if perm}
    return names


def assert_history_consistent(instance: WorkflowInstance) -> None:
    """The history explains the persisted states, and says who did each change.

    - the first row is the ``accept`` of the instance;
    - every row continues its object's chain along a legal edge (``replay``);
    - the fold ends exactly at the persisted instance and step states;
    - operator rows name their user (and only they do), every other row names
      its actor; a permission-guarded transition is never a worker's doing.
    """
    rows = _rows(instance)
    assert rows, "an instance without history"
    first = rows[0]
    assert (first.step_id, first.field, first.source, first.transition) == (
        None,
        "state",
        "",
        "accept",
    ), f"the first row is {first}, not the acceptance"
    assert first.target == WorkflowInstance.State.ACCEPTED
    assert not [r for r in rows[1:] if r.transition == "accept"], "accepted twice"

    assert replay(instance) == _persisted(instance)

    operator_only = _operator_only()
    for row in rows:
        assert row.actor_kind in ActorKind.values, f"row #{row.id}: {row.actor_kind}"
        if row.actor_kind == ActorKind.OPERATOR:
            assert row.user_id is not None, f"operator row #{row.id} without user"
            assert row.actor_label == row.user.get_username(), f"row #{row.id}"
        else:
            assert row.user_id is None, f"{row.actor_kind} row #{row.id} has a user"
            assert row.actor_label, f"row #{row.id} does not say which {row.actor_kind}"
        if row.transition in operator_only:
            assert row.actor_kind in PERMISSIONED_ACTORS, (
                f"row #{row.id}: {row.transition} done by {row.actor_kind}"
            )


@dataclasses.dataclass(frozen=True)
class Fired:
    """One transition as django-fsm fired it, in the shape of a history row."""

    instance_id: Any
    step_id: int | None
    field: str
    source: str
    target: str
    transition: str

    @classmethod
    def of_row(cls, row: TransitionLog) -> Fired:
        return cls(
            row.instance_id,
            row.step_id,
            row.field,
            row.source,
            row.target,
            row.transition,
        )


@contextlib.contextmanager
def recorded_transitions() -> Iterator[list[Fired]]:
    """Every FSM transition fired in this process while open, in order.

    Meant for single-threaded flows: a transition fired in a transaction that
    is rolled back afterwards is recorded too."""
    fired: list[Fired] = []

    def receiver(sender: Any, instance: Any, name: str, **kwargs: Any) -> None:
        if isinstance(instance, StepExecution):
            owner, step_id = instance.instance_id, instance.pk
        else:
            owner, step_id = instance.pk, None
        fired.append(
            Fired(
                owner,
                step_id,
                kwargs["field"].name,
                kwargs["source"],
                kwargs["target"],
                name,
            )
        )

    uid = f"tests.history.recorded_transitions.{id(fired)}"
    post_transition.connect(receiver, weak=False, dispatch_uid=uid)
    try:
        yield fired
    finally:
        post_transition.disconnect(dispatch_uid=uid)


def state_rows(instance: WorkflowInstance) -> list[Fired]:
    """The history rows of ``instance`` that change a state, except ``accept``
    (the insert, not a django-fsm transition), in order."""
    return [
        Fired.of_row(row)
        for row in _rows(instance)
        if row.field and row.transition != "accept"
    ]
