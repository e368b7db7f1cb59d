/* meshweb UI: live updates over server-sent events, confirmations, form helpers.
   No polling: the page listens to /ui/events and re-reads its live regions
   (elements with data-live, refreshed by htmx) when the server says a topic
   they show has changed. */
(function () {
  "use strict";

  function setStatus(text) {
    var el = document.getElementById("live-status");
    if (el) { el.textContent = text; el.dataset.state = text; }
  }

  function refresh() {
    document.querySelectorAll("[data-live]").forEach(function (el) {
      if (window.htmx) { window.htmx.trigger(el, "mesh:changed"); }
    });
  }

  function connect() {
    var holder = document.getElementById("live-status");
    var topics = holder ? (holder.dataset.liveTopics || "").trim() : "";
    if (!topics || !window.EventSource) { return; }
    var opened = false;
    var source = new EventSource("/ui/events?topics=" + encodeURIComponent(topics));
    source.addEventListener("hello", function () {
      if (opened) { refresh(); } // reconnected: changes may have been missed
      opened = true;
      setStatus("live");
    });
    source.addEventListener("change", refresh);
    source.addEventListener("signout", function () {
      source.close();
      window.location.assign("/ui/login");
    });
    source.onerror = function () { setStatus("reconnecting"); };
    window.addEventListener("pagehide", function () { source.close(); });
  }

  // Destructive actions ask first: <form data-confirm="Delete X?">.
  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    if (form.dataset && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      ev.preventDefault();
      ev.stopImmediatePropagation();
    }
  }, true);

  // Split weights: the running total, checked as you type (the server checks again).
  function checkWeights(form) {
    var inputs = form.querySelectorAll("input[data-weight]");
    var total = 0;
    inputs.forEach(function (i) { var v = parseFloat(i.value); if (!isNaN(v)) { total += v; } });
    var out = form.querySelector("[data-weight-total]");
    if (!out) { return; }
    var ok = Math.abs(total - 100) < 0.01;
    out.textContent = "Total: " + (Math.round(total * 100) / 100) + "%" + (ok ? "" : " (must be 100)");
    out.classList.toggle("field-error", !ok);
    var submit = form.querySelector("[data-needs-weights]");
    if (submit) { submit.disabled = !ok; }
  }
  document.addEventListener("input", function (ev) {
    var form = ev.target.form;
    if (form && ev.target.dataset && ev.target.dataset.weight !== undefined) { checkWeights(form); }
  });

  // Buttons that copy a command: <button data-copy="#id">.
  document.addEventListener("click", function (ev) {
    var btn = ev.target.closest ? ev.target.closest("[data-copy]") : null;
    if (!btn) { return; }
    var src = document.querySelector(btn.dataset.copy);
    if (src && navigator.clipboard) {
      navigator.clipboard.writeText(src.textContent.trim()).then(function () { btn.textContent = "Copied"; }, function () {});
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    connect();
    document.querySelectorAll("form").forEach(function (f) {
      if (f.querySelector("input[data-weight]")) { checkWeights(f); }
    });
  });
})();
