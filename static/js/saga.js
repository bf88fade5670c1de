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
