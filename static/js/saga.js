// Saga Desk: the little behaviour htmx attributes cannot express.
// Loaded as a file (the CSP forbids inline scripts); no framework.
(function () {
  "use strict";

  function showPageAlert(text) {
    var box = document.getElementById("page-alert");
    if (!box) return;
    box.textContent = text;
    box.hidden = false;
  }

  // "Select all on this page" for the bulk actions of the instance list.
  document.addEventListener("change", function (event) {
    var box = event.target;
    if (!box.matches || !box.matches("input[data-select-all]")) return;
    var table = box.closest("table");
    var name = box.getAttribute("data-select-all");
    table.querySelectorAll('input[type="checkbox"][name="' + name + '"]').forEach(function (item) {
      item.checked = box.checked;
    });
  });

  // Shared links stay short: the list's empty filters stay out of the URL.
  document.addEventListener("htmx:configRequest", function (event) {
    var form = event.detail.elt;
    if (event.detail.verb !== "get" || !form.closest || !form.closest("#filters")) return;
    var params = event.detail.parameters;
    Object.keys(params).forEach(function (name) {
      if (params[name] === "") delete params[name];
    });
  });

  // htmx leaves error answers out of the page (403, 500, a failed CSRF
  // check): say so instead of failing silently.
  document.addEventListener("htmx:responseError", function (event) {
    var status = event.detail.xhr.status;
    var text = status === 403
      ? "The server refused this request (403): your session or permissions may have changed. Reload the page."
      : "The server could not handle this request (" + status + "). Reload the page and try again.";
    showPageAlert(text);
  });
  document.addEventListener("htmx:sendError", function () {
    showPageAlert("The server cannot be reached. The page will update when it is back.");
  });
  document.addEventListener("htmx:afterRequest", function (event) {
    if (event.detail.successful) {
      var box = document.getElementById("page-alert");
      if (box && !box.hidden && event.detail.requestConfig.verb !== "get") box.hidden = true;
    }
  });

  // A page part that refreshes itself (hx-trigger "every ...") and the
  // actions that answer into it (the instance page): a refresh must never
  // replace an action's answer, nor show the state from before it. The
  // responses to the two requests may come back in either order, and each
  // replaces the part it was sent for: if a refresh's lands between the
  // click and the action's, the action's answer is dropped (its target is
  // gone) and its one-off message with it. hx-sync cannot settle this
  // without aborting the refresh, and htmx 2 logs every aborted request as
  // a console error ("htmx:sendAbort"); so refreshes are left to finish and
  // this guard decides, per part (by id), which answers may be swapped in:
  // a refresh sent while an action is under way is not sent, and the answer
  // to one sent before an action is not swapped in. The next refresh, sent
  // from the action's answer, carries on.
  var actionsByPart = {};

  function polledPart(target) {
    var trigger = target && target.id && target.getAttribute("hx-trigger");
    if (!trigger || !/\bevery\b/.test(trigger)) return null;
    if (!actionsByPart[target.id]) actionsByPart[target.id] = { sent: 0, underWay: 0 };
    return actionsByPart[target.id];
  }

  document.addEventListener("htmx:beforeRequest", function (event) {
    var detail = event.detail;
    var part = polledPart(detail.target);
    if (!part || detail.requestConfig.verb !== "get") return;
    if (part.underWay > 0) {
      event.preventDefault(); // not sent at all: nothing aborted, nothing logged
      return;
    }
    detail.xhr.sagaActionsBefore = part.sent;
  });

  // Counted when it is sent (htmx:beforeSend cannot be cancelled any more).
  document.addEventListener("htmx:beforeSend", function (event) {
    var detail = event.detail;
    var part = polledPart(detail.target);
    if (!part || detail.requestConfig.verb === "get") return;
    part.sent += 1;
    part.underWay += 1;
    // loadend comes after the answer was swapped in, and after an error, a
    // timeout or an abort too.
    detail.xhr.addEventListener("loadend", function () {
      part.underWay -= 1;
    });
  });

  document.addEventListener("htmx:beforeSwap", function (event) {
    var detail = event.detail;
    var before = detail.xhr.sagaActionsBefore;
    var part = polledPart(detail.target);
    if (part && before !== undefined && part.sent > before) detail.shouldSwap = false;
  });

  // After an action, move focus to its outcome so keyboard and screen-reader
  // users learn what happened.
  document.addEventListener("htmx:afterSettle", function () {
    var message = document.getElementById("action-message");
    if (message && !message.dataset.seen) {
      message.dataset.seen = "1";
      message.setAttribute("tabindex", "-1");
      message.focus();
    }
    var bulk = document.getElementById("bulk-result");
    if (bulk && bulk.querySelector("h2") && !bulk.dataset.seen) {
      bulk.dataset.seen = "1";
      bulk.focus();
    }
  });
})();
