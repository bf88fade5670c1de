"""The instance page refreshes itself every second and its actions answer
into the same part: in a real browser, with the two answers held back and
let go in a chosen order, an action's answer is what stays on the page,
whichever answer comes back first (issue 15).

Playwright holds the requests (``page.route``) and fetches their answers
from the live server at the moment a slow network or a loaded server would
have: the refresh's before the click, so it shows the state from before the
action; the action's after the click. Then it lets them reach the page.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.support import user_in
from tests.views.conftest import held
from tests.views.test_browser import (  # noqa: F401 - fixtures
    TIMEOUT,
    browser,
    expect,
    fast_polling,
    open_session,
    pytestmark,
)

# The refreshes of #instance-live ask "anything new since <token>?".
REFRESH = re.compile(r"/instances/[0-9a-f-]+/\?since=")
ACTION = re.compile(r"/instances/[0-9a-f-]+/actions/retry_step/")
COUNT_REFRESH_ANSWERS = """() => {
  window.__refreshesAnswered = 0;
  document.addEventListener("htmx:afterRequest", function (event) {
    if (event.detail.requestConfig.verb === "get") window.__refreshesAnswered += 1;
  });
}"""


def held_back(page, pattern: re.Pattern[str]) -> list[Any]:
    """The first request matching ``pattern``, held until the test lets it go
    (its route is in the list once it was sent); later ones go on as usual."""
    routes: list[Any] = []

    def hold(route) -> None:
        if routes:
            route.continue_()
        else:
            routes.append(route)

    page.route(pattern, hold)
    return routes


def wait_for(page, routes: list[Any]) -> Any:
    for _ in range(100):
        if routes:
            return routes[0]
        page.wait_for_timeout(50)  # lets Playwright call the route handler
    raise AssertionError("the request was never sent")


def let_go(page, refresh, stale) -> None:
    """The held refresh reaches the page, and the page is done with it."""
    page.evaluate("() => { window.__refreshesAnswered = 0; }")
    refresh.fulfill(response=stale)
    page.wait_for_function("() => window.__refreshesAnswered >= 1")


@pytest.mark.parametrize(
    "race",
    [
        "refresh sent before, first back",
        "refresh sent before, last back",
        "refresh sent during",
    ],
)
def test_an_action_answer_is_not_replaced_by_a_refresh(
    broker,
    wf,
    open_session,  # noqa: F811
    fast_polling,  # noqa: F811
    race,
):
    instance = held(broker, "order-race")
    page = open_session(user_in("operator", "olga"))
    page.goto(f"/instances/{instance.pk}/")
    live = page.locator("#instance-live")
    expect(live).to_have_attribute("data-state", "needs_attention")
    page.evaluate(COUNT_REFRESH_ANSWERS)

    if race != "refresh sent during":
        refreshes = held_back(page, REFRESH)
        refresh = wait_for(page, refreshes)
        # Answered now, before the action: the state from before it. A
        # changed token stands for something that happened meanwhile (else
        # the answer is an empty 204, which replaces nothing).
        stale = refresh.fetch(url=refresh.request.url.replace("since=", "since=old-"))
        assert stale.status == 200 and 'data-state="needs_attention"' in stale.text()

    actions = held_back(page, ACTION)
    page.get_by_text("Retry step now: two").click()
    page.locator("#action-retry_step").get_by_label("Reason").fill("payments is back")
    page.get_by_role("button", name="Confirm: retry step now").click()
    action = wait_for(page, actions)
    done = action.fetch()  # the server retries the step now
    assert done.status == 200 and "Retry step now: done." in done.text()

    if race == "refresh sent before, first back":
        let_go(page, refresh, stale)
        action.fulfill(response=done)
    elif race == "refresh sent before, last back":
        action.fulfill(response=done)
        expect(page.locator("#action-message")).to_have_text("Retry step now: done.")
        let_go(page, refresh, stale)
    else:
        # Two refresh periods with the action's answer still on its way: a
        # refresh sent now would show the new state without the message,
        # and come back first.
        page.wait_for_timeout(2_500)
        action.fulfill(response=done)

    message = page.locator("#action-message")
    expect(message).to_have_text("Retry step now: done.", timeout=TIMEOUT)
    expect(live).to_have_attribute("data-state", "running")
    # Refreshes go on (the step's retry is queued, nothing new): two more
    # seconds, and the answer to the action is still what the page shows.
    page.wait_for_timeout(2_000)
    expect(message).to_have_text("Retry step now: done.", timeout=1)
    expect(live).to_have_attribute("data-state", "running", timeout=1)
    assert page.locator("#why-it-waits").count() == 0
