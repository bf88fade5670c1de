"""The parallel view in a real browser (Playwright, Debian's Chromium): a
stage's branches shown together in the progress strip and the steps table,
live while they run, fail and are undone; names escaped, the page
accessible (the session fixture runs axe-core and watches the CSP)."""

from __future__ import annotations

from tests.support import make_definition, start, user_in
from tests.views import test_browser as shared

# The browser session fixtures of the dashboard's browser tests (they log
# in, watch the CSP and run axe-core on every page seen).
browser = shared.browser
open_session = shared.open_session
fast_polling = shared.fast_polling
expect = shared.expect

# The same marks: a transactional database, skipped without Chromium outside CI.
pytestmark = shared.pytestmark

STEPS = [
    {"name": "first"},
    {"name": "left"},
    {"name": "right", "parallel_with_previous": True},
    {"name": "after"},
]


def test_operator_watches_branches_run_side_by_side_and_undo(
    broker_no_inline, open_session, fast_polling
):
    broker = broker_no_inline
    make_definition("fork", steps=STEPS)
    key = "<b>fork-1</b>"
    instance = start("fork", key, simulate={"right": "fail"})
    broker.deliver(broker.queue.pop(0))  # advance: start, schedule first
    broker.deliver(broker.queue.pop(0))  # first runs; the stage is scheduled
    assert len(broker.queue) == 2  # both branches dispatched at once

    page = open_session(user_in("operator", "olga"))
    page.goto(f"/instances/{instance.pk}/")
    expect(page.locator("h1")).to_have_text(key)  # escaped, shown as text
    stage = page.locator("#stage-2")
    expect(stage.locator(".strip__fork")).to_have_text("stage 2: 2 branches at once")
    branches = stage.get_by_role(
        "list", name="branches of stage 2, run at the same time"
    )
    expect(branches.locator(".strip__step")).to_have_count(2)
    left, right = page.locator("#strip-left"), page.locator("#strip-right")
    expect(left.locator(".strip__action")).to_contain_text("scheduled")
    expect(right.locator(".strip__action")).to_contain_text("scheduled")
    # Side by side in the flow: one column between "first" and "after".
    first_box = page.locator("#strip-first").bounding_box()
    after_box = page.locator("#strip-after").bounding_box()
    left_box, right_box = left.bounding_box(), right.bounding_box()
    assert first_box and after_box and left_box and right_box
    assert abs(left_box["x"] - right_box["x"]) < 1
    assert first_box["x"] < left_box["x"] < after_box["x"]
    expect(page.locator("#step-right")).to_contain_text("stage 2, branch 2 of 2")

    # The left branch succeeds, the right one is declined for good: the
    # instance turns back, undoing the stage before the step before it.
    broker.deliver(next(m for m in broker.queue if _step_name(m) == "left"))
    expect(left.locator(".strip__action")).to_contain_text("succeeded")
    expect(right.locator(".strip__action")).to_contain_text("scheduled")
    broker.run()
    expect(page.locator("#instance-live")).to_have_attribute(
        "data-state", "compensated"
    )
    expect(left.locator(".strip__comp")).to_contain_text("undone")
    expect(right.locator(".strip__comp")).to_contain_text("not needed")
    expect(page.locator("#strip-first .strip__comp")).to_contain_text("undone")
    expect(page.locator("#strip-after .strip__action")).to_contain_text("not run")


def _step_name(message) -> str:
    from workflows_app.models import StepExecution

    if message.task != "run_attempt":
        return ""
    return StepExecution.objects.get(pk=message.args[1]).name
