/* Golden-metric charts (uPlot) and edge tables, read from the UI's metrics
   routes, which answer the telemetry store's documents:
   {"data": {"service", "windows": {"1m"|"5m"|"15m"|"1h"|"24h": {"rps", "requests",
   "failures", "success_rate", "latency_ms": {"p50", "p95", "p99"}}}, "sources": [...]}}
   for a service (the table), {"data": {"window", "step_s", "points": [{"t", "rps",
   "success_rate", "latency_ms"}]}} for its series over 15m / 1h / 24h (the charts),
   and {"data": {"edges": [{"source", "destination", "windows"}]}} for edges.
   No data (no route, no traffic yet): the empty state stays. */
(function () {
  "use strict";

  var WINDOW_MINUTES = { "1m": 1, "5m": 5, "15m": 15, "1h": 60, "24h": 1440 };

  function windowsOf(doc) {
    var w = (doc && doc.windows) || {};
    return Object.keys(WINDOW_MINUTES).filter(function (k) { return w[k] && w[k].requests; })
      .map(function (k) { return { name: k, minutes: WINDOW_MINUTES[k], m: w[k] }; });
  }

  function pct(v) { return v === null || v === undefined ? "—" : (100 * v).toFixed(2) + "%"; }
  function num(v, digits) { return v === null || v === undefined ? "—" : Number(v).toFixed(digits); }

  function statTable(rows, selected) {
    var t = document.createElement("table");
    t.className = "metrics";
    var head = t.createTHead().insertRow();
    ["window", "requests/s", "success", "p50 ms", "p95 ms", "p99 ms", "requests"].forEach(function (h) {
      var th = document.createElement("th"); th.scope = "col"; th.textContent = h; head.appendChild(th);
    });
    var body = t.createTBody();
    rows.forEach(function (r) {
      var tr = body.insertRow();
      if (r.name === selected) { tr.className = "selected"; }
      tr.dataset.window = r.name;
      var lat = r.m.latency_ms || {};
      [r.name, num(r.m.rps, 2), pct(r.m.success_rate), num(lat.p50, 1), num(lat.p95, 1), num(lat.p99, 1), String(r.m.requests)]
        .forEach(function (v) { tr.insertCell().textContent = v; });
    });
    return t;
  }

  function plot(container, title, points, series, width) {
    var box = document.createElement("div");
    box.className = "plot";
    var h = document.createElement("h3");
    h.textContent = title;
    box.appendChild(h);
    container.appendChild(box);
    var data = [points.map(function (p) { return p.t; })];
    var opts = { width: width, height: 160, series: [{ label: "time" }], axes: [{}, {}], scales: { x: { time: true } } };
    series.forEach(function (s) {
      opts.series.push({ label: s[0], stroke: s[2], points: { show: points.length < 3 } });
      data.push(points.map(function (p) { var v = s[1](p); return v === undefined ? null : v; }));
    });
    new window.uPlot(opts, data, box);
  }

  function getJSON(url) {
    return fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (payload) { return payload && payload.data; });
  }

  function loadChart(chart, windowName) {
    var seriesUrl = chart.dataset.seriesUrl + "?window=" + encodeURIComponent(windowName);
    Promise.all([getJSON(chart.dataset.metricsUrl), getJSON(seriesUrl)])
      .then(function (docs) {
        var rows = windowsOf(docs[0]);
        var points = (docs[1] && docs[1].points) || [];
        var plots = chart.querySelector(".plots");
        var empty = chart.querySelector(".empty");
        plots.textContent = "";
        if (!rows.length) { empty.hidden = false; chart.dataset.state = "empty"; return; }
        empty.hidden = true;
        chart.dataset.state = "data";
        chart.dataset.points = String(points.length);
        chart.dataset.step = docs[1] ? String(docs[1].step_s) : "";
        plots.appendChild(statTable(rows, windowName));
        if (!window.uPlot || !points.length) { return; }
        var width = Math.max(280, Math.floor((chart.clientWidth - 48) / 3));
        plot(plots, "Requests per second", points, [["rps", function (p) { return p.rps; }, "#2563eb"]], width);
        plot(plots, "Success rate", points, [["success", function (p) { return p.success_rate; }, "#15803d"]], width);
        plot(plots, "Latency (ms)", points, [
          ["p50", function (p) { return (p.latency_ms || {}).p50; }, "#0891b2"],
          ["p95", function (p) { return (p.latency_ms || {}).p95; }, "#ca8a04"],
          ["p99", function (p) { return (p.latency_ms || {}).p99; }, "#dc2626"]
        ], width);
      })
      .catch(function () {});
  }

  function edges(payload) {
    var d = payload && payload.data;
    return (d && d.edges) || [];
  }

  function loadEdges(table) {
    fetch(table.dataset.edgesUrl, { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (payload) {
        // Calls that failed (refused by an intention, or erroring) in the last 5 minutes.
        var rows = edges(payload).map(function (e) {
          var w = (e.windows || {})["5m"] || {};
          return { source: e.source, destination: e.destination, failures: w.failures || 0, success: w.success_rate };
        }).filter(function (e) { return e.failures > 0; });
        rows.sort(function (a, b) { return b.failures - a.failures; });
        if (!rows.length) { return; }
        var t = document.createElement("table");
        rows.slice(0, 10).forEach(function (e) {
          var tr = t.insertRow();
          var a = document.createElement("a");
          a.href = "/ui/intentions?source=" + encodeURIComponent(e.source) + "&destination=" + encodeURIComponent(e.destination);
          a.textContent = e.source + " → " + e.destination;
          tr.insertCell().appendChild(a);
          tr.insertCell().textContent = e.failures + " failed (" + pct(e.success) + " success), last 5 min";
        });
        table.textContent = "";
        table.appendChild(t);
      })
      .catch(function () {});
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll(".chart[data-metrics-url]").forEach(function (chart) {
      chart.querySelectorAll("button[data-window]").forEach(function (b) {
        b.addEventListener("click", function () {
          chart.querySelectorAll("button[data-window]").forEach(function (o) { o.setAttribute("aria-pressed", "false"); });
          b.setAttribute("aria-pressed", "true");
          loadChart(chart, b.dataset.window);
        });
      });
      loadChart(chart, "15m");
    });
    document.querySelectorAll("[data-edges-url][data-mode=denied]").forEach(loadEdges);
  });
})();
