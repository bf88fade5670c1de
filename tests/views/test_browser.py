"""The dashboard in a real browser: Playwright drives Debian's headless
Chromium against a live test server on the test database.

Workflow progress comes from the in-memory transport: the live server runs in
a thread of this process, so the engine's messages land in ``broker.queue``
and the test delivers them (``broker.run()``) when it wants the work done.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import pytest
from django.contrib.auth.models import User

from tests.support import make_definition, start, user_in
from tests.views.conftest import HOLD_STEPS, fresh, held
from workflows_app.alerts import sync_alerts
from workflows_app.engine.locking import db_now
from workflows_app.models import SavedView, TransitionLog

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.django_db(transaction=True),
    # CI installs Chromium (.ci/run), so there a missing browser is a failure.
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
        reason="needs Debian's chromium (apt-get install chromium)",
    ),
]
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT = 10_000


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api")
    # Sync Playwright keeps an event loop in this thread; the ORM calls the
    # tests make between browser steps are ordinary synchronous code.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()
    if previous is None:
        os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)


# axe-core, vendored from npm (static/vendor/axe-core): loaded from this
# origin, so the pages' Content-Security-Policy allows it.
AXE = "/static/vendor/axe-core/axe.min.js"
BLOCKING_IMPACTS = {"serious", "critical"}
# Every CSP violation, also those Chromium does not log to the console.
WATCH_CSP = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", function (event) {
  window.__cspViolations.push(event.violatedDirective + " " + event.blockedURI);
});
"""
RUN_AXE = """async () => {
  const result = await axe.run(document, {resultTypes: ["violations"]});
  return result.violations.map(v => ({
    id: v.id, impact: v.impact, help: v.help,
    nodes: v.nodes.slice(0, 3).map(n => n.target.join(" ")),
  }));
}"""


def accessibility_problems(page) -> list[str]:
    """axe-core's serious and critical findings on the page as it is now."""
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.add_script_tag(url=AXE)
    return [
        f"{page.url}: {v['id']} ({v['impact']}): {v['help']} at {v['nodes']}"
        for v in page.evaluate(RUN_AXE)
        if v["impact"] in BLOCKING_IMPACTS
    ]


# Page kinds already loaded again and checked in this test run: each kind
# once keeps the check quick (final states are checked in every test).
CHECKED_KINDS: set[str] = set()


def page_kind(url: str) -> str:
    """The URL with its ids and query values left out: one kind of page."""
    parts = urlsplit(url)
    path = re.sub(r"/[0-9a-f-]{36}/|/\d+/", "/<id>/", parts.path)
    return path + "?" + ",".join(sorted(parse_qs(parts.query)))


def csp_violations(page) -> list[str]:
    return page.evaluate("window.__cspViolations || []")


@pytest.fixture
def open_session(browser, live_server, request):
    """A logged-in browser session per user, each its own cookie jar. Every
    console error (a CSP violation, a failed request) fails the test, and so
    does a serious or critical axe-core finding on any page the test saw: in
    its final state, and each page it loaded, loaded again at the end."""
    contexts, errors, visited, problems = [], [], [], []

    def open_as(user: User):
        context = browser.new_context(
            base_url=live_server.url, viewport={"width": 1366, "height": 900}
        )
        context.add_init_script(WATCH_CSP)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT)
        page.on("dialog", lambda dialog: dialog.accept())  # hx-confirm
        page.on(
            "console",
            lambda msg: errors.append(msg.text) if msg.type == "error" else None,
        )
        page.on("load", lambda: visited.append((context, page.url)))
        page.goto("/login/")
        # Checked here: loaded again at the end, signed in, it redirects.
        if page_kind(page.url) not in CHECKED_KINDS:
            CHECKED_KINDS.add(page_kind(page.url))
            problems.extend(accessibility_problems(page))
        page.get_by_label("Username").fill(user.username)
        page.get_by_label("Password").fill("pw")
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url(f"{live_server.url}/")
        return page

    yield open_as
    violations = []
    for context in contexts:
        for page in context.pages:
            violations += csp_violations(page)
            problems += accessibility_problems(page)
            CHECKED_KINDS.add(page_kind(page.url))
    for context, url in visited:
        if page_kind(url) in CHECKED_KINDS or url.startswith("about:"):
            continue
        page = context.pages[0]
        page.goto(url)
        violations += csp_violations(page)
        if page_kind(page.url) not in CHECKED_KINDS:  # not redirected to one
            CHECKED_KINDS.update({page_kind(url), page_kind(page.url)})
            problems += accessibility_problems(page)
    for context in contexts:
        context.close()
    # 409 answers are expected in the concurrency test; a test that expects
    # other error answers (a form refused with 422) says so with a marker.
    marker = request.node.get_closest_marker("expected_http_errors")
    allowed = {"409", *(marker.args if marker else ())}
    assert [e for e in errors if not any(code in e for code in allowed)] == []
    assert violations == []
    assert problems == []


@pytest.fixture
def fast_polling(settings):
    settings.SAGA_DASHBOARD_POLL_SECONDS = 1


def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def test_viewer_finds_a_stuck_instance_and_reads_its_timeline(broker, wf, open_session):
    start("wf", "fine-1")
    stuck = held(broker, "stuck-1")
    page = open_session(user_in("viewer", "victor"))
    queue = page.locator("#stuck-queue")
    expect(queue).to_contain_text("stuck-1")
    expect(queue).to_contain_text("two: step failed")
    # Keyboard only: focus the link in the queue and follow it.
    queue.get_by_role("link", name="stuck-1").focus()
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/instances/{stuck.pk}/")
    expect(page.locator("h1")).to_have_text("stuck-1")
    expect(page.locator(".instance-head__badges")).to_contain_text("needs attention")
    expect(page.locator("#state-meaning")).to_contain_text("waiting for a person")
    timeline = page.locator("#timeline")
    expect(timeline).to_contain_text("hold")
    expect(timeline).to_contain_text("fail")
    # A viewer sees no action at all.
    expect(page.locator("#actions form")).to_have_count(0)
    expect(page.locator("#actions")).to_contain_text("needs the operator role")
    # The list filters in place, and the address bar holds a shareable link.
    page.goto("/instances/")
    page.get_by_label("State").select_option("needs_attention")
    page.wait_for_url("**/instances/?state=needs_attention")
    expect(page.locator("#instance-table tbody tr")).to_have_count(1)
    expect(page.locator("#instance-table")).to_contain_text("stuck-1")
    # The alert list's status tabs (checked by axe-core at the end).
    page.goto("/alerts/")
    page.get_by_role("link", name="Acknowledged").click()
    page.wait_for_url("**/alerts/?status=acknowledged")
    page.get_by_role("link", name="Resolved").click()
    page.wait_for_url("**/alerts/?status=resolved")
    # The other pages of the menu, for the accessibility check.
    menu = page.get_by_role("navigation", name="Main")
    for name, heading in [
        ("Definitions", "Definitions"),
        ("Bulk jobs", "Bulk jobs"),
        ("Webhooks", "Webhooks"),
        ("Failures", "Failure groups"),
    ]:
        menu.get_by_role("link", name=name).click()
        expect(page.locator("h1")).to_have_text(heading)
    page.locator("main").get_by_role("link", name="Hide known").click()
    page.wait_for_url("**/failures/?known=hide")
    page.goto("/definitions/wf/")
    expect(page.locator("#health")).to_contain_text("needs attention")


def test_operator_retries_a_failed_step_and_sees_it_move_on(
    broker, wf, open_session, fast_polling
):
    instance = held(broker, "order-1")
    sync_alerts(db_now(), 100)  # the hold's alert is open
    page = open_session(user_in("operator", "olga"))
    page.goto(f"/instances/{instance.pk}/")
    expect(page.locator("#why-it-waits")).to_contain_text("Why it waits")
    acknowledge = page.get_by_role("button", name="Acknowledge: I am on it")
    expect(acknowledge).to_have_count(1)
    page.get_by_text("Retry step now: two").click()
    page.locator("#action-retry_step").get_by_label("Reason").fill("payments is back")
    page.get_by_role("button", name="Confirm: retry step now").click()
    expect(page.locator("#action-message")).to_have_text("Retry step now: done.")
    # The same answer dropped the old alert and its button: no waiting.
    assert acknowledge.count() == 0
    assert page.locator("#why-it-waits").count() == 0
    assert "No open alerts." in page.locator("#alerts").inner_text()
    expect(page.locator("#instance-live")).to_have_attribute("data-state", "running")
    broker.run()  # the worker runs step two again, then step three
    # The page refreshes itself (htmx polling): no reload.
    live = page.locator("#instance-live")
    expect(live).to_have_attribute("data-state", "completed", timeout=TIMEOUT)
    expect(page.locator(".instance-head__badges")).to_contain_text("completed")
    row = page.locator("#timeline tr", has_text="retry_step").first
    expect(row).to_contain_text("olga")
    expect(row).to_contain_text("payments is back")
    assert fresh(instance).state == "completed"
    # Finished: attempts counted in the retry's fresh budget, no deadline
    # ahead, and htmx added no inline style (the CSP forbids them).
    expect(page.locator("#step-two")).to_contain_text("1 of 1 (fresh budget; 1 before)")
    expect(page.locator("#instance-deadline")).to_have_text("none: finished")
    assert page.evaluate("document.querySelectorAll('style').length") == 0


def test_operator_compensates_an_instance_on_hold_and_watches_it_undo(
    broker_no_inline, open_session, fast_polling
):
    broker = broker_no_inline
    make_definition("wf", steps=HOLD_STEPS, failure_policy="hold")
    instance = start("wf", "order-2", simulate={"three": "fail"})
    broker.run()
    instance = fresh(instance)
    assert instance.state == "needs_attention"
    page = open_session(user_in("operator", "olga"))
    page.goto(f"/instances/{instance.pk}/")
    page.locator("#action-compensate summary").click()
    page.locator("#action-compensate").get_by_label("Reason").fill("customer left")
    page.get_by_role("button", name="Confirm: compensate").click()
    expect(page.locator("#action-message")).to_have_text("Compensate: done.")
    strip = page.locator("#progress-strip li")
    expect(page.locator("#instance-live")).to_have_attribute(
        "data-state", "compensating"
    )
    # Newest first: step three was declined for good, so nothing of it is
    # undone; step two's undo is queued, step one waits its turn.
    expect(strip.nth(2).locator(".strip__comp")).to_contain_text("not needed")
    expect(strip.nth(1).locator(".strip__comp")).to_contain_text("pending")
    expect(strip.nth(0).locator(".strip__comp")).to_contain_text("undo ready")
    broker.deliver(broker.queue.pop(0))  # step two's compensation runs
    expect(strip.nth(1).locator(".strip__comp")).to_contain_text("undone")
    expect(strip.nth(0).locator(".strip__comp")).to_contain_text("pending")
    broker.run()  # then step one's
    expect(page.locator("#instance-live")).to_have_attribute(
        "data-state", "compensated"
    )
    for n in range(2):
        expect(strip.nth(n).locator(".strip__comp")).to_contain_text("undone")
    expect(strip.nth(2).locator(".strip__comp")).to_contain_text("not needed")
    expect(page.locator("#timeline")).to_contain_text("finish_compensation")


def test_two_sessions_act_at_once_and_the_second_is_told_it_changed(
    broker, wf, open_session, settings
):
    settings.SAGA_DASHBOARD_POLL_SECONDS = 120  # neither page refreshes itself
    instance = held(broker, "order-3")
    first = open_session(user_in("operator", "olga"))
    second = open_session(user_in("operator", "oscar"))
    url = f"/instances/{instance.pk}/"
    first.goto(url)
    second.goto(url)
    first.get_by_text("Retry step now: two").click()
    first.locator("#action-retry_step").get_by_label("Reason").fill("payments is back")
    first.get_by_role("button", name="Confirm: retry step now").click()
    expect(first.locator("#action-message")).to_have_text("Retry step now: done.")
    # The second operator still sees the old page and closes it as failed.
    second.locator("#action-close_as_failed summary").click()
    second.locator("#action-close_as_failed").get_by_label("Reason").fill("give up")
    second.get_by_role("button", name="Confirm: close as failed").click()
    message = second.locator("#action-message")
    expect(message).to_contain_text("This instance changed meanwhile")
    # ...with the fresh state in place of the stale one, and no stale button.
    expect(second.locator("#instance-live")).to_have_attribute("data-state", "running")
    expect(second.locator("#action-close_as_failed")).to_have_count(0)
    assert not TransitionLog.objects.filter(transition="close_as_failed").exists()
    assert TransitionLog.objects.filter(transition="retry_step").count() == 1


def test_htmx_apply_shows_the_tools_of_the_filtered_list(broker, open_session):
    """Apply swaps the results in place (no reload), and with them what
    depends on the filters: "Act on all matching…", "Save this list as" and
    a search error."""
    make_definition("wf", steps=HOLD_STEPS, search_attributes={"customer": "c"})
    start("wf", "ORD-54020-76", c="C-349")
    start("wf", "ORD-54021-77", c="C-350")
    page = open_session(user_in("operator", "olga"))
    page.goto("/instances/")
    page.evaluate("window.notReloaded = true")
    results = page.locator("#instance-results")
    expect(results).to_contain_text("2 instances")
    expect(page.get_by_text("Save this list as")).to_have_count(0)
    expect(page.get_by_role("link", name="Act on all matching…")).to_have_count(0)

    page.get_by_label("Search").fill("customer:c-349")
    page.get_by_role("button", name="Apply", exact=True).click()
    page.wait_for_url("**/instances/?q=customer%3Ac-349*")
    expect(results).to_contain_text("1 instance")
    expect(page.locator("#instance-table")).to_contain_text("ORD-54020-76")
    act = page.get_by_role("link", name="Act on all matching…")
    expect(act).to_have_attribute("href", re.compile(r"q=customer%3Ac-349"))
    expect(page.get_by_label("Save this list as")).to_be_visible()
    assert page.evaluate("window.notReloaded") is True

    # A search the list cannot run: its error, no rows, no tools.
    page.get_by_label("Search").fill("custmer:c-349")
    page.get_by_role("button", name="Apply", exact=True).click()
    expect(page.locator("#filter-errors")).to_contain_text("custmer")
    expect(page.get_by_role("link", name="Act on all matching…")).to_have_count(0)
    expect(results).to_contain_text("0 instances")

    # The short id shown under a key finds it; the saved list keeps the search.
    page.get_by_label("Search").fill("ord-54021")
    page.get_by_role("button", name="Apply", exact=True).click()
    expect(page.locator("#instance-table tbody tr")).to_have_count(1)
    # Leaving the field ("change") and Apply ("submit") both ask for the
    # results: let the answer land before typing into the part it swaps.
    expect(page.locator(".htmx-request")).to_have_count(0)
    page.get_by_label("Save this list as").fill("one order")
    page.get_by_role("button", name="Save view").click()
    expect(page.locator("body")).to_contain_text("one order")
    assert page.evaluate("window.notReloaded") is None  # a real POST, then a page
    view = SavedView.objects.get(name="one order")
    assert "q=ord-54021" in view.query
