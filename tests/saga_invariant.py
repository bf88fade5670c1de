"""The saga correctness invariant (``SAGA_INVARIANT.md``) as an executable checker.

The engine's history (``TransitionLog``) is mapped onto the invariant's events:

=====================================  =============================================
history row                            event
=====================================  =============================================
instance ``accept``                    ``WF_CREATED``
instance ``start``                     ``WF_STARTED``
instance ``begin_compensation``        ``WF_COMPENSATING``
instance ``complete``                  ``WF_COMPLETED``
instance ``finish_compensation``       ``WF_COMPENSATED``
instance ``hold``                      ``WF_NEEDS_ATTENTION``
instance ``restart``                   ``WF_RESTARTED`` (a restart's undo is done)
instance ``close_as_failed``           ``WF_FAILED`` (``MANUAL_CLOSE_AS_FAILED``)
instance, a transition with a          ``MANUAL_<NAME>`` (``MANUAL_RETRY_STEP``,
permission (operator action)           ``MANUAL_COMPENSATE``, ``MANUAL_CANCEL`` ...)
step ``state`` ``schedule``            ``STEP_SCHEDULED(i)``
step ``state`` ``retry_now``           ``STEP_SCHEDULED(i)`` (manual)
step ``state`` ``begin_attempt``       ``STEP_STARTED(i, a)``, ``a = data["attempt"]``
step ``state`` ``succeed`` / ``wait``  ``STEP_SUCCEEDED(i, a)`` / ``STEP_WAITING``
step ``state`` ``fail`` / ``retry``    ``STEP_FAILED(i, a, for good|retryable)``
step ``state`` ``time_out``            ``STEP_TIMED_OUT(i, a)``
step ``state`` ``mark_done``           ``STEP_SKIPPED(i)`` (manual: done by hand)
step ``state`` ``rerun``               ``STEP_RERUN(i)``: run ``r + 1`` of step ``i``
step ``state`` ``begin_wait``          ``STEP_WAIT_BEGUN(i)`` (timer / for a person)
step ``state`` ``wake`` / ``wake_early``  ``TIMER_WOKEN(i)`` (``manual``: an operator)
step ``state`` ``complete_task``       ``HUMAN_DONE(i, manual)``
step ``state`` ``refuse_wait`` /       ``STEP_FAILED(i, for good)``
``reject_task``
step ``state`` ``stop_waiting``        ``STEP_WAIT_FENCED(i)``
``compensation_state`` transitions     ``COMP_SCHEDULED`` / ``COMP_STARTED`` /
                                       ``COMP_SUCCEEDED`` / ``COMP_FAILED`` /
                                       ``COMP_NOT_NEEDED`` / ``COMP_REOPENED``
note ``message_ignored``               ``DUPLICATE_IGNORED``
note ``stale_outcome_ignored``         ``CALLBACK_IGNORED(stale)``
note ``flag_stuck``                    ``STUCK_FLAGGED``
note ``alert_opened`` / ``_resolved``  ``ALERT_SENT`` / ``ALERT_RESOLVED``
note ``late_outcome_ignored``          ``LATE_OUTCOME_IGNORED`` (after the outcome)
=====================================  =============================================

The ledger is the demo participants' ``ParticipantEffect`` table: one row per
idempotency key with ``applied``, the raw call count and the first-applied
time, never read by the engine.

Restarts (an extension of the spec, which knows one run per step): an
operator's ``restart_from_step`` (``MANUAL_RESTART_FROM_STEP``) undoes the
steps from a restart point, then each of them runs again as run 2, 3...
with new idempotency keys (``...:action:2``). Everything counted per step
(claims, successes, effects) is counted per ``(step, run)``; the word of
G is taken over each step's last run, and every earlier run of a step with
a compensation must have been undone (effT = effC for that run).
A retry after a repair of the data (``MANUAL_RETRY_STEP`` with ``repaired``)
is a new run of the blocked step too: at once (``STEP_RERUN`` right after
it) when its last answer was a permanent failure, else after undoing it
(``MANUAL_RETRY_REPAIRED_STEP``: a restart from the blocked step itself, no
restart point needed).

mayApply(i) (spec S6): the step's current run was started (a claim) or done
by hand, and its last answer was not a permanent failure (a ``fail`` row
with ``data["permanent"]``; a claim, a rerun or a mark-done clear it).
Succeeded, unknown, retryably failed (also out of attempts or a retry
abandoned) all may have applied.

What is checked (rule names as in the spec; "fold" = the state replayed from
the history so far):

- S1: the history starts with ``WF_CREATED``; every row continues its object's
  fold (source = folded state) along an edge of the django-fsm table derived
  from the models; notes change nothing; with ``replay`` the persisted states
  and attempt counters equal the fold.
- S2: no state change after a terminal outcome (completed, compensated,
  cancelled, failed): only notes; at most one outcome. ``WF_FAILED`` (an
  operator closed it) fences open work before its own row: no action in
  flight, scheduled or retrying and no compensation under way at that row.
  A late outcome (``LATE_OUTCOME_IGNORED``) only after the outcome; one
  reporting an effect of an attempt the close abandoned has a
  ``late_effect`` alert, which only a person ends (acknowledging it).
  "No effect after the close the engine could have prevented" follows from
  S2 (no claim after the outcome) and S12 (no call without a claim).
- S3: forward work (schedule, claim) only while the fold says ``running``,
  never after ``WF_COMPENSATING`` (unless a ``WF_RESTARTED`` ended that
  compensation, with every step from the restart point reset), and step
  ``i`` only after step ``i-1`` is done (succeeded, or skipped by an
  operator: "done by hand"); step resets only during a restart (or a
  repaired retry); an action failure is final (no ``retry``) while
  compensating, and retried while held (a hold keeps the retry budget).
- S4: attempt numbers go 1, 2, ...; a claim only when no attempt of the step
  and direction is open; an outcome row names the open attempt.
- S5: at most one applied effect per step, run and direction (a step without
  a compensation keeps its keys when restarted, so at most one ever).
- S6: compensation only while ``compensating``, only of mayApply steps
  before the pivot that have a compensation (during a restart: only from
  the restart point on); a mayApply one is never skipped; no
  ``WF_COMPENSATING`` once a step after the pivot started, nor by the engine
  once the pivot mayApply (the pivot is passed); an operator may compensate
  an uncertain pivot (unknown, or failed retryably), never a succeeded one.
- S7 (stronger than the spec's pairwise form): a compensation is scheduled or
  started only when every later step's compensation is done or not needed,
  and no action is in flight; a step runs again under new keys only once
  undone (if its run mayApply), and all effects of a run precede those of
  the next run.
- S8, S9: ``WF_COMPENSATED`` / ``WF_COMPLETED`` as in the spec (S8 over the
  mayApply steps before the pivot).
- S10: operator rows have a user; a permissioned (manual) transition is made
  by an operator with a user or a named API client.
- S12: no effect (and no raw call) without a claim: raw calls <= claims;
  ``STEP_SUCCEEDED`` => effT = 1; ``COMP_SUCCEEDED`` => effT = effC; an undo
  never applies without its action, nor before it.
- L1 (safety part): a hold needs a failed/unknown step or a failed
  compensation (or a passed deadline); hold alerts open and resolve
  alternately, one per incident (``late_effect`` alerts are counted apart).
- At quiescence: L1 (completed, compensated, cancelled before any step ran,
  failed by an operator, or needs_attention with an open alert) and G over
  the ledger's word (for completed and compensated only: ``failed`` is
  neither, a person took it over).

Timers and steps for a person (``StepSpec.kind`` ``timer`` / ``human``) are
done by the engine itself: they never claim an attempt, have no
compensation and no ledger rows. Their wait begins only as forward work
(S3), ends only while the instance runs or is held (never after
``WF_COMPENSATING``), and is fenced (``STEP_WAIT_FENCED``) only when the
instance stopped moving forward; G's word is taken over the activity steps.

Not checked here: S11 (callbacks; the property test asserts replays itself)
and the timing bounds of L3 (the property test drives with a round bound).

:func:`check_history` works on plain values, so hand-made histories can prove
that each rule really fires; :func:`check_instance` loads an instance from the
database and checks it. Both raise ``AssertionError`` naming every violated
rule, followed by a dump of the history and the ledger.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from workflows_app.demo.models import ParticipantEffect
from workflows_app.models import (
    ActorKind,
    StepDefinition,
    StepExecution,
    TransitionLog,
    WorkflowInstance,
)

ACTION = "action"
COMPENSATION = "compensation"
TERMINAL = frozenset({"completed", "compensated", "cancelled", "failed"})
STEP_DONE = frozenset({"succeeded", "skipped"})
IN_FLIGHT = frozenset({"running", "waiting"})
COMP_RESOLVED = frozenset({"done", "not_needed"})
# Action outcomes that close the open attempt (``wait`` keeps it open).
ACTION_OUTCOMES = frozenset({"succeed", "fail", "time_out", "retry"})
COMP_OUTCOMES = frozenset(
    {"compensation_succeed", "compensation_retry", "compensation_fail"}
)
NOTE_KINDS = {
    "message_ignored": "DUPLICATE_IGNORED",
    "stale_outcome_ignored": "CALLBACK_IGNORED(stale)",
    "flag_stuck": "STUCK_FLAGGED",
    "alert_opened": "ALERT_SENT",
    "alert_resolved": "ALERT_RESOLVED",
    "late_outcome_ignored": "LATE_OUTCOME_IGNORED",
}
LATE_EFFECT = "late_effect"
# Open work that ``close_as_failed`` fences before its own row.
OPEN_ACTION = frozenset({"running", "waiting", "scheduled", "retrying"})
OPEN_COMPENSATION = frozenset({"pending", "running", "retrying"})
# Transitions into ``compensating`` that undo part of the run, then go on.
RESTARTS = frozenset({"restart_from_step", "retry_repaired_step"})
STEP_KINDS = {
    "schedule": ("STEP_SCHEDULED", ""),
    "retry_now": ("STEP_SCHEDULED", "manual"),
    "begin_attempt": ("STEP_STARTED", ""),
    "succeed": ("STEP_SUCCEEDED", ""),
    "wait": ("STEP_WAITING", ""),
    "fail": ("STEP_FAILED", "for good"),
    "retry": ("STEP_FAILED", "retryable"),
    "time_out": ("STEP_TIMED_OUT", ""),
    "mark_done": ("STEP_SKIPPED", "manual"),
    "unschedule": ("STEP_UNSCHEDULED", ""),
    "abandon_retry": ("STEP_RETRY_ABANDONED", ""),
    "require_compensation": ("COMP_SCHEDULED", ""),
    "compensation_retry_now": ("COMP_SCHEDULED", "manual"),
    "begin_compensation_attempt": ("COMP_STARTED", ""),
    "compensation_succeed": ("COMP_SUCCEEDED", ""),
    "compensation_retry": ("COMP_FAILED", "retryable"),
    "compensation_fail": ("COMP_FAILED", "for good"),
    "skip_compensation": ("COMP_NOT_NEEDED", ""),
    "rerun": ("STEP_RERUN", "restart"),
    "reopen_compensation": ("COMP_REOPENED", "restart"),
    "begin_wait": ("STEP_WAIT_BEGUN", ""),
    "refuse_wait": ("STEP_FAILED", "for good"),
    "wake": ("TIMER_WOKEN", ""),
    "wake_early": ("TIMER_WOKEN", "manual"),
    "complete_task": ("HUMAN_DONE", "manual"),
    "reject_task": ("STEP_FAILED", "for good, manual"),
    "stop_waiting": ("STEP_WAIT_FENCED", ""),
}
# Transitions of the steps the engine does itself (timers, for a person).
WAIT_ENDS = frozenset({"wake", "wake_early", "complete_task", "reject_task"})
ENGINE_STEP_TRANSITIONS = WAIT_ENDS | {"begin_wait", "refuse_wait", "stop_waiting"}
INSTANCE_KINDS = {
    "accept": "WF_CREATED",
    "start": "WF_STARTED",
    "begin_compensation": "WF_COMPENSATING",
    "complete": "WF_COMPLETED",
    "finish_compensation": "WF_COMPENSATED",
    "hold": "WF_NEEDS_ATTENTION",
    "restart": "WF_RESTARTED",
    "close_as_failed": "WF_FAILED",
}


# -- plain values the checker works on -----------------------------------------


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """A step of the pinned definition version."""

    position: int
    name: str
    has_compensation: bool = True
    is_pivot: bool = False
    restart_point: bool = False
    kind: str = "activity"  # "timer" / "human": done by the engine, no effect
    # Parallel branches: the position of the first step of the step's stage;
    # None: a stage of its own (a sequential step).
    stage: int | None = None

    @property
    def stage_key(self) -> int:
        return self.position if self.stage is None else self.stage


@dataclasses.dataclass(frozen=True)
class Row:
    """One history row (``TransitionLog``); ``position`` is None on instance rows."""

    seq: int
    position: int | None
    field: str
    source: str
    target: str
    transition: str
    actor_kind: str = ActorKind.WORKER
    actor_label: str = ""
    user_id: int | None = None
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    reason: str = ""
    at: datetime | None = None  # the database clock (``created_at``)


# Each field of a Row, and the TransitionLog column (in ``values()``) it is read from.
HISTORY_COLUMNS = {
    field.name: {"seq": "id", "position": "step__position", "at": "created_at"}.get(
        field.name, field.name
    )
    for field in dataclasses.fields(Row)
}


@dataclasses.dataclass(frozen=True)
class Effect:
    """One ledger row of a participant, keyed by idempotency key."""

    step_name: str
    direction: str  # "action" | "compensation"
    key: str
    applied: bool
    calls: int
    late_refused: int = 0
    first_applied_at: datetime | None = None
    order: int = 0  # tie-breaker: the ledger's insertion order


@dataclasses.dataclass(frozen=True)
class StepColumns:
    state: str
    compensation_state: str
    attempt: int
    compensation_attempt: int
    run: int = 1
    last_failure_permanent: bool = False


@dataclasses.dataclass(frozen=True)
class Persisted:
    """The status columns of an instance and its steps, as stored."""

    state: str
    steps: Mapping[int, StepColumns]
    restart_position: int | None = None


@dataclasses.dataclass
class Recorded:
    """Everything the checker reads about one instance."""

    steps: list[StepSpec]
    rows: list[Row]
    ledger: list[Effect]
    persisted: Persisted | None = None


# -- the FSM transition table, derived from the models -------------------------

Table = dict[tuple[str, str, str, str], str]


@functools.cache
def fsm_table() -> tuple[Table, frozenset[tuple[str, str]]]:
    """``(scope, field, transition, source) -> target`` for every django-fsm
    transition of the runtime models, and the ``(scope, transition)`` pairs that
    need a permission (operator actions)."""
    table: Table = {}
    manual: set[tuple[str, str]] = set()
    for scope, model in (("instance", WorkflowInstance), ("step", StepExecution)):
        for field in model._meta.get_fields():
            transitions = getattr(field, "get_all_transitions", None)
            if transitions is None:
                continue
            for t in transitions(model):
                assert t.source != "*", "wildcard sources are not modelled"
                table[(scope, field.name, t.name, t.source)] = t.target
                if t.permission:
                    manual.add((scope, t.name))
    return table, frozenset(manual)


# -- the checker -------------------------------------------------------------------


def event_kind(row: Row, manual: frozenset[tuple[str, str]] | None = None) -> str:
    if not row.field:
        return NOTE_KINDS.get(row.transition, f"NOTE({row.transition})")
    if row.position is not None:
        kind, qualifier = STEP_KINDS.get(row.transition, (row.transition.upper(), ""))
        args = [str(row.position)]
        if row.data.get("attempt"):
            args.append(f"a={row.data['attempt']}")
        if qualifier:
            args.append(qualifier)
        return f"{kind}({', '.join(args)})"
    if manual is not None and ("instance", row.transition) in manual:
        return f"MANUAL_{row.transition.upper()}"
    return INSTANCE_KINDS.get(row.transition, row.transition.upper())


class _Fold:
    """The reducer's state while folding the history.

    A restart makes a step run again as run 2, 3...; what is counted per run
    (claims, successes) is keyed by ``(position, run)``."""

    def __init__(self, positions: Iterable[int]) -> None:
        self.instance: str | None = None
        self.state = dict.fromkeys(positions, "pending")
        self.comp = dict.fromkeys(positions, "none")
        self.attempt = dict.fromkeys(self.state, 0)
        self.comp_attempt = dict.fromkeys(self.state, 0)
        self.run = dict.fromkeys(self.state, 1)
        self.open: dict[tuple[int, str], int | None] = {}
        self.starts: Counter[tuple[int, int]] = Counter()
        self.comp_starts: Counter[tuple[int, int]] = Counter()
        self.succeeded: set[tuple[int, int]] = set()
        self.comp_succeeded: set[tuple[int, int]] = set()
        self.compensating_since: int | None = None
        # Set by MANUAL_RESTART_FROM_STEP until WF_RESTARTED: only the steps
        # from this position on are undone, then they run again.
        self.restart_from: int | None = None
        self.restarted = False  # a WF_RESTARTED was seen
        self.terminal: tuple[str, int] | None = None
        self.outcomes: list[str] = []
        self.alert_open = False  # a hold's alert (one per incident)
        # Late-effect alerts by id (None: opened without an id), and the
        # late outcomes that reported an effect of an abandoned attempt.
        self.late_alerts: set[Any] = set()
        self.late_alerts_opened = 0
        self.late_effects_reported: list[Row] = []
        # Attempts the close fenced: (position, attempt number).
        self.abandoned: set[tuple[int, Any]] = set()
        # The last answer of the current run was a permanent failure.
        self.permanent = dict.fromkeys(positions, False)
        # A repaired retry of this step (MANUAL_RETRY_STEP with "repaired")
        # may rerun it at once in the same change.
        self.repaired_retry: int | None = None

    def current(self, position: int) -> tuple[int, int]:
        return position, self.run[position]

    def started(self, position: int) -> bool:
        """Started in its current run: the step may have had an effect."""
        return self.starts[self.current(position)] > 0

    def may_apply(self, position: int) -> bool:
        """mayApply: started in its current run (or done by hand) and not
        answered with a permanent failure since its last claim."""
        done_by_hand = self.state[position] == "skipped"
        return (self.started(position) or done_by_hand) and not self.permanent[position]


class _Checker:
    def __init__(self, recorded: Recorded) -> None:
        self.rec = recorded
        self.table, self.manual = fsm_table()
        self.specs = {s.position: s for s in recorded.steps}
        self.by_name = {s.name: s for s in recorded.steps}
        pivots = [s.position for s in recorded.steps if s.is_pivot]
        self.pivot = pivots[0] if pivots else None
        self.fold = _Fold(self.specs)
        self.violations: list[str] = []
        # Parallel stages: the partial order replaces the total one.
        self.parallel = any(
            s.stage is not None and s.stage != s.position for s in recorded.steps
        )

    def stage(self, position: int) -> int:
        return self.specs[position].stage_key

    def previous_stage(self, position: int) -> list[int]:
        """The positions of the stage right before ``position``'s."""
        mine = self.stage(position)
        before = [s.stage_key for s in self.specs.values() if s.stage_key < mine]
        if not before:
            return []
        last = max(before)
        return [p for p, spec in self.specs.items() if spec.stage_key == last]

    def fail(self, rule: str, message: str, row: Row | None = None) -> None:
        where = f" at #{row.seq} {event_kind(row, self.manual)}" if row else ""
        self.violations.append(f"{rule}{where}: {message}")

    def before_pivot(self, position: int) -> bool:
        return self.pivot is None or position < self.pivot

    def needs_compensation(self, position: int) -> bool:
        return (
            self.specs[position].has_compensation
            and self.fold.may_apply(position)
            and self.before_pivot(position)
        )

    # -- S1..S10: every prefix, one event at a time ---------------------------
    def run(self) -> None:
        for index, row in enumerate(self.rec.rows):
            if index == 0 and not (row.transition == "accept" and row.position is None):
                self.fail("S1", "the history does not start with WF_CREATED", row)
            if not row.field:
                self._note(row)
                continue
            self._check_actor(row)
            if self.fold.terminal is not None:
                state, seq = self.fold.terminal
                self.fail(
                    "S2", f"state changed after the outcome {state} (#{seq})", row
                )
            if row.position is None:
                self._instance_row(row)
            elif row.position not in self.specs:
                self.fail("S1", f"step {row.position} is not in the definition", row)
            else:
                self._step_row(row)
        self._check_late_alerts()

    def _check_late_alerts(self) -> None:
        """An effect reported for an attempt the close abandoned has its
        ``late_effect`` alert (opened in the same change as the note)."""
        fold = self.fold
        if fold.late_effects_reported and not fold.late_alerts_opened:
            first = fold.late_effects_reported[0]
            self.fail(
                "S2", "an effect reported after the close without an alert", first
            )

    def _note(self, row: Row) -> None:
        if row.source or row.target:
            self.fail("S1", "a note carries a state change", row)
        fold = self.fold
        alert = row.data.get("alert")
        # L1: exactly one alert per incident, so never a second one while the
        # first is open. Late-effect alerts are not incidents of a hold.
        if row.transition == "alert_opened" and row.data.get("kind") == LATE_EFFECT:
            fold.late_alerts.add(alert)
            fold.late_alerts_opened += 1
        elif row.transition == "alert_opened":
            if fold.alert_open:
                self.fail("L1", "a second alert while one is open", row)
            fold.alert_open = True
        elif row.transition == "alert_resolved" and alert in fold.late_alerts:
            self.fail("S2", "a late-effect alert ended without a person", row)
            fold.late_alerts.discard(alert)
        elif row.transition == "alert_resolved":
            if not fold.alert_open:
                self.fail("L1", "an alert resolved that was not open", row)
            fold.alert_open = False
        elif row.transition == "alert_acknowledged" and (
            row.data.get("kind") == LATE_EFFECT
        ):
            fold.late_alerts.discard(alert)
            fold.late_alerts.discard(None)
        elif row.transition == "late_outcome_ignored":
            self._late_outcome(row)

    def _late_outcome(self, row: Row) -> None:
        """A worker, callback, event or sweep reported on a closed instance."""
        fold = self.fold
        if fold.terminal is None:
            self.fail("S2", "a late outcome before the instance's outcome", row)
            return
        if (
            row.data.get("outcome") == "succeeded"
            and row.data.get("direction", ACTION) == ACTION
            and (row.position, row.data.get("attempt")) in fold.abandoned
        ):
            fold.late_effects_reported.append(row)

    def _check_actor(self, row: Row) -> None:
        scope = "instance" if row.position is None else "step"
        if row.actor_kind == ActorKind.OPERATOR and row.user_id is None:
            self.fail("S10", "an operator row has no user", row)
        if (scope, row.transition) not in self.manual:
            return
        # A manual action is attributed: an operator with a user, or an API
        # client (cancel may be asked for through the API) with its name.
        attributed = (
            row.actor_kind == ActorKind.OPERATOR and row.user_id is not None
        ) or (row.actor_kind == ActorKind.API and bool(row.actor_label))
        if not attributed:
            self.fail("S10", f"manual action by {row.actor_kind}, unattributed", row)

    def _legal(self, row: Row, scope: str, current: str | None) -> bool:
        if current != row.source:
            self.fail(
                "S1",
                f"source {row.source!r} but the fold says {current!r}",
                row,
            )
            return False
        target = self.table.get((scope, row.field, row.transition, row.source))
        if target != row.target:
            self.fail(
                "S1",
                f"illegal transition {row.transition} {row.source}->{row.target}",
                row,
            )
            return False
        return True

    def _instance_row(self, row: Row) -> None:
        fold = self.fold
        if row.transition == "accept":
            if fold.instance is not None or row.source or row.target != "accepted":
                self.fail("S1", "a second or malformed WF_CREATED", row)
            fold.instance = row.target
            return
        if not self._legal(row, "instance", fold.instance):
            fold.instance = row.target
            return
        target = row.target
        fold.repaired_retry = None  # only right after its MANUAL_RETRY_STEP
        if row.transition == "retry_step" and row.data.get("repaired"):
            spec = self.by_name.get(str(row.data.get("step")))
            fold.repaired_retry = spec.position if spec else None
        if target == "completed":
            self._on_completed(row)
        elif target == "compensating":
            if fold.compensating_since is None:
                self._on_compensating(row)
                fold.compensating_since = row.seq
            if row.transition in RESTARTS:
                self._on_restart_asked(row)
        elif target == "compensated":
            self._on_compensated(row)
        elif target == "needs_attention" and row.transition == "hold":
            blocked = [p for p, s in fold.state.items() if s in {"failed", "unknown"}]
            comp_failed = [p for p, s in fold.comp.items() if s == "failed"]
            if not (blocked or comp_failed or "deadline" in row.reason):
                self.fail("L1", "held while no step or compensation failed", row)
        elif target == "cancelled" and fold.starts:
            self.fail("S6", "cancelled without compensating started steps", row)
        elif target == "running" and row.transition == "restart":
            self._on_restarted(row)
        elif (
            target == "running"
            and row.transition != "start"
            and fold.compensating_since is not None
        ):
            self.fail("S3", "forward again after WF_COMPENSATING", row)
        if row.transition == "close_as_failed":
            self._on_closed(row)
            fold.restart_from = None  # an unfinished restart ends with it
        fold.instance = target
        if target in TERMINAL:
            fold.terminal = (target, row.seq)
            fold.outcomes.append(target)
            if len(fold.outcomes) > 1:
                self.fail("S2", f"two outcomes: {fold.outcomes}", row)

    def _on_compensating(self, row: Row) -> None:
        """WF_COMPENSATING: nothing after the pivot ran; the engine never
        compensates once the pivot may have applied, an operator only an
        uncertain pivot (its outcome unknown, or failed retryably)."""
        fold = self.fold
        if self.pivot is None:
            return
        past = sorted({p for p, _ in fold.starts if p > self.pivot})
        if past:
            self.fail("S6", f"compensating after step {past} started", row)
        if not fold.may_apply(self.pivot):
            return
        manual = ("instance", row.transition) in self.manual
        pivot_state = fold.state[self.pivot]
        if not manual:
            self.fail("S6", "the engine compensates although the pivot may apply", row)
        elif pivot_state not in {"unknown", "failed"}:
            self.fail("S6", f"compensating past a {pivot_state} pivot", row)

    def _on_closed(self, row: Row) -> None:
        """WF_FAILED: the close fenced open work in its own change, before
        this row."""
        fold = self.fold
        open_work = {
            p: (fold.state[p], fold.comp[p])
            for p in self.specs
            if fold.state[p] in OPEN_ACTION or fold.comp[p] in OPEN_COMPENSATION
        }
        if open_work:
            self.fail("S2", f"closed with open work: {open_work}", row)

    def _on_restart_asked(self, row: Row) -> None:
        """MANUAL_RESTART_FROM_STEP: from a restart point of the pinned
        definition, at or before the step that blocks the instance."""
        fold = self.fold
        spec = self.by_name.get(str(row.data.get("step")))
        if spec is None:
            self.fail("S1", "a restart names no step of the definition", row)
            fold.restart_from = 1
            return
        fold.restart_from = spec.position
        blocked = [p for p, s in fold.state.items() if s in {"failed", "unknown"}]
        if row.transition == "retry_repaired_step":
            # A restart from the blocked step itself: it may have applied, so
            # it is undone first (it must have a compensation, before the pivot).
            first = min(blocked) if blocked else None
            if (
                first is None
                or spec.position not in blocked
                or (self.stage(spec.position) != self.stage(first))
            ):
                # Parallel stages: any failed or unknown branch of the
                # blocking stage may be the blocked step.
                self.fail("S6", f"step {spec.position} is not the blocked step", row)
            if not self.needs_compensation(spec.position):
                self.fail(
                    "S6",
                    f"step {spec.position} cannot be undone (no compensation, "
                    "not before the pivot, or nothing may have applied)",
                    row,
                )
            return
        if not spec.restart_point:
            self.fail("S6", f"step {spec.position} is not a restart point", row)
        if not blocked or spec.position > min(blocked):
            self.fail("S6", f"restart from {spec.position} past the blocked step", row)

    def _on_restarted(self, row: Row) -> None:
        """WF_RESTARTED: the undo phase of a restart is over; every step from
        the restart point must be back to pending, its compensation reopened."""
        fold = self.fold
        if fold.restart_from is None:
            self.fail("S3", "WF_RESTARTED without a restart being asked for", row)
            return
        unready = {
            p: (fold.state[p], fold.comp[p])
            for p in self.specs
            if p >= fold.restart_from
            and (fold.state[p] != "pending" or fold.comp[p] != "none")
        }
        if unready:
            self.fail("S3", f"restarted while steps are not reset: {unready}", row)
        fold.compensating_since = None
        fold.restart_from = None
        fold.restarted = True

    def _on_completed(self, row: Row) -> None:
        fold = self.fold
        missing = [p for p, s in fold.state.items() if s not in STEP_DONE]
        if missing:
            self.fail("S9", f"completed while steps {missing} are not done", row)
        comp = [p for p, s in fold.comp.items() if s != "none"]
        if comp:
            self.fail("S9", f"completed after compensation events for {comp}", row)

    def _on_compensated(self, row: Row) -> None:
        fold = self.fold
        if fold.restart_from is not None:
            self.fail("S8", "a restart ended as compensated", row)
        for position in self.specs:
            started = fold.started(position)
            if started and self.pivot is not None and position > self.pivot:
                self.fail("S8", f"step {position} after the pivot started", row)
            if position == self.pivot and fold.state[position] in STEP_DONE:
                self.fail("S8", f"the pivot {position} is done", row)
            if (
                self.needs_compensation(position)
                and fold.current(position) not in fold.comp_succeeded
            ):
                self.fail(
                    "S8",
                    f"step {position} may have applied but has no COMP_SUCCEEDED",
                    row,
                )
            if fold.comp[position] not in COMP_RESOLVED:
                self.fail("S8", f"step {position} compensation unresolved", row)
            if fold.state[position] in IN_FLIGHT:
                self.fail("S8", f"step {position} action still in flight", row)

    def _step_row(self, row: Row) -> None:
        fold, position = self.fold, row.position
        assert position is not None
        if row.field == "state":
            current = fold.state[position]
        elif row.field == "compensation_state":
            current = fold.comp[position]
        else:
            self.fail("S1", f"unknown field {row.field!r}", row)
            return
        self._legal(row, "step", current)
        if row.field == "state":
            self._action_event(row, position)
            fold.state[position] = row.target
        else:
            self._compensation_event(row, position)
            fold.comp[position] = row.target

    def _forward_allowed(self, row: Row, position: int) -> None:
        fold = self.fold
        if fold.instance != "running":
            self.fail("S3", f"forward work while the instance is {fold.instance}", row)
        if fold.compensating_since is not None:
            self.fail(
                "S3",
                f"forward work after WF_COMPENSATING #{fold.compensating_since}",
                row,
            )
        # Stages: every branch of the stage before is done (sequential: the
        # step before).
        for previous in self.previous_stage(position):
            if fold.state[previous] not in STEP_DONE:
                self.fail(
                    "S3", f"step {previous} is {fold.state[previous]}, not done", row
                )

    def _action_event(self, row: Row, position: int) -> None:
        fold, name = self.fold, row.transition
        key = (position, ACTION)
        attempt = row.data.get("attempt")
        engine_step = self.specs[position].kind != "activity"
        if name in ENGINE_STEP_TRANSITIONS and not engine_step:
            self.fail("S1", f"{name} on an activity step", row)
        if name == "begin_attempt" and engine_step:
            self.fail("S12", f"step {position} is done by the engine: no attempt", row)
        if name == "fail":
            fold.permanent[position] = bool(row.data.get("permanent"))
        elif name in {"refuse_wait", "reject_task"}:
            fold.permanent[position] = True
        elif name in {"begin_attempt", "mark_done", "begin_wait"}:
            fold.permanent[position] = False
        if name in {"begin_wait", "refuse_wait"}:
            self._forward_allowed(row, position)
        elif name in WAIT_ENDS and (
            fold.instance not in {"running", "needs_attention"}
            or fold.compensating_since is not None
        ):
            self.fail("S3", f"a wait ended while the instance is {fold.instance}", row)
        elif name == "stop_waiting" and fold.instance == "running":
            self.fail("S3", "a wait fenced while the instance runs forward", row)
        if name == "time_out" and row.data.get("abandoned"):
            fold.abandoned.add((position, attempt))
        if name == "retry" and fold.instance == "compensating":
            self.fail("S3", "an action retried while compensating", row)
        if name in {"schedule", "retry_now"}:
            self._forward_allowed(row, position)
        elif name == "rerun":
            self._rerun(row, position)
        elif name == "begin_attempt":
            self._forward_allowed(row, position)
            if fold.open.get(key) is not None:
                self.fail("S4", f"attempt {fold.open[key]} is still open", row)
            if attempt != fold.attempt[position] + 1:
                self.fail(
                    "S4",
                    f"attempt {attempt} after attempt {fold.attempt[position]}",
                    row,
                )
            fold.attempt[position] = attempt or fold.attempt[position] + 1
            fold.open[key] = fold.attempt[position]
            fold.starts[fold.current(position)] += 1
        elif name in ACTION_OUTCOMES | {"wait"} and row.source in IN_FLIGHT:
            if fold.open.get(key) is None or attempt != fold.open[key]:
                self.fail(
                    "S4",
                    f"outcome for attempt {attempt}; the open one is "
                    f"{fold.open.get(key)}",
                    row,
                )
            if name != "wait":
                fold.open[key] = None
            if name == "succeed":
                fold.succeeded.add(fold.current(position))
        elif (
            name == "retry"
            and attempt is not None
            and attempt != fold.attempt[position]
        ):
            self.fail("S4", f"retry names attempt {attempt}", row)

    def _compensation_event(self, row: Row, position: int) -> None:
        fold, name = self.fold, row.transition
        key = (position, COMPENSATION)
        attempt = row.data.get("attempt")
        if name in {"require_compensation", "compensation_retry_now"}:
            self._compensation_allowed(row, position)
        elif name == "begin_compensation_attempt":
            self._compensation_allowed(row, position)
            if fold.open.get(key) is not None:
                self.fail("S4", f"compensation {fold.open[key]} is still open", row)
            if attempt != fold.comp_attempt[position] + 1:
                self.fail(
                    "S4",
                    f"compensation attempt {attempt} after "
                    f"{fold.comp_attempt[position]}",
                    row,
                )
            fold.comp_attempt[position] = attempt or fold.comp_attempt[position] + 1
            fold.open[key] = fold.comp_attempt[position]
            fold.comp_starts[fold.current(position)] += 1
        elif name in COMP_OUTCOMES:
            if fold.open.get(key) is None or attempt != fold.open[key]:
                self.fail(
                    "S4",
                    f"compensation outcome for attempt {attempt}; the open one "
                    f"is {fold.open.get(key)}",
                    row,
                )
            fold.open[key] = None
            if name == "compensation_succeed":
                fold.comp_succeeded.add(fold.current(position))
        elif name == "skip_compensation" and self.needs_compensation(position):
            self.fail("S6", f"step {position} may have applied; its undo skipped", row)
        elif name == "reopen_compensation":
            self._in_restart(row, position)

    def _in_restart(self, row: Row, position: int) -> None:
        """A reset of a step is only part of a restart's undo phase, for the
        steps from the restart point on."""
        fold = self.fold
        if fold.instance != "compensating" or fold.restart_from is None:
            self.fail("S3", f"a step reset while the instance is {fold.instance}", row)
        elif position < fold.restart_from:
            self.fail(
                "S6",
                f"step {position} is before the restart point {fold.restart_from}",
                row,
            )

    def _rerun(self, row: Row, position: int) -> None:
        """STEP_RERUN: the step's current run is over (undone where it needs
        it, S7 order), and it starts again as the next run."""
        fold = self.fold
        repaired = fold.repaired_retry == position and fold.instance == "running"
        fold.repaired_retry = None
        if repaired:
            # Retried with repaired data, at once: only if nothing may have
            # applied (else it is undone first: MANUAL_RETRY_REPAIRED_STEP).
            if fold.may_apply(position):
                self.fail(
                    "S7", f"step {position} may have applied: a new run twice", row
                )
        else:
            self._in_restart(row, position)
        if fold.open.get((position, ACTION)) is not None:
            self.fail("S4", f"attempt {fold.open[(position, ACTION)]} is open", row)
        has_undo = self.specs[position].has_compensation
        if (
            has_undo
            and not repaired
            and fold.may_apply(position)
            and fold.comp[position] != "done"
        ):
            # Also the pivot: a new run while the old one may have applied.
            self.fail("S7", f"step {position} runs again before it is undone", row)
        # A step with a compensation starts a new run (new keys), as does a
        # repaired retry; one without keeps its keys when restarted, so its
        # participant can deduplicate (S5).
        if has_undo or repaired:
            fold.run[position] += 1
        fold.permanent[position] = False
        if row.data.get("run") != fold.run[position]:
            self.fail(
                "S1",
                f"run {row.data.get('run')} but the fold says {fold.run[position]}",
                row,
            )

    def _compensation_allowed(self, row: Row, position: int) -> None:
        fold = self.fold
        if fold.compensating_since is None or fold.instance != "compensating":
            self.fail("S6", f"compensation while the instance is {fold.instance}", row)
        if fold.restart_from is not None and position < fold.restart_from:
            self.fail(
                "S6",
                f"step {position} undone by a restart from {fold.restart_from}",
                row,
            )
        if not fold.started(position) and fold.state[position] != "skipped":
            self.fail("S6", f"step {position} was never started", row)
        elif fold.permanent[position]:
            self.fail(
                "S6", f"step {position}'s last answer was a permanent failure", row
            )
        if not self.before_pivot(position):
            self.fail("S6", f"step {position} is at or after the pivot", row)
        if not self.specs[position].has_compensation:
            self.fail("S6", f"step {position} has no compensation", row)
        # Compensations of a stage after every later stage's (the branches
        # of one stage in any order, each after its own action: S12).
        later = {
            p: fold.comp[p]
            for p in self.specs
            if self.stage(p) > self.stage(position)
            and fold.comp[p] not in COMP_RESOLVED
        }
        if later:
            self.fail("S7", f"later compensations unresolved: {later}", row)
        flying = [p for p, s in fold.state.items() if s in IN_FLIGHT]
        if flying:
            self.fail("S7", f"actions of steps {flying} are still in flight", row)

    # -- S5, S12: the ledger against the history ------------------------------------
    def effects(
        self, position: int, direction: str, run: int | None = None
    ) -> list[Effect]:
        """The ledger rows of a step (of one run: a restart's new run sends
        new idempotency keys, ``...:<run>``)."""
        name = self.specs[position].name
        return [
            e
            for e in self.rec.ledger
            if e.step_name == name
            and e.direction == direction
            and (run is None or run_of_key(e.key) == run)
        ]

    def check_ledger(self) -> None:
        fold = self.fold
        for effect in self.rec.ledger:
            if effect.step_name not in self.by_name:
                self.fail("S12", f"an effect for unknown step {effect.step_name!r}")
        for position in self.specs:
            runs = {run_of_key(e.key) for e in self.effects(position, ACTION)}
            runs |= {run_of_key(e.key) for e in self.effects(position, COMPENSATION)}
            for run in sorted(runs | set(range(1, fold.run[position] + 1))):
                self._check_run(position, run)
            self._check_run_order(position)

    def _check_run(self, position: int, run: int) -> None:
        fold = self.fold
        at = (position, run)
        tag = f"{position}" + (f" run {run}" if run > 1 else "")
        where = f"step {tag}"
        t_rows = self.effects(position, ACTION, run)
        c_rows = self.effects(position, COMPENSATION, run)
        eff_t = sum(e.applied for e in t_rows)
        eff_c = sum(e.applied for e in c_rows)
        if eff_t > 1 or eff_c > 1:
            self.fail("S5", f"{where}: effT={eff_t} effC={eff_c}")
        calls_t = sum(e.calls for e in t_rows)
        calls_c = sum(e.calls for e in c_rows)
        if calls_t > fold.starts[at] or (eff_t and not fold.starts[at]):
            self.fail(
                "S12",
                f"{where}: {calls_t} forward calls (effT={eff_t}) "
                f"from {fold.starts[at]} STEP_STARTED",
            )
        if calls_c > fold.comp_starts[at]:
            self.fail(
                "S12",
                f"{where}: {calls_c} compensation calls from "
                f"{fold.comp_starts[at]} COMP_STARTED",
            )
        if at in fold.succeeded and eff_t != 1:
            self.fail("S12", f"STEP_SUCCEEDED({tag}) but effT={eff_t}")
        if at in fold.comp_succeeded and eff_t != eff_c:
            self.fail("S12", f"COMP_SUCCEEDED({tag}) but effT={eff_t} effC={eff_c}")
        if eff_c and not eff_t:
            self.fail("S12", f"{where}: an undo of nothing was applied")
        first_t = _first_applied(t_rows)
        first_c = _first_applied(c_rows)
        if first_t and first_c and first_t > first_c:
            self.fail("S12", f"{where}: T applied after its compensation")
        # A restart re-runs a step only after undoing the run before
        # (a step without a compensation has nothing to undo).
        if (
            run < fold.run[position]
            and self.specs[position].has_compensation
            and eff_t != eff_c
        ):
            self.fail("G", f"{where} was run again without being undone")

    def _check_run_order(self, position: int) -> None:
        """Every effect of a run comes before the first of the next run."""
        times: dict[int, list[datetime]] = {}
        for direction in (ACTION, COMPENSATION):
            for e in self.effects(position, direction):
                if e.applied and e.first_applied_at:
                    times.setdefault(run_of_key(e.key), []).append(e.first_applied_at)
        runs = sorted(times)
        for earlier, later in zip(runs, runs[1:], strict=False):
            if max(times[earlier]) > min(times[later]):
                self.fail(
                    "S7",
                    f"step {position}: run {later} applied before run {earlier} "
                    "was done",
                )

    # -- G and L1: at quiescence ---------------------------------------------------
    def word(self) -> list[str]:
        """The applied effects of each step's current run, in order (the
        runs a restart undid are checked by :meth:`_check_run`)."""
        applied = sorted(
            (
                e
                for e in self.rec.ledger
                if e.applied
                and e.step_name in self.by_name
                and run_of_key(e.key)
                == self.fold.run[self.by_name[e.step_name].position]
            ),
            key=lambda e: (e.first_applied_at is None, e.first_applied_at, e.order),
        )
        return [
            ("T" if e.direction == ACTION else "C")
            + str(self.by_name[e.step_name].position)
            for e in applied
        ]

    def check_terminal(self) -> None:
        state = self.fold.instance
        # Timers and steps for a person apply nothing: G's word is over the
        # steps that call a participant.
        word = self.word()
        positions = sorted(p for p, s in self.specs.items() if s.kind == "activity")
        if self.fold.restarted:
            # A restarted step without a compensation was called again under
            # its old key: its one effect keeps the time of the first run, so
            # the order is checked among the steps with a compensation, and
            # each of the others must have applied at most once (S5), exactly
            # once if completed.
            for p in positions:
                if not self.specs[p].has_compensation:
                    eff_t = sum(e.applied for e in self.effects(p, ACTION))
                    if eff_t != 1 and (state == "completed" or eff_t > 1):
                        self.fail("G", f"{state} with effT={eff_t} at step {p}")
            positions = [p for p in positions if self.specs[p].has_compensation]
            word = [w for w in word if int(w[1:]) in positions]
        if state not in {
            "completed",
            "compensated",
            "cancelled",
            "failed",
            "needs_attention",
        }:
            self.fail("L1", f"quiescent but {state}: neither finished nor escalated")
        if state == "needs_attention" and not self.fold.alert_open:
            # Quiescence includes a sweep, which opens the alert of a held
            # instance (L3: escalation is visible).
            self.fail("L3", "waiting for a person without an open alert")
        if self.parallel and state in {"completed", "compensated"}:
            self._check_partial_order(state, word, positions)
        elif state == "completed":
            expected = [f"T{p}" for p in positions]
            if word != expected:
                self.fail("G", f"completed with word {word}, expected {expected}")
        elif state == "compensated":
            candidates = [
                [f"T{p}" for p in positions[:j]]
                + [
                    f"C{p}"
                    for p in reversed(positions[:j])
                    if self.specs[p].has_compensation
                ]
                for j in range(len(positions) + 1)
            ]
            if word not in candidates:
                self.fail("G", f"compensated with word {word}: not T1..Tj Cj..C1")
            for p in positions:
                if self.specs[p].has_compensation:
                    run = self.fold.run[p]
                    eff_t = sum(e.applied for e in self.effects(p, ACTION, run))
                    eff_c = sum(e.applied for e in self.effects(p, COMPENSATION, run))
                    if eff_t != eff_c:
                        self.fail("L1", f"compensated with effT-effC != 0 at {p}")
        elif state == "cancelled" and word:
            self.fail("G", f"cancelled with word {word}")

    def _check_partial_order(
        self, state: str, word: list[str], positions: list[int]
    ) -> None:
        """G with parallel stages (the paper's parallel sagas): the forward
        effects follow the stages (a stage's branches in any order, each
        stage's after every earlier stage's), all of them before the first
        undo; a compensated instance applied every branch of the stages
        before the last one it reached, and undid each applied step, a
        stage's undos after every later stage's."""
        forward = [int(w[1:]) for w in word if w[0] == "T"]
        undo = [int(w[1:]) for w in word if w[0] == "C"]
        if word[: len(forward)] != [f"T{p}" for p in forward]:
            self.fail("G", f"{state} with word {word}: an undo before an action")
        for earlier, later in zip(forward, forward[1:], strict=False):
            if self.stage(earlier) > self.stage(later):
                self.fail("G", f"{state} with word {word}: T{later} after T{earlier}")
        for earlier, later in zip(undo, undo[1:], strict=False):
            if self.stage(earlier) < self.stage(later):
                self.fail("G", f"{state} with word {word}: C{later} after C{earlier}")
        if state == "completed":
            if sorted(forward) != positions:
                self.fail("G", f"completed with word {word}, expected {positions}")
            if undo:
                self.fail("G", f"completed with undos in {word}")
            return
        reached = max((self.stage(p) for p in forward), default=None)
        for p in positions:
            if reached is not None and self.stage(p) < reached and p not in forward:
                self.fail("G", f"compensated with word {word}: T{p} never applied")
        expected_undo = sorted(p for p in forward if self.specs[p].has_compensation)
        if sorted(undo) != expected_undo:
            self.fail("G", f"compensated with word {word}: undos {undo} != applied")

    def check_replay(self, persisted: Persisted) -> None:
        fold = self.fold
        if persisted.state != fold.instance:
            self.fail(
                "S1",
                f"persisted state {persisted.state} != replayed {fold.instance}",
            )
        if persisted.restart_position != fold.restart_from:
            self.fail(
                "S1",
                f"persisted restart position {persisted.restart_position} != "
                f"replayed {fold.restart_from}",
            )
        for position, cols in persisted.steps.items():
            replayed = StepColumns(
                fold.state.get(position, "?"),
                fold.comp.get(position, "?"),
                fold.attempt.get(position, -1),
                fold.comp_attempt.get(position, -1),
                fold.run.get(position, -1),
                fold.permanent.get(position, False),
            )
            if cols != replayed:
                self.fail(
                    "S1", f"step {position}: persisted {cols} != replayed {replayed}"
                )

    # -- reporting -----------------------------------------------------------------
    def report(self) -> str:
        lines = ["saga invariant violated:"]
        lines += [f"  - {v}" for v in self.violations]
        lines.append("history:")
        for row in self.rec.rows:
            who = row.actor_label or row.actor_kind
            if row.user_id is not None:
                who += f" (user {row.user_id})"
            change = (
                f"{row.field} {row.source or '-'}->{row.target}"
                if row.field
                else "note"
            )
            where = f"step {row.position}" if row.position else "instance"
            lines.append(
                f"  #{row.seq:<5} {where:<9} {row.transition:<27} {change:<40} "
                f"{event_kind(row, self.manual):<32} {who} {row.reason[:80]!r}"
            )
        lines.append(f"ledger (word {self.word()}):")
        for e in sorted(self.rec.ledger, key=lambda e: e.order):
            lines.append(
                f"  {e.step_name}:{e.direction:<12} applied={e.applied!s:<5} "
                f"calls={e.calls} late_refused={e.late_refused} "
                f"first_applied_at={e.first_applied_at}"
            )
        if self.rec.persisted is not None:
            lines.append(f"persisted: {self.rec.persisted}")
        return "\n".join(lines)


def run_of_key(key: str) -> int:
    """The run an idempotency key belongs to: ``...:action`` is run 1,
    ``...:action:2`` run 2 (see ``step_idempotency_key``)."""
    last = key.rsplit(":", 1)[-1]
    return int(last) if last.isdigit() else 1


def _first_applied(effects: Sequence[Effect]) -> datetime | None:
    times = [e.first_applied_at for e in effects if e.applied and e.first_applied_at]
    return min(times) if times else None


def check_history(
    recorded: Recorded, *, quiescent: bool, replay: bool | None = None
) -> None:
    """Check S1-S10 and S12 on the history and the ledger; at quiescence also
    the replay equality of S1 (persisted columns = fold), G and L1."""
    checker = _Checker(recorded)
    checker.run()
    checker.check_ledger()
    if (quiescent if replay is None else replay) and recorded.persisted is not None:
        checker.check_replay(recorded.persisted)
    if quiescent:
        checker.check_terminal()
    if checker.violations:
        raise AssertionError(checker.report())


# -- loading from the database ---------------------------------------------------


def pinned_steps(definition_id: int) -> list[StepSpec]:
    """The steps of the definition version an instance pinned."""
    rows = list(
        StepDefinition.objects.filter(definition_id=definition_id).order_by("position")
    )
    stage: dict[int, int] = {}
    for s in rows:
        joins = s.parallel_with_previous and stage
        stage[s.position] = stage[max(stage)] if joins else s.position
    return [
        StepSpec(
            s.position,
            s.name,
            bool(s.compensation),
            s.is_pivot,
            s.restart_point,
            s.kind,
            stage[s.position],
        )
        for s in rows
    ]


def load(
    instance: WorkflowInstance | Any, *, steps: list[StepSpec] | None = None
) -> Recorded:
    """Read the history, ledger and status columns of an instance (or its id);
    ``steps`` saves reading the pinned definition again."""
    pk = getattr(instance, "pk", instance)
    current = WorkflowInstance.objects.get(pk=pk)
    if steps is None:
        steps = pinned_steps(current.definition_id)
    history = list(
        TransitionLog.objects.filter(instance_id=pk)
        .order_by("id")
        .values("step_id", "step__instance_id", *HISTORY_COLUMNS.values())
    )
    # The timeline's key to its step has no database constraint (migration
    # 0033): every row that names a step names one of this instance's.
    strays = [
        r["id"]
        for r in history
        if r["step_id"] is not None and r["step__instance_id"] != current.pk
    ]
    assert not strays, f"history rows {strays} name no step of instance {pk}"
    rows = [
        Row(**{name: r[column] for name, column in HISTORY_COLUMNS.items()})
        for r in history
    ]
    ledger = [
        Effect(
            step_name=e.step_name,
            direction=e.direction,
            key=e.idempotency_key,
            applied=e.applied,
            calls=e.calls,
            late_refused=e.late_refused,
            first_applied_at=e.first_applied_at,
            order=e.id,
        )
        for e in ParticipantEffect.objects.filter(instance_id=pk).order_by("id")
    ]
    persisted = Persisted(
        state=current.state,
        restart_position=current.restart_position,
        steps={
            s["position"]: StepColumns(
                s["state"],
                s["compensation_state"],
                s["attempt"],
                s["compensation_attempt"],
                s["run"],
                s["last_failure_permanent"],
            )
            for s in StepExecution.objects.filter(instance_id=pk).values(
                "position",
                "state",
                "compensation_state",
                "attempt",
                "compensation_attempt",
                "run",
                "last_failure_permanent",
            )
        },
    )
    return Recorded(list(steps), rows, ledger, persisted)


def check_instance(
    instance: WorkflowInstance | Any, *, quiescent: bool, replay: bool | None = None
) -> None:
    """Check one instance from the database (see :func:`check_history`).

    ``replay`` (default: ``quiescent``) compares the persisted columns with the
    fold; only sound when no transaction on the instance is in progress."""
    check_history(load(instance), quiescent=quiescent, replay=replay)
