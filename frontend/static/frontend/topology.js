/* The topology graph: fetched as JSON, laid out with dagre, drawn as SVG (no
   inline styles: classes only). Re-drawn when the page's event stream says the
   catalog or intentions changed. Nodes link to their service, edges to the
   intention checker for that pair. */
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";

  function el(name, attrs, parent) {
    var e = document.createElementNS(NS, name);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (parent) { parent.appendChild(e); }
    return e;
  }

  function edgeMetrics(payload) {
    var out = {};
    var d = payload && payload.data;
    var rows = d ? (Array.isArray(d) ? d : (d.edges || [])) : [];
    rows.forEach(function (e) {
      var w = (e.windows || {})["1m"];
      if (w && w.requests) { out[e.source + "\u0000" + e.destination] = w; }
    });
    return out;
  }

  // Positions from the server's layered layout (large graphs) or from dagre
  // (small ones): {nodes: {id: {x, y, width, height}} (centres), edges: [{e, d, x, y}]}.
  function placeWithDagre(graph) {
    var g = new window.dagre.graphlib.Graph({ multigraph: false });
    g.setGraph({ rankdir: "LR", nodesep: 18, ranksep: 90, marginx: 20, marginy: 20 });
    g.setDefaultEdgeLabel(function () { return {}; });
    graph.nodes.forEach(function (n) { g.setNode(n.id, { width: Math.max(90, n.id.length * 7 + 24), height: 30, data: n }); });
    graph.edges.forEach(function (e) { g.setEdge(e.source, e.destination, { data: e, width: 60, height: 14 }); });
    window.dagre.layout(g);
    var out = { nodes: {}, edges: [], width: g.graph().width, height: g.graph().height };
    g.nodes().forEach(function (id) { out.nodes[id] = g.node(id); });
    g.edges().forEach(function (id) {
      var info = g.edge(id);
      var d = info.points.map(function (p, i) { return (i ? "L" : "M") + p.x.toFixed(1) + " " + p.y.toFixed(1); }).join(" ");
      out.edges.push({ e: info.data, d: d, x: info.x, y: info.y });
    });
    return out;
  }

  function placeFromServer(graph) {
    var out = { nodes: {}, edges: [], width: graph.layout.width, height: graph.layout.height };
    graph.nodes.forEach(function (n) {
      out.nodes[n.id] = { x: n.x + n.width / 2, y: n.y + n.height / 2, width: n.width, height: n.height };
    });
    graph.edges.forEach(function (e) {
      var a = out.nodes[e.source], b = out.nodes[e.destination];
      var forward = b.x > a.x;
      var x1 = a.x + (forward ? a.width / 2 : -a.width / 2), x2 = b.x + (forward ? -b.width / 2 : b.width / 2);
      var bend = forward ? 40 : -60;
      var d = "M" + x1 + " " + a.y + " C" + (x1 + bend) + " " + a.y + " " + (x2 - bend) + " " + b.y + " " + x2 + " " + b.y;
      out.edges.push({ e: e, d: d, x: (x1 + x2) / 2, y: (a.y + b.y) / 2 });
    });
    return out;
  }

  function draw(box, graph, metrics) {
    var svg = box.querySelector("svg");
    svg.textContent = "";
    document.getElementById("topology-empty").hidden = graph.nodes.length > 0;
    if (!graph.nodes.length) { return; }
    if (!graph.layout && !window.dagre) { return; }
    var placed = graph.layout ? placeFromServer(graph) : placeWithDagre(graph);
    // Never scale a small graph up: the view is at least the box's own size.
    // Drawn at its natural size (the box scrolls), never scaled up or down.
    var w = Math.ceil(Math.max(placed.width, 400));
    var h = Math.ceil(Math.max(placed.height, 200));
    svg.setAttribute("viewBox", "0 0 " + w + " " + h);
    svg.setAttribute("width", String(w));
    svg.setAttribute("height", String(h));
    var defs = el("defs", {}, svg);
    var marker = el("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "10", refY: "5", markerWidth: "6", markerHeight: "6", orient: "auto-start-reverse" }, defs);
    el("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#64748b" }, marker);
    placed.edges.forEach(function (pe) {
      var e = pe.e;
      var m = metrics[e.source + "\u0000" + e.destination];
      var group = el("g", { "class": "edge " + (e.decision === "allow" ? "allowed" : e.decision === "deny" ? "denied" : "l7"), "data-edge": e.source + "->" + e.destination, "data-decision": e.decision }, svg);
      var link = el("a", { href: "/ui/intentions/check?source=" + encodeURIComponent(e.source) + "&destination=" + encodeURIComponent(e.destination) }, group);
      el("path", { d: pe.d, "marker-end": "url(#arrow)", "stroke-width": e.declared ? "2" : "1" }, link);
      var title = el("title", {}, link);
      title.textContent = e.source + " → " + e.destination + ": " + e.decision + (e.default ? " (default)" : "");
      if (m) {
        var label = el("text", { x: pe.x, y: pe.y - 4, "text-anchor": "middle" }, link);
        label.textContent = (m.rps !== undefined ? Number(m.rps).toFixed(1) + " rps" : "") +
          (m.success_rate !== undefined ? " · " + (100 * m.success_rate).toFixed(1) + "%" : "");
      }
    });
    var health = {};
    graph.nodes.forEach(function (n) { health[n.id] = n.health; });
    Object.keys(placed.nodes).forEach(function (id) {
      var n = placed.nodes[id];
      var group = el("g", { "class": "node " + health[id], "data-node": id, transform: "translate(" + (n.x - n.width / 2) + "," + (n.y - n.height / 2) + ")" }, svg);
      var link = el("a", { href: "/ui/services/" + encodeURIComponent(id) }, group);
      el("rect", { width: n.width, height: n.height, rx: "5" }, link);
      var text = el("text", { x: n.width / 2, y: 19, "text-anchor": "middle" }, link);
      text.textContent = id;
    });
  }

  function load(box) {
    var graphUrl = box.dataset.graphUrl;
    var metricsUrl = box.dataset.edgesUrl;
    Promise.all([
      fetch(graphUrl, { credentials: "same-origin" }).then(function (r) { return r.json(); }),
      fetch(metricsUrl, { credentials: "same-origin" }).then(function (r) { return r.ok ? r.json() : null; }).catch(function () { return null; })
    ]).then(function (res) {
      draw(box, res[0], edgeMetrics(res[1]));
      box.dataset.drawn = String(Number(box.dataset.drawn || "0") + 1);
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var box = document.getElementById("topology");
    if (!box) { return; }
    var timer = null;
    box.addEventListener("mesh:changed", function () {
      clearTimeout(timer);
      timer = setTimeout(function () { load(box); }, 150);
    });
    load(box);
  });
})();
