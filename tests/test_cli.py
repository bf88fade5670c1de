"""``manage.py saga``: runbooks from the command line, against PostgreSQL
with instances the real engine held. In-process runs (``call_command``, with
the in-memory transport so that a started bulk job really runs) check what
is printed and done; real ``manage.py`` processes check the exit codes a
script sees."""

from __future__ import annotations

import json
import subprocess
import sys
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command

from tests.celery_processes import ROOT, process_env
from tests.operations.conftest import STEPS, finished, held
from tests.support import make_definition, user_in
from workflows_app.cli.exits import Exit
from workflows_app.engine import actions
from workflows_app.models import (
    ApprovalRequest,
    BulkJob,
    BulkJobItem,
    StepExecution,
    TransitionLog,
    WorkflowInstance,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def wf():
    return make_definition("orders", steps=STEPS, failure_policy="hold")


@pytest.fixture
def olga():
    return user_in("operator", "olga")


def saga(*args: str) -> tuple[int, str, str]:
    """Run ``saga`` in this process: (exit code, stdout, stderr)."""
    out, err = StringIO(), StringIO()
    try:
        call_command("saga", *args, stdout=out, stderr=err)
    except Exit as exc:
        return exc.code, out.getvalue(), exc.message
    return 0, out.getvalue(), err.getvalue()


def saga_json(*args: str) -> tuple[int, Any]:
    code, out, _ = saga(*args, "--json")
    return code, json.loads(out)


def run(*args: str | bytes) -> subprocess.CompletedProcess[str]:
    """Run ``manage.py saga`` as a script would, against the test database."""
    return subprocess.run(
        [sys.executable, "manage.py", "saga", *args],
        cwd=ROOT,
        env=process_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def fresh(instance: WorkflowInstance) -> WorkflowInstance:
    return WorkflowInstance.objects.get(pk=instance.pk)


# -- list and show ---------------------------------------------------------------


def test_list_filters_like_the_instance_list(broker, wf):
    one, two = held(broker, "ORD-h1"), held(broker, "ORD-h2")
    done = finished(broker, "ORD-done")

    code, document = saga_json("list", "--state", "needs_attention")
    assert code == 0
    rows = {row["business_key"]: row for row in document["instances"]}
    assert set(rows) == {"ORD-h1", "ORD-h2"}
    assert rows["ORD-h1"]["id"] == str(one.pk)
    assert rows["ORD-h1"]["blocked_step"] == "charge"
    assert rows["ORD-h1"]["attention_kind"] == "step_failed"
    assert document["more"] is False

    _, document = saga_json("list", "--business-key", "ORD-d")
    assert [r["id"] for r in document["instances"]] == [str(done.pk)]
    _, document = saga_json("list", "--failed-step", "charge", "--limit", "1")
    assert len(document["instances"]) == 1
    assert document["more"] is True
    _, document = saga_json("list", "--status", "finished")
    assert [r["business_key"] for r in document["instances"]] == ["ORD-done"]
    _, document = saga_json("list", "--definition", "orders", "--failed-step", "ship")
    assert document["instances"] == []

    code, out, _ = saga("list", "--state", "needs_attention", "--sort", "accepted")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ID", "DEFINITION", "BUSINESS"]
    # Oldest accepted first, with the short id, the hold and the step.
    assert lines[1].split()[:6] == [
        str(one.pk)[:8],
        "orders@1",
        "ORD-h1",
        "needs_attention",
        "step_failed,stuck:held",
        "charge",
    ]
    assert lines[2].split()[2] == "ORD-h2"
    assert str(two.pk)[:8] in lines[2]

    code, out, err = saga("list", "--state", "bogus")
    assert code == 2
    assert "--state" in err and "bogus" in err


def test_show_gives_the_catalogue_with_why_not(broker, wf, olga):
    instance = held(broker, "ORD-show")
    user_in("viewer", "vera")

    code, document = saga_json("show", str(instance.pk)[:6], "--user", "olga")
    assert code == 0
    assert document["id"] == str(instance.pk)
    assert document["state"] == "needs_attention"
    assert document["attention_kind"] == "step_failed"
    assert "charge" in document["attention_reason"]
    offered = {a["name"]: a for a in document["actions"]}
    assert list(offered) == list(actions.CATALOGUE)
    assert offered["retry_step"]["allowed"] is True
    assert offered["resume"]["allowed"] is False
    assert offered["resume"]["why_not"] == (
        "only an instance held for its deadline is resumed"
    )
    assert offered["mark_step_done"]["data_keys"] == ["output"]
    charge = next(s for s in document["steps"] if s["name"] == "charge")
    assert charge["blocking"] is True
    assert charge["state"] == "failed"
    assert [a["outcome"] for a in charge["attempts"]] == ["failed"]
    assert "payments returned 503" in charge["attempts"][0]["error"]
    rows = document["timeline"]["rows"]
    assert rows[-1]["transition"] == "hold"
    assert (
        document["timeline"]["total"]
        == TransitionLog.objects.filter(instance=instance).count()
    )

    _, document = saga_json("show", "ORD-show", "--user", "vera", "--history", "2")
    assert not any(a["allowed"] for a in document["actions"])
    assert {a["why_not"] for a in document["actions"]} >= {
        "you are not allowed to retry step now"
    }
    assert len(document["timeline"]["rows"]) == 2

    code, out, _ = saga("show", "ORD-show")
    assert code == 0
    assert "waits    step_failed: charge" in out
    assert "Actions for an operator with every permission" in out
    assert "only an instance held for its deadline is resumed" in out
    assert "action #1 (run 1)" in out  # the attempt under its step


# -- act -------------------------------------------------------------------------


def test_act_does_the_action_as_the_named_operator(broker, wf, olga):
    instance = held(broker, "ORD-act")
    code, out, _ = saga(
        "act",
        "ORD-act",
        "retry-step",
        "--reason",
        "INC-7: the gateway is back",
        "--user",
        "olga",
        "--expected-version",
        str(instance.version),
    )
    assert code == 0, out
    assert out.startswith("Retry step now: done on ORD-act")
    row = TransitionLog.objects.get(instance=instance, transition="retry_step")
    assert row.user == olga
    assert row.reason == "INC-7: the gateway is back"
    broker.run()  # the second attempt of the gateway succeeds
    assert fresh(instance).state == "completed"


def test_act_with_a_step_and_data(broker, wf, olga):
    instance = held(broker, "ORD-hand")
    code, document = saga_json(
        "act",
        str(instance.pk),
        "mark_step_done",
        "--step",
        "charge",
        "--data",
        '{"output": {"charged_by": "phone"}}',
        "--reason",
        "charged by phone",
        "--user",
        "olga",
    )
    assert code == 0
    assert document["done"] is True
    assert document["approval"] is None
    charge = StepExecution.objects.get(instance=instance, name="charge")
    assert charge.state == "skipped"  # done by hand, outside the system
    assert charge.output == {"charged_by": "phone"}

    # Unknown step, unknown data key: nothing is done.
    other = held(broker, "ORD-hand-2")
    version = other.version
    code, _, err = saga(
        "act", "ORD-hand-2", "mark_step_done", "--step", "nope", "--reason", "x",
        "--user", "olga",
    )  # fmt: skip
    assert code == 2
    assert "no step 'nope'" in err and "reserve, charge, ship" in err
    code, document = saga_json(
        "act", "ORD-hand-2", "mark_step_done", "--data", '{"out": 1}',
        "--reason", "x", "--user", "olga",
    )  # fmt: skip
    assert code == 2
    assert document["error"]["code"] == "invalid_input"
    assert "takes no out" in document["error"]["message"]
    assert fresh(other).version == version


def test_an_ambiguous_reference_is_refused_with_the_candidates(broker, wf, olga):
    first = held(broker, "ORD-twice")
    second = held(broker, "ORD-twice")
    code, _, err = saga("show", "ORD-twice")
    assert code == 2
    assert "ambiguous" in err
    assert str(first.pk) in err and str(second.pk) in err
    code, document = saga_json("show", str(second.pk)[:13])
    assert code == 0
    assert document["id"] == str(second.pk)
    code, _, err = saga("show", "no-such-thing")
    assert code == 2
    assert "no instance" in err


def test_exit_codes_of_a_real_process(broker, wf, olga):
    instance = held(broker, "ORD-exit")
    user_in("viewer", "vera")
    stale = str(instance.version - 1)
    base = ["--reason", "runbook step 3"]

    refused = run("act", "ORD-exit", "resume", *base, "--user", "olga")
    assert refused.returncode == 3, refused.stderr
    assert "only an instance held for its deadline is resumed" in refused.stderr

    forbidden = run("act", "ORD-exit", "compensate", *base, "--user", "vera")
    assert forbidden.returncode == 3, forbidden.stderr
    assert "not allowed" in forbidden.stderr

    changed = run(
        "act", "ORD-exit", "compensate", *base, "--user", "olga",
        "--expected-version", stale,
    )  # fmt: skip
    assert changed.returncode == 4, changed.stderr

    for bad in (
        ["act", "ORD-exit", "compensate", *base, "--user", "nobody"],
        ["act", "ORD-exit", "no_such_action", *base, "--user", "olga"],
        ["act", "ORD-exit", "compensate", "--user", "olga"],  # no reason
        ["act", "ORD-exit", "compensate", "--reason", "   ", "--user", "olga"],
        # Not UTF-8: Python hands it over as a lone surrogate, which the
        # database could not store.
        ["act", "ORD-exit", "compensate", "--reason", b"caf\xe9", "--user", "olga"],
        ["act", "ORD-exit", "mark_step_done", *base, "--user", "olga", "--data", "{"],
        ["list", "--limit", "0"],
    ):
        result = run(*bad)
        assert result.returncode == 2, (bad, result.stderr)
    assert fresh(instance).version == instance.version  # nothing was done

    done = run("act", str(instance.pk)[:8], "compensate", *base, "--user", "olga")
    assert done.returncode == 0, done.stderr
    assert "Compensate: done on ORD-exit" in done.stdout
    assert fresh(instance).state in {"compensating", "compensated"}

    helped = run("act", "--help")
    assert helped.returncode == 0
    assert "5  sent for approval" in helped.stdout
    assert "restart_from_step" in helped.stdout


# -- bulk ------------------------------------------------------------------------


def test_bulk_dry_run_previews_and_starts_nothing(broker, wf, olga):
    one, two = held(broker, "ORD-b1"), held(broker, "ORD-b2")
    done = finished(broker, "ORD-b3")
    code, document = saga_json(
        "bulk", "retry", "--business-key", "ORD-b", "--reason", "INC-7",
        "--user", "olga", "--dry-run",
    )  # fmt: skip
    assert code == 0
    assert document["dry_run"] is True
    assert document["counts"] == {"acting": 2, "skipped": 1}
    assert document["acting"] == [{"plan": "retry charge", "count": 2}]
    items = {item["business_key"]: item for item in document["items"]}
    assert items["ORD-b1"]["acts"] and items["ORD-b2"]["acts"]
    assert not items["ORD-b3"]["acts"]
    assert "nothing to retry" in items["ORD-b3"]["plan"]
    job = BulkJob.objects.get(pk=document["job"]["id"])
    # The draft is cancelled, on record; no instance changed.
    assert job.status == BulkJob.Status.CANCELLED
    assert job.description == "Business key starts with: ORD-b"
    assert [fresh(i).version for i in (one, two, done)] == [
        one.version,
        two.version,
        done.version,
    ]
    assert broker.queue == []

    code, out, _ = saga(
        "bulk", "retry", "--business-key", "ORD-b", "--reason", "INC-7",
        "--user", "olga", "--dry-run",
    )  # fmt: skip
    assert code == 0
    assert "Would act on 2:" in out and "Would skip 1:" in out
    assert "Dry run: nothing was done" in out


def test_bulk_plans_starts_and_the_worker_acts(broker, wf, olga):
    one, two = held(broker, "ORD-r1"), held(broker, "ORD-r2")
    code, out, _ = saga(
        "bulk", "retry", "--failed-step", "charge", "--state", "needs_attention",
        "--reason", "INC-7 resolved", "--user", "olga", "--rate", "50",
    )  # fmt: skip
    assert code == 0, out
    job = BulkJob.objects.get()
    assert job.status == BulkJob.Status.QUEUED
    assert job.rate == 50
    assert f"Started: job #{job.pk} is queued" in out
    broker.run()  # the job's worker, then the retried attempts
    job.refresh_from_db()
    assert job.status == BulkJob.Status.FINISHED
    outcomes = set(job.items.values_list("outcome", flat=True))
    assert outcomes == {BulkJobItem.Outcome.DONE}
    for instance in (one, two):
        assert fresh(instance).state == "completed"
        row = TransitionLog.objects.get(instance=instance, transition="retry_step")
        assert row.user == olga
        assert row.data["bulk_job"] == job.pk


def test_bulk_refuses_an_unfiltered_or_empty_selection(broker, wf, olga):
    finished(broker, "ORD-f1")
    common = ["--reason", "x", "--user", "olga"]
    assert saga("bulk", "compensate", *common)[0] == 2
    code, _, err = saga("bulk", "compensate", *common, "--business-key", "NOPE")
    assert code == 3 and "no instance matches" in err
    code, out, err = saga("bulk", "compensate", *common, "--state", "completed")
    assert code == 3
    assert "would be skipped" in err
    assert "already completed: nothing to compensate" in out
    assert not BulkJob.objects.exclude(status=BulkJob.Status.CANCELLED).exists()
    assert not ApprovalRequest.objects.exists()
