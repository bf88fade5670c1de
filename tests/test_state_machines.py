"""The three FSM fields against the design's tables (DESIGN.md section 2).

The machines are read back from django-fsm (``get_all_transitions``), never
listed by hand from the code: a changed machine fails here until the expected
tables below are changed with it, deliberately. Rows are placed in a state by
passing it to the constructor (the protected fields allow that once); every
other change goes through a transition method.
"""

from __future__ import annotations

import inspect
from typing import Any

from django.contrib.auth.models import Permission
from django.test import TestCase
from django.utils import timezone
from django_fsm import TransitionNotAllowed, can_proceed, has_transition_perm

from tests.history import permissions, transition_table
from tests.support import make_definition, user_in
from workflows_app.models import (
    TERMINAL_STATES,
    AttentionKind,
    InstanceState,
    StepExecution,
    WorkflowInstance,
)
from workflows_app.roles import ROLES

APP = "workflows_app"

# -- the design's tables, as data ---------------------------------------------

# DESIGN.md section 2, instance table, one entry per (from, transition).
INSTANCE_TABLE = {
    ("accepted", "start"): "running",
    ("accepted", "cancel"): "cancelled",
    ("running", "complete"): "completed",
    ("running", "begin_compensation"): "compensating",
    # "operator: cancel" on the begin_compensation row.
    ("running", "cancel"): "compensating",
    ("running", "hold"): "needs_attention",
    ("needs_attention", "resume"): "running",
    ("needs_attention", "retry_step"): "running",
    ("needs_attention", "mark_step_done"): "running",
    ("needs_attention", "compensate"): "compensating",
    ("needs_attention", "cancel"): "compensating",
    ("compensating", "finish_compensation"): "compensated",
    ("compensating", "hold"): "needs_attention",
    ("needs_attention", "retry_compensation"): "compensating",
    ("needs_attention", "close_as_failed"): "failed",
    # Restart from an earlier step: undo the steps from there, then run again.
    ("needs_attention", "restart_from_step"): "compensating",
    ("compensating", "restart"): "running",
    # Retry with repaired data of a step that may have applied: undo it first.
    ("needs_attention", "retry_repaired_step"): "compensating",
}
INSTANCE_INITIAL = "accepted"
INSTANCE_TERMINAL = {"completed", "compensated", "cancelled", "failed"}

# The design's step list, and the edges it leaves implicit, each spelled out.
STEP_TABLE = {
    ("pending", "schedule"): "scheduled",
    ("scheduled", "begin_attempt"): "running",
    ("retrying", "begin_attempt"): "running",
    ("running", "succeed"): "succeeded",
    ("waiting", "succeed"): "succeeded",  # the awaited callback or event
    ("running", "wait"): "waiting",
    ("running", "retry"): "retrying",
    ("waiting", "retry"): "retrying",  # a callback reporting a retryable error
    ("unknown", "retry"): "retrying",  # retry_on_timeout
    ("running", "fail"): "failed",
    ("waiting", "fail"): "failed",
    ("running", "time_out"): "unknown",
    ("waiting", "time_out"): "unknown",
    ("failed", "retry_now"): "scheduled",  # operator: retry the step
    ("unknown", "retry_now"): "scheduled",
    ("failed", "mark_done"): "skipped",  # operator: done by hand
    ("unknown", "mark_done"): "skipped",
    # The instance stopped moving forward (compensation, cancel):
    ("scheduled", "unschedule"): "pending",  # not claimed yet
    ("retrying", "abandon_retry"): "failed",  # its retry will not run
    # Observed workflows: states follow the events the services report.
    ("pending", "expect"): "waiting",  # waiting for this milestone's event
    ("pending", "observe_early"): "succeeded",  # its event came out of order
    ("pending", "observe_failure"): "failed",  # a failure event
    ("waiting", "observe_failure"): "failed",
    # A restart runs the step again (a new run, new idempotency keys).
    ("succeeded", "rerun"): "pending",
    ("skipped", "rerun"): "pending",
    ("failed", "rerun"): "pending",
    ("unknown", "rerun"): "pending",
    # Timers and steps for a person: the engine waits itself, calls nothing.
    ("scheduled", "begin_wait"): "waiting",
    ("scheduled", "refuse_wait"): "failed",  # a timer whose time is unreadable
    ("waiting", "wake"): "succeeded",  # the sweeper: the timer's time came
    ("waiting", "wake_early"): "succeeded",  # operator
    ("waiting", "complete_task"): "succeeded",  # operator: a person did it
    ("waiting", "reject_task"): "failed",  # operator: a person said no
    ("waiting", "stop_waiting"): "pending",  # fenced: the instance stopped
}
STEP_INITIAL = "pending"
STEP_TERMINAL = {"succeeded", "skipped"}

COMPENSATION_TABLE = {
    ("none", "require_compensation"): "pending",
    ("none", "skip_compensation"): "not_needed",
    ("pending", "begin_compensation_attempt"): "running",
    ("retrying", "begin_compensation_attempt"): "running",
    ("running", "compensation_succeed"): "done",
    ("running", "compensation_retry"): "retrying",
    ("running", "compensation_fail"): "failed",
    ("failed", "compensation_retry_now"): "pending",  # operator
    # A restart: the new run needs its own compensation decision.
    ("done", "reopen_compensation"): "none",
    ("not_needed", "reopen_compensation"): "none",
}
COMPENSATION_INITIAL = "none"
COMPENSATION_TERMINAL = {"done", "not_needed"}

# Operator transitions and their permission; every other edge has none.
OPERATOR_PERMISSIONS = {
    WorkflowInstance: {
        "resume": f"{APP}.resume_instance",
        "retry_step": f"{APP}.retry_step",
        "mark_step_done": f"{APP}.mark_step_done",
        "compensate": f"{APP}.compensate_instance",
        "cancel": f"{APP}.cancel_instance",
        "retry_compensation": f"{APP}.retry_compensation",
        "close_as_failed": f"{APP}.close_instance",
        "restart_from_step": f"{APP}.restart_instance",
        "retry_repaired_step": f"{APP}.retry_step",
    },
    StepExecution: {
        "retry_now": f"{APP}.retry_step",
        "mark_done": f"{APP}.mark_step_done",
        "compensation_retry_now": f"{APP}.retry_compensation",
        "wake_early": f"{APP}.operate_timer",
        "complete_task": f"{APP}.complete_human_step",
        "reject_task": f"{APP}.complete_human_step",
    },
}

FORWARD_BLOCKED = {"step_failed", "step_unknown", "after_pivot", "pivot_uncertain"}
ALL_KINDS = set(AttentionKind.values)
# Guarded instance edges: the attention kinds that allow them, and whether a
# passed pivot refuses them. Every edge not listed has no condition.
GUARDS = {
    ("needs_attention", "resume"): ({"deadline"}, False),
    ("needs_attention", "retry_step"): (FORWARD_BLOCKED, False),
    ("needs_attention", "mark_step_done"): (FORWARD_BLOCKED, False),
    ("needs_attention", "compensate"): (ALL_KINDS - {"compensation_failed"}, True),
    ("needs_attention", "cancel"): (ALL_KINDS - {"compensation_failed"}, True),
    ("running", "cancel"): (ALL_KINDS - {"compensation_failed"}, True),
    ("needs_attention", "retry_compensation"): ({"compensation_failed"}, False),
    ("needs_attention", "restart_from_step"): (FORWARD_BLOCKED, True),
    ("needs_attention", "retry_repaired_step"): (FORWARD_BLOCKED, True),
}

# Fields that satisfy the guard of a transition, so that only the state decides.
ENABLING = {
    "resume": {"attention_kind": AttentionKind.DEADLINE},
    "retry_step": {"attention_kind": AttentionKind.STEP_FAILED},
    "mark_step_done": {"attention_kind": AttentionKind.STEP_UNKNOWN},
    "compensate": {"attention_kind": AttentionKind.STEP_FAILED},
    "cancel": {"attention_kind": AttentionKind.STEP_FAILED},
    "retry_compensation": {"attention_kind": AttentionKind.COMPENSATION_FAILED},
    "restart_from_step": {"attention_kind": AttentionKind.STEP_FAILED},
    "retry_repaired_step": {"attention_kind": AttentionKind.STEP_FAILED},
}

# Arguments for transition methods, by parameter name.
SAMPLE_ARGS = {
    "kind": AttentionKind.STEP_FAILED,
    "reason": "a reason",
    "output": {"ref": "x-1"},
    "error": "Boom: it broke",
    "extra_attempts": 2,
    "position": 1,
    "max_attempts": 3,
    "new_keys": True,
    "permanent": False,
    "wake_at": None,
    "deadline": None,
}

RESTART_EDGES = {"rerun", "reopen_compensation"}

MACHINES = [
    (WorkflowInstance, "state", INSTANCE_TABLE, INSTANCE_INITIAL, INSTANCE_TERMINAL),
    (StepExecution, "state", STEP_TABLE, STEP_INITIAL, STEP_TERMINAL),
    (
        StepExecution,
        "compensation_state",
        COMPENSATION_TABLE,
        COMPENSATION_INITIAL,
        COMPENSATION_TERMINAL,
    ),
]


def call(obj: Any, name: str) -> Any:
    """Call transition ``name`` on ``obj`` with sample arguments."""
    method = getattr(obj, name)
    params = list(inspect.signature(method).parameters)
    return method(*[SAMPLE_ARGS[p] for p in params])


def names(model: type[Any], field: str) -> set[str]:
    return {name for _, name in transition_table(model, field)}


def states(model: type[Any], field: str) -> set[str]:
    return {value for value, _ in model._meta.get_field(field).choices}


class MachineTablesTest(TestCase):
    """The machines are exactly the design's tables."""

    def test_tables_equal_the_design(self):
        for model, field, expected, _, _ in MACHINES:
            with self.subTest(model=model.__name__, field=field):
                assert transition_table(model, field) == expected

    def test_states_initial_and_terminal(self):
        assert states(WorkflowInstance, "state") == set(InstanceState.values)
        assert set(TERMINAL_STATES) == INSTANCE_TERMINAL
        for model, field, table, initial, terminal in MACHINES:
            with self.subTest(model=model.__name__, field=field):
                all_states = states(model, field)
                sources = {source for source, _ in table}
                targets = set(table.values())
                assert model._meta.get_field(field).default == initial
                assert (sources | targets) <= all_states
                # Every state but the initial one is reachable...
                assert all_states - {initial} <= targets
                # ...and exactly the terminal ones have no way out (but an
                # operator's restart, which runs a finished step again).
                ways_out = {src for src, name in table if name not in RESTART_EDGES}
                assert all_states - ways_out == terminal
                assert model._meta.get_field(field).protected

    def test_only_operator_transitions_carry_a_permission(self):
        for model, field, _, _, _ in MACHINES:
            expected = OPERATOR_PERMISSIONS[model]
            with self.subTest(model=model.__name__, field=field):
                for (source, name), perm in permissions(model, field).items():
                    assert perm == expected.get(name), (source, name, perm)

    def test_permissions_exist_and_belong_to_the_operator_role(self):
        codenames = {
            perm.split(".", 1)[1]
            for table in OPERATOR_PERMISSIONS.values()
            for perm in table.values()
        }
        found = set(
            Permission.objects.filter(
                content_type__app_label=APP, codename__in=codenames
            ).values_list("codename", flat=True)
        )
        assert found == codenames
        assert codenames <= set(ROLES["operator"])
        assert not codenames & set(ROLES["viewer"])
        assert not codenames & set(ROLES["workflow admin"])

    def test_guarded_edges(self):
        conditioned = {
            (t.source, t.name)
            for t in WorkflowInstance._meta.get_field("state").get_all_transitions(
                WorkflowInstance
            )
            if t.conditions
        }
        assert conditioned == set(GUARDS)
        for field in ("state", "compensation_state"):
            for t in StepExecution._meta.get_field(field).get_all_transitions(
                StepExecution
            ):
                assert not t.conditions, t.name


class Placing:
    """Rows placed in a given state through the constructor."""

    definition: Any
    parent: WorkflowInstance
    _position = 0

    @classmethod
    def setUpTestData(cls):
        cls.definition = make_definition()
        cls.step_definition = cls.definition.steps.get(position=1)
        cls.parent = cls.make_instance()

    @classmethod
    def make_instance(cls, **fields: Any) -> WorkflowInstance:
        now = timezone.now()
        created = WorkflowInstance.objects.create(
            definition=cls.definition,
            definition_key=cls.definition.key,
            business_key="order-1",
            input_fingerprint="-",
            accepted_at=now,
            last_progress_at=now,
            **fields,
        )
        return WorkflowInstance.objects.get(pk=created.pk)

    def make_step(self, **fields: Any) -> StepExecution:
        Placing._position += 1
        created = StepExecution.objects.create(
            instance=self.parent,
            step_definition=self.step_definition,
            position=Placing._position,
            name=f"s{Placing._position}",
            **fields,
        )
        return StepExecution.objects.get(pk=created.pk)

    def place(self, model: type[Any], field: str, state: str, name: str) -> Any:
        """A row loaded from the database in ``state``, with ``name``'s guard met."""
        if model is WorkflowInstance:
            return self.make_instance(state=state, **ENABLING.get(name, {}))
        return self.make_step(**{field: state})


class TransitionsTest(Placing, TestCase):
    """Every allowed edge lands on its target; every other pair is refused."""

    def test_every_allowed_edge(self):
        for model, field, table, _, _ in MACHINES:
            for (source, name), target in table.items():
                with self.subTest(model=model.__name__, source=source, name=name):
                    obj = self.place(model, field, source, name)
                    assert can_proceed(getattr(obj, name))
                    call(obj, name)
                    assert getattr(obj, field) == target
                    obj.save()
                    assert getattr(model.objects.get(pk=obj.pk), field) == target

    def test_every_other_pair_is_refused(self):
        refused = 0
        for model, field, table, _, _ in MACHINES:
            for state in sorted(states(model, field)):
                for name in sorted(names(model, field)):
                    if (state, name) in table:
                        continue
                    with self.subTest(model=model.__name__, state=state, name=name):
                        obj = self.place(model, field, state, name)
                        assert not can_proceed(getattr(obj, name))
                        with self.assertRaisesMessage(
                            TransitionNotAllowed,
                            f"Can't switch from state '{state}' using method '{name}'",
                        ):
                            call(obj, name)
                        assert getattr(obj, field) == state
                        refused += 1
        # (states x transitions - edges) per field: every pair was tried.
        assert refused == (8 * 15 - 18) + (9 * 22 - 34) + (7 * 8 - 10)

    def test_transitions_of_one_step_field_leave_the_other_alone(self):
        step = self.make_step(state="running", compensation_state="none")
        step.fail("Boom")
        assert (step.state, step.compensation_state) == ("failed", "none")
        step.require_compensation()
        assert (step.state, step.compensation_state) == ("failed", "pending")


class GuardsTest(Placing, TestCase):
    """Conditions: which attention kinds and pivots allow each operator edge."""

    def test_guards(self):
        for (source, name), (kinds, refused_after_pivot) in GUARDS.items():
            # Outside needs_attention the attention kind is always cleared.
            tried_kinds = ALL_KINDS if source == "needs_attention" else {""}
            for kind in sorted(tried_kinds):
                for pivot_passed in (False, True):
                    # An uncertain pivot may not have applied: a person may
                    # still choose to undo.
                    # (A restart reruns steps under new keys: never then.)
                    expected = kind in kinds and not (
                        pivot_passed
                        and refused_after_pivot
                        and (kind != "pivot_uncertain" or name == "restart_from_step")
                    )
                    with self.subTest(
                        source=source, name=name, kind=kind, pivot=pivot_passed
                    ):
                        obj = self.make_instance(
                            state=source, attention_kind=kind, pivot_passed=pivot_passed
                        )
                        assert can_proceed(getattr(obj, name)) is expected
                        if expected:
                            call(obj, name)
                            assert obj.state == INSTANCE_TABLE[(source, name)]
                            assert obj.attention_kind == ""
                        else:
                            with self.assertRaisesMessage(
                                TransitionNotAllowed,
                                "Transition conditions have not been met for "
                                f"method '{name}'",
                            ):
                                call(obj, name)
                            assert (obj.state, obj.attention_kind) == (source, kind)

    def test_named_rules(self):
        held = self.make_instance
        # retry_step needs a blocked forward path.
        for kind in ("step_failed", "step_unknown", "after_pivot", "pivot_uncertain"):
            assert can_proceed(
                held(state="needs_attention", attention_kind=kind).retry_step
            )
        for kind in ("deadline", "compensation_failed"):
            assert not can_proceed(
                held(state="needs_attention", attention_kind=kind).retry_step
            )
        # Nothing is undone once the pivot was passed.
        past = held(
            state="needs_attention", attention_kind="after_pivot", pivot_passed=True
        )
        assert not can_proceed(past.compensate)
        assert not can_proceed(past.cancel)
        assert not can_proceed(held(state="running", pivot_passed=True).cancel)
        # An uncertain pivot: both ways stay open.
        unsure = held(
            state="needs_attention", attention_kind="pivot_uncertain", pivot_passed=True
        )
        assert can_proceed(unsure.retry_step)
        assert can_proceed(unsure.compensate)
        assert not can_proceed(unsure.restart_from_step)
        # ...but an accepted instance can always be cancelled.
        assert can_proceed(held(state="accepted", pivot_passed=True).cancel)
        # retry_compensation only after a held compensation, which is not redone
        # by compensate.
        comp = held(state="needs_attention", attention_kind="compensation_failed")
        assert can_proceed(comp.retry_compensation)
        assert not can_proceed(comp.compensate)
        assert not can_proceed(
            held(
                state="needs_attention", attention_kind="step_failed"
            ).retry_compensation
        )
        # close_as_failed is always possible from needs_attention.
        for kind in sorted(ALL_KINDS):
            assert can_proceed(
                held(state="needs_attention", attention_kind=kind).close_as_failed
            )


class PermissionsTest(Placing, TestCase):
    """has_transition_perm: viewers may not, operators may, on every operator edge."""

    @classmethod
    def setUpTestData(cls):
        super().setUpTestData()
        cls.viewer = user_in("viewer")
        cls.operator = user_in("operator")
        cls.admin = user_in("workflow admin", "admin")

    def test_operator_edges(self):
        checked = 0
        for model, field, table, _, _ in MACHINES:
            perms = permissions(model, field)
            for (source, name), _target in table.items():
                if not perms[(source, name)]:
                    continue
                with self.subTest(model=model.__name__, source=source, name=name):
                    obj = self.place(model, field, source, name)
                    bound = getattr(obj, name)
                    assert can_proceed(bound)
                    assert not has_transition_perm(bound, self.viewer)
                    assert not has_transition_perm(bound, self.admin)
                    assert has_transition_perm(bound, self.operator)
                    checked += 1
        # 11 instance edges (cancel has three), 5 step edges, and the 3 of
        # timers and steps for a person.
        assert checked == 19

    def test_engine_edges_need_no_permission(self):
        for model, field, table, _, _ in MACHINES:
            perms = permissions(model, field)
            for (source, name), _target in table.items():
                if perms[(source, name)]:
                    continue
                with self.subTest(model=model.__name__, source=source, name=name):
                    obj = self.place(model, field, source, name)
                    assert has_transition_perm(getattr(obj, name), self.viewer)


class ProtectedFieldsTest(Placing, TestCase):
    """No code can assign a state: only transitions change it."""

    def test_direct_assignment_is_refused(self):
        instance = self.make_instance(state="running")
        step = self.make_step(state="running", compensation_state="none")
        cases = [
            (instance, "state", "completed"),
            (step, "state", "succeeded"),
            (step, "compensation_state", "done"),
        ]
        for obj, field, value in cases:
            with self.subTest(model=type(obj).__name__, field=field):
                before = getattr(obj, field)
                with self.assertRaisesMessage(
                    AttributeError, f"Direct {field} modification is not allowed"
                ):
                    setattr(obj, field, value)
                assert getattr(obj, field) == before
                fresh = type(obj).objects.get(pk=obj.pk)
                assert getattr(fresh, field) == before

    def test_refresh_from_db_still_works(self):
        instance = self.make_instance(state="running")
        other = WorkflowInstance.objects.get(pk=instance.pk)
        other.complete()
        other.save()
        instance.refresh_from_db()
        assert instance.state == "completed"
        with self.assertRaises(AttributeError):
            instance.state = "running"
