/* Golden-metric charts (uPlot) and edge tables, read from the UI's metrics
   routes. Shapes read: {"data": {"points": [{"t": <unix s>, "rps": n,
   "success_rate": 0..1, "p50_ms": n, "p95_ms": n, "p99_ms": n}, ...]}} for a
   service, {"data": {"edges": [{"source", "destination", "rps",
   "success_rate", "denied"}, ...]}} for edges. No data: the empty state stays. */
(function () {
  "use strict";

  function points(payload) {
    var d = payload && payload.data;
    if (!d) { return []; }
    return Array.isArray(d) ? d : (d.points || d.series || []);
  }

  function edges(payload) {
    var d = payload && payload.data;
    if (!d) { return []; }
    return Array.isArray(d) ? d : (d.edges || []);
  }

  function plot(container, title, rows, fields, width) {
    var xs = rows.map(function (r) { return r.t; });
    var series = [{}];
    var data = [xs];
    fields.forEach(function (f) {
      series.push({ label: f[1], stroke: f[2] });
      data.push(rows.map(function (r) { return r[f[0]] === undefined ? null : r[f[0]]; }));
    });
    var box = document.createElement("div");
    box.className = "plot";
    var h = document.createElement("h3");
    h.textContent = title;
    box.appendChild(h);
    container.appendChild(box);
    new window.uPlot({ width: width, height: 160, series: series }, data, box);
  }

  function loadChart(chart, windowName) {
    var url = chart.dataset.metricsUrl + "?window=" + encodeURIComponent(windowName);
    fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (payload) {
        var rows = points(payload);
        var plots = chart.querySelector(".plots");
        var empty = chart.querySelector(".empty");
        plots.textContent = "";
        if (!rows.length || !window.uPlot) { empty.hidden = false; return; }
        empty.hidden = true;
        var width = Math.max(280, Math.floor((chart.clientWidth - 48) / 3));
        plot(plots, "Requests per second", rows, [["rps", "rps", "#2563eb"]], width);
        plot(plots, "Success rate", rows, [["success_rate", "success", "#15803d"]], width);
        plot(plots, "Latency (ms)", rows, [["p50_ms", "p50", "#0891b2"], ["p95_ms", "p95", "#ca8a04"], ["p99_ms", "p99", "#dc2626"]], width);
      })
      .catch(function () {});
  }

  function loadEdges(table) {
    fetch(table.dataset.edgesUrl, { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (payload) {
        var rows = edges(payload).filter(function (e) { return (e.denied || 0) > 0; });
        rows.sort(function (a, b) { return b.denied - a.denied; });
        if (!rows.length) { return; }
        var t = document.createElement("table");
        rows.slice(0, 10).forEach(function (e) {
          var tr = t.insertRow();
          var a = document.createElement("a");
          a.href = "/ui/intentions?source=" + encodeURIComponent(e.source) + "&destination=" + encodeURIComponent(e.destination);
          a.textContent = e.source + " → " + e.destination;
          tr.insertCell().appendChild(a);
          tr.insertCell().textContent = e.denied + " denied";
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
