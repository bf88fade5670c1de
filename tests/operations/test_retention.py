"""Retention and archive on PostgreSQL: the sweeper's purge of old finished
instances (young and unfinished ones untouched), the archive file read back,
``manage.py archive`` (dry run, bad input, archive only), the purge audit and
its admin, and an operator acting on an instance while it is being purged.

Instances are run by the real engine (in-memory transport). "Old" is made by
moving ``finished_at`` into the past, as ``advance_clock`` does for deadlines:
retention compares it with the database clock."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import threading
import time
from datetime import timedelta
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, connections, transaction
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from tests.celery_processes import ROOT, process_env
from tests.operations.conftest import STEPS, finished, held
from tests.support import make_definition, start, user_in
from workflows_app.engine import retention
from workflows_app.engine.actors import Actor
from workflows_app.engine.commands.inbound import callback_report
from workflows_app.engine.sweeps import sweep_all
from workflows_app.engine.transitions import Change
from workflows_app.models import (
    Alert,
    ApprovalRequest,
    Attempt,
    AttemptExchange,
    BulkJob,
    BulkJobItem,
    InboundMessage,
    PurgeRun,
    SavedView,
    StepExecution,
    TransitionLog,
    WorkflowDefinition,
    WorkflowInstance,
)

DAY = timedelta(days=1)


def age(instance: WorkflowInstance, days: float) -> WorkflowInstance:
    """Let ``days`` pass since the instance finished (or was accepted)."""
    WorkflowInstance.objects.filter(pk=instance.pk).update(
        finished_at=timezone.now() - days * DAY if instance.finished_at else None,
        accepted_at=timezone.now() - days * DAY,
    )
    return WorkflowInstance.objects.get(pk=instance.pk)


def rows_of(instance: WorkflowInstance) -> dict[str, int]:
    pk = instance.pk
    return {
        "instance": WorkflowInstance.objects.filter(pk=pk).count(),
        "steps": StepExecution.objects.filter(instance_id=pk).count(),
        "attempts": Attempt.objects.filter(step__instance_id=pk).count(),
        "exchanges": AttemptExchange.objects.filter(
            attempt__step__instance_id=pk
        ).count(),
        "history": TransitionLog.objects.filter(instance_id=pk).count(),
        "inbound": InboundMessage.objects.filter(instance_id=pk).count(),
        "alerts": Alert.objects.filter(instance_id=pk).count(),
        "approvals": ApprovalRequest.objects.filter(instance_id=pk).count(),
        "bulk_items": BulkJobItem.objects.filter(instance_id=pk).count(),
    }


def attach_everything(instance: WorkflowInstance, operator: Any) -> None:
    """Rows of every kind that refers to an instance (stored as the engine,
    the HTTP activity and the operator pages store them)."""
    attempt = Attempt.objects.filter(step__instance=instance).first()
    AttemptExchange.objects.create(
        attempt_id=attempt.task_token,
        method="POST",
        url="https://pay.example/charge",
        status=200,
        response_body='{"ok": true}',
    )
    InboundMessage.objects.create(
        source="shop", message_id=f"cb-{instance.pk}", kind="callback",
        instance_id=instance.pk, response={"status": "ok"},
    )  # fmt: skip
    Alert.objects.create(
        instance=instance, definition_key=instance.definition_key,
        kind=Alert.Kind.LATE_EFFECT, reason="late", opened_at=timezone.now(),
        resolved_at=timezone.now(),
    )  # fmt: skip
    ApprovalRequest.objects.create(
        instance=instance, action="close_as_failed", reason="r",
        requested_by=operator, expires_at=timezone.now(),
    )  # fmt: skip
    job = BulkJob.objects.create(
        action="retry", reason="r", description="d", created_by=operator
    )
    BulkJobItem.objects.create(job=job, instance=instance, seen_version=1, plan="p")


@pytest.fixture
def wf():
    return make_definition("orders", steps=STEPS, failure_policy="hold")


@pytest.fixture
def archive_dir(settings, tmp_path):
    settings.SAGA_ARCHIVE_DIR = str(tmp_path / "archive")
    settings.SAGA_RETENTION_EVERY = 0
    # An earlier test's sweep in this process set when the next purge may run.
    retention._next_sweep.clear()
    return Path(settings.SAGA_ARCHIVE_DIR)


@pytest.mark.django_db(transaction=True)
def test_sweeper_purges_old_finished_instances_and_the_archive_reads_back(
    broker, wf, archive_dir
):
    operator = user_in("operator", "olga")
    make_definition("other")
    old = [age(finished(broker, f"old-{n}"), 40) for n in range(2)]
    attach_everything(old[0], operator)
    young = age(finished(broker, "young"), 10)
    unfinished = age(held(broker, "held-old"), 90)
    kept_forever = start("other", "other-old")
    broker.run()
    kept_forever = age(WorkflowInstance.objects.get(pk=kept_forever.pk), 400)
    assert kept_forever.state == "completed"
    SavedView.objects.create(name="v", query="state=completed", owner=operator)
    # The sweeper's other work first (the held instance's alert): no
    # retention set yet, so nothing is purged.
    assert sweep_all()["purged"] == 0
    WorkflowDefinition.objects.filter(key="orders").update(retention=30 * DAY)
    survivors = {i.pk: rows_of(i) for i in (young, unfinished, kept_forever)}
    timelines = {
        i.pk: list(
            TransitionLog.objects.filter(instance=i)
            .order_by("id")
            .values_list("transition", "source", "target", "actor_label")
        )
        for i in old
    }
    assert rows_of(old[0])["exchanges"] == rows_of(old[0])["alerts"] == 1

    counts = sweep_all()
    assert counts["purged"] == 2
    for instance in old:
        assert set(rows_of(instance).values()) == {0}, rows_of(instance)
    assert {i: rows_of(WorkflowInstance(pk=i)) for i in survivors} == survivors
    # What referred to the purged instance went with it, the rest stays.
    assert BulkJob.objects.count() == 1
    assert SavedView.objects.count() == 1

    files = list(archive_dir.rglob("*.jsonl.gz"))
    assert len(files) == 1 and files[0].parent.name == "orders"
    with gzip.open(files[0], "rt") as lines:
        archived = {line["instance"]["id"]: line for line in map(json.loads, lines)}
    assert set(archived) == {str(i.pk) for i in old}
    first = archived[str(old[0].pk)]
    assert first["definition"] == {"key": "orders", "version": 1}
    assert first["instance"]["state"] == "completed"
    assert first["instance"]["business_key"] == "old-0"
    assert [s["name"] for s in first["steps"]] == ["reserve", "charge", "ship"]
    assert all(s["attempts"] for s in first["steps"])
    exchanges = [
        e for s in first["steps"] for a in s["attempts"] for e in a["exchanges"]
    ]
    assert [e["url"] for e in exchanges] == ["https://pay.example/charge"]
    for pk, timeline in timelines.items():
        assert [
            (row["transition"], row["source"], row["target"], row["actor_label"])
            for row in archived[str(pk)]["timeline"]
        ] == timeline
    assert [m["message_id"] for m in first["inbound_messages"]] == [f"cb-{old[0].pk}"]
    assert [a["kind"] for a in first["alerts"]] == ["late_effect"]
    assert [a["action"] for a in first["approval_requests"]] == ["close_as_failed"]
    assert [b["plan"] for b in first["bulk_job_items"]] == ["p"]
    assert archived[str(old[1].pk)]["alerts"] == []

    audit = PurgeRun.objects.get()
    assert audit.actor_kind == "sweeper" and audit.actor_label.startswith("sweeper")
    assert audit.definition_key == "orders" and audit.purged
    assert audit.instances == 2
    assert audit.archive_file == str(files[0])
    assert audit.first_finished_at <= audit.last_finished_at < audit.cutoff
    assert abs(audit.cutoff - (timezone.now() - 30 * DAY)) < timedelta(minutes=1)

    # Nothing due any more: the next sweep purges nothing and records nothing.
    assert sweep_all()["purged"] == 0
    assert PurgeRun.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_no_archive_folder_means_no_purge_when_an_archive_is_asked_for(
    broker, wf, settings
):
    settings.SAGA_ARCHIVE_DIR = ""
    settings.SAGA_RETENTION_EVERY = 0
    retention._next_sweep.clear()
    WorkflowDefinition.objects.filter(key="orders").update(retention=DAY)
    instance = age(finished(broker, "o"), 5)
    assert sweep_all()["purged"] == 0
    assert rows_of(instance)["instance"] == 1
    # Without an archive wanted, it is purged.
    WorkflowDefinition.objects.filter(key="orders").update(archive_on_purge=False)
    assert sweep_all()["purged"] == 1
    assert PurgeRun.objects.get().archive_file == ""


def archive(*args: str) -> str:
    out = StringIO()
    call_command("archive", *args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db(transaction=True)
def test_archive_command_dry_run_bad_input_archive_only_and_purge(
    broker, wf, archive_dir
):
    old = [age(finished(broker, f"old-{n}"), 40) for n in range(3)]
    young = age(finished(broker, "young"), 1)
    before = {i.pk: rows_of(i) for i in [*old, young]}
    cutoff = (timezone.now() - 20 * DAY).date().isoformat()

    def unchanged() -> None:
        assert {i: rows_of(WorkflowInstance(pk=i)) for i in before} == before
        assert not archive_dir.exists()
        assert not PurgeRun.objects.exists()

    out = archive("--before", cutoff, "--dry-run")
    assert "orders: 3 instances would be archived to" in out
    assert "and purged (finished " in out
    assert "total: 3 instances finished before" in out
    assert "dry run: nothing written" in out
    unchanged()

    for bad, message in [
        ("2026-13-45", "is not a date"),
        ("yesterday", "is not a date"),
        ("", "is not a date"),
        ("2999-01-01", "is in the future"),
    ]:
        with pytest.raises(CommandError, match=message):
            archive("--before", bad)
    with pytest.raises(CommandError, match=r"no workflow 'nope' \(known: orders\)"):
        archive("--before", cutoff, "--definition", "nope")
    unchanged()

    out = archive("--before", cutoff, "--definition", "orders", "--no-purge")
    assert "orders: 3 instances archived in 1 batches" in out
    assert {i: rows_of(WorkflowInstance(pk=i)) for i in before} == before
    only = PurgeRun.objects.get()
    assert not only.purged and only.instances == 3 and only.actor_kind == "command"
    assert len(list(retention.read_archive(only.archive_file))) == 3

    out = archive("--before", cutoff, "--batch", "2")
    assert "orders: 3 instances purged in 2 batches" in out
    assert "total: 3 instances finished before" in out
    for instance in old:
        assert set(rows_of(instance).values()) == {0}
    assert rows_of(young) == before[young.pk]
    run = PurgeRun.objects.filter(purged=True).get()
    assert run.instances == 3 and " on " in run.actor_label
    lines = list(retention.read_archive(run.archive_file))
    assert sorted(line["instance"]["business_key"] for line in lines) == [
        "old-0",
        "old-1",
        "old-2",
    ]
    # Two batches are two gzip members of one file: zcat reads them as one.
    zcat = subprocess.run(
        ["zcat", run.archive_file], capture_output=True, text=True, check=True
    )
    assert len(zcat.stdout.splitlines()) == 3


def test_bad_before_exits_non_zero_from_the_shell():
    result = subprocess.run(
        [sys.executable, "manage.py", "archive", "--before", "31/12/2025"],
        cwd=ROOT,
        env=process_env(database="postgres://127.0.0.1:1/none"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "--before: '31/12/2025' is not a date; use YYYY-MM-DD" in result.stderr


@pytest.mark.django_db(transaction=True)
def test_operator_and_purge_on_the_same_instance_wait_for_each_other(
    broker, wf, archive_dir, monkeypatch
):
    operator = user_in("operator", "olga")
    target = age(finished(broker, "target"), 40)
    other = age(finished(broker, "other"), 40)
    job = retention.command_targets(timezone.now() - 30 * DAY, "orders")[0]
    actor = (PurgeRun.Actor.COMMAND, "test")

    # 1. An operator holds the instance: the purge skips it, without waiting.
    holding, release = threading.Event(), threading.Event()

    def operator_holds() -> None:
        with transaction.atomic():
            Change.open(target.pk, Actor.operator(operator))
            holding.set()
            release.wait(10)
        connections.close_all()

    holder = threading.Thread(target=operator_holds)
    holder.start()
    assert holding.wait(10)
    began = time.monotonic()
    outcome = retention.run(job, actor=actor, archive_file=None)
    assert time.monotonic() - began < 1
    release.set()
    holder.join(10)
    assert outcome.instances == 1
    assert rows_of(other)["instance"] == 0 and rows_of(target)["instance"] == 1

    # 2. The purge holds it (paused after its archive write): the operator's
    # action waits, then finds no instance: "no such instance", not an error.
    written, resume = threading.Event(), threading.Event()
    real_append = retention.append_member

    def append_then_pause(path: Path, data: bytes) -> None:
        real_append(path, data)
        written.set()
        resume.wait(10)

    monkeypatch.setattr(retention, "append_member", append_then_pause)
    results: dict[str, Any] = {}

    def purge() -> None:
        try:
            results["purge"] = retention.run(
                job, actor=actor, archive_file=archive_dir / "a.jsonl.gz"
            )
        finally:
            connections.close_all()

    def act() -> None:
        client = Client(raise_request_exception=True)
        client.force_login(operator)
        try:
            results["response"] = client.post(
                reverse("instance_action", args=[target.pk, "close_as_failed"]),
                {"reason": "a person takes it", "version": target.version},
                headers={"HX-Request": "true"},
            )
        finally:
            connections.close_all()

    purger = threading.Thread(target=purge)
    purger.start()
    assert written.wait(10)
    actor_thread = threading.Thread(target=act)
    actor_thread.start()
    with connection.cursor() as cursor:
        for _ in range(100):
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                "current_database() AND wait_event_type = 'Lock'"
            )
            if cursor.fetchone()[0]:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the operator's action never waited for the lock")
    resume.set()
    purger.join(10)
    actor_thread.join(10)
    assert results["purge"].instances == 1
    assert results["response"].status_code == 404
    assert rows_of(target)["instance"] == 0
    assert [line["instance"]["id"] for line in retention.read_archive(
        archive_dir / "a.jsonl.gz"
    )] == [str(target.pk)]  # fmt: skip


@pytest.mark.django_db(transaction=True)
def test_lines_are_built_before_the_lock_and_a_changed_instance_gets_a_fresh_one(
    broker, wf, archive_dir, monkeypatch
):
    """The archive member is built with no transaction open (so no row lock);
    an instance that changes between its build and the lock (here a late
    callback on a completed instance: a timeline note) is left out of that
    batch and archived again, as it is when deleted: one line each."""
    first, late, last = (age(finished(broker, f"o-{n}"), 40) for n in range(3))
    token = str(
        Attempt.objects.filter(step__instance=late, direction="action")
        .order_by("id")
        .first()
        .task_token
    )
    job = retention.command_targets(timezone.now() - 30 * DAY, "orders")[0]
    real_build = retention.build
    builds: list[list[str]] = []
    timeline_after_the_note: list[int] = []

    def build_then_a_late_callback(ids: list[Any]) -> retention.Built:
        assert not connection.in_atomic_block  # nothing is locked while building
        built = real_build(ids)
        builds.append([str(i) for i in ids])
        if len(builds) == 1:
            answer = callback_report(
                token,
                message_id="late-1",
                succeeded=True,
                output={"charge": "again"},
                actor=Actor.api("payments"),
            )
            assert not answer.response["accepted"]
            timeline_after_the_note.append(
                TransitionLog.objects.filter(instance=late).count()
            )
        return built

    monkeypatch.setattr(retention, "build", build_then_a_late_callback)
    outcome = retention.run(
        job,
        actor=(PurgeRun.Actor.COMMAND, "test"),
        archive_file=archive_dir / "a.jsonl.gz",
    )
    assert outcome.instances == 3 and outcome.changed == 1 and outcome.finished
    # The first batch took the two unchanged ones; the changed one was built
    # again (the rest of that batch was already gone) and then purged.
    assert builds == [[str(i.pk) for i in (first, late, last)], [str(late.pk)]]
    lines = list(retention.read_archive(archive_dir / "a.jsonl.gz"))
    assert [line["instance"]["id"] for line in lines] == [
        str(first.pk), str(last.pk), str(late.pk)
    ]  # fmt: skip
    assert len(lines[-1]["timeline"]) == timeline_after_the_note[0]
    assert len(lines[-1]["timeline"]) > len(lines[0]["timeline"])
    assert [m["message_id"] for m in lines[-1]["inbound_messages"]] == ["late-1"]
    for instance in (first, late, last):
        assert set(rows_of(instance).values()) == {0}
    assert PurgeRun.objects.get().instances == 3


@pytest.mark.django_db(transaction=True)
def test_retention_page_sets_every_version_and_the_audit_is_read_only(
    broker, wf, admin_client
):
    draft = wf.new_draft()
    page = reverse("admin:workflows_app_workflowdefinition_retention", args=[wf.pk])
    change = reverse("admin:workflows_app_workflowdefinition_change", args=[wf.pk])
    # Published: still read-only, with a way to the retention page.
    assert page in admin_client.get(change).content.decode()
    for bad in ("0", "-3", "abc", "36501"):
        response = admin_client.post(page, {"retention_days": bad})
        assert response.status_code == 200
        assert b"errorlist" in response.content, bad
    assert set(WorkflowDefinition.objects.values_list("retention", flat=True)) == {None}
    response = admin_client.post(page, {"retention_days": "90"})
    assert response.status_code == 302
    assert set(
        WorkflowDefinition.objects.values_list("retention", "archive_on_purge")
    ) == {(90 * DAY, False)}
    assert (
        "purged 90 days after they finish"
        in admin_client.get(
            reverse("admin:workflows_app_workflowdefinition_change", args=[draft.pk])
        ).content.decode()
    )
    # A new draft keeps the setting; emptying it keeps instances forever.
    assert WorkflowDefinition.objects.get(pk=draft.pk).new_draft().retention == 90 * DAY
    admin_client.post(page, {"retention_days": "", "archive_on_purge": "on"})
    assert set(
        WorkflowDefinition.objects.values_list("retention", "archive_on_purge")
    ) == {(None, True)}

    PurgeRun.objects.create(
        actor_kind="command", actor_label="ops <b>x</b> on host",
        definition_key="orders", cutoff=timezone.now(), instances=7,
        started_at=timezone.now(), updated_at=timezone.now(),
    )  # fmt: skip
    listing = admin_client.get(reverse("admin:workflows_app_purgerun_changelist"))
    assert listing.status_code == 200
    assert "ops &lt;b&gt;x&lt;/b&gt; on host" in listing.content.decode()
    assert reverse("admin:workflows_app_purgerun_add") not in (listing.content.decode())
    run = PurgeRun.objects.get()
    detail = reverse("admin:workflows_app_purgerun_change", args=[run.pk])
    assert 'name="instances"' not in admin_client.get(detail).content.decode()
    assert admin_client.post(detail, {"instances": "1"}).status_code == 403
    assert PurgeRun.objects.get().instances == 7
