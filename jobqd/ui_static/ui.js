// jobqd dashboard: live numbers and charts on the overview, local times, confirmations.
// Hand-written, no dependencies; the page works without it (server-rendered).
"use strict";
(function () {
  var SVG = "http://www.w3.org/2000/svg";
  var COLORS = ["#2b6cb0", "#c05621", "#2f855a", "#6b46c1", "#b83280", "#718096"];

  function localTimes(root) {
    root.querySelectorAll("time[data-ts]").forEach(function (t) {
      if (t.dataset.done) return;
      t.dataset.done = "1";
      var d = new Date(parseFloat(t.dataset.ts) * 1000);
      t.title = t.textContent;
      var span = document.createElement("span");
      span.className = "local";
      span.textContent = " (" + d.toLocaleString() + " local)";
      t.after(span);
    });
  }

  function confirmations() {
    document.addEventListener("submit", function (ev) {
      var f = ev.target;
      var b = ev.submitter;
      var msg = (b && b.dataset.confirm) || f.dataset.confirm;
      if (msg && !window.confirm(msg)) ev.preventDefault();
    });
  }

  function el(name, attrs) {
    var e = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    return e;
  }

  // series: [{name, points: [[t, v], ...]}], drawn over span seconds
  function chart(svg, series, span) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    var W = 600, H = 160, L = 40, B = 18, max = 0;
    series.forEach(function (s) { s.points.forEach(function (p) { max = Math.max(max, p[1]); }); });
    max = max > 0 ? max * 1.1 : 1;
    if (max >= 10) max = Math.ceil(max);
    span = Math.max(span, 1);
    svg.appendChild(el("line", {x1: L, y1: H - B, x2: W, y2: H - B, class: "axis"}));
    [0, 0.5, 1].forEach(function (f) {
      var y = (H - B) - f * (H - B - 6);
      var t = el("text", {x: L - 4, y: y + 4, "text-anchor": "end", class: "tick"});
      t.textContent = (max * f).toFixed(max < 10 ? 1 : 0);
      svg.appendChild(t);
    });
    var label = el("text", {x: W, y: H - 2, "text-anchor": "end", class: "tick"});
    label.textContent = "last " + (span < 120 ? Math.round(span) + " s" : Math.round(span / 60) + " min");
    svg.appendChild(label);
    series.forEach(function (s, i) {
      if (!s.points.length) return;
      var d = s.points.map(function (p, j) {
        var x = L + (p[0] / span) * (W - L);
        var y = (H - B) - (p[1] / max) * (H - B - 6);
        return (j ? "L" : "M") + x.toFixed(1) + " " + y.toFixed(1);
      }).join(" ");
      svg.appendChild(el("path", {d: d, fill: "none", stroke: COLORS[i % COLORS.length],
                                  "stroke-width": 1.5}));
      var key = el("text", {x: L + 6 + i * 90, y: 12, fill: COLORS[i % COLORS.length],
                            class: "key"});
      key.textContent = s.name;
      svg.appendChild(key);
    });
  }

  function fmtAge(s) {
    if (s < 120) return s.toFixed(1) + "s";
    if (s < 7200) return (s / 60).toFixed(1) + "m";
    return (s / 3600).toFixed(1) + "h";
  }

  function update(data) {
    document.getElementById("dead").textContent = data.dead;
    document.getElementById("live").textContent = data.workers_live;
    document.getElementById("workers").textContent = data.workers;
    data.queues.forEach(function (q) {
      var row = document.querySelector('tr[data-q="' + CSS.escape(q.name) + '"]');
      if (!row) return;
      function set(k, v) { var c = row.querySelector('[data-k="' + k + '"]'); if (c) c.textContent = v; }
      set("waiting", q.waiting); set("scheduled", q.scheduled); set("in_flight", q.in_flight);
      set("rate_in", q.rate_in === null ? "—" : q.rate_in.toFixed(1) + "/s");
      set("rate_out", q.rate_out === null ? "—" : q.rate_out.toFixed(1) + "/s");
      set("lag_s", fmtAge(q.lag_s)); set("dead", q.dead);
      set("accepting", q.accepting ? "accepting" : "REFUSING");
      set("paused", q.paused ? "paused" : "running");
    });
    var h = data.history;
    chart(document.getElementById("chart-throughput"), [
      {name: "in", points: h.throughput.map(function (p) { return [p.t, p.in]; })},
      {name: "out", points: h.throughput.map(function (p) { return [p.t, p.out]; })}
    ], h.span_s);
    var names = data.queues.map(function (q) { return q.name; });
    chart(document.getElementById("chart-depth"), names.map(function (n) {
      return {name: n, points: h.depth.map(function (p) { return [p.t, p.depth[n] || 0]; })};
    }), h.span_s);
    document.body.dataset.updated = String(data.now);
  }

  function poll() {
    fetch("api/overview", {credentials: "same-origin", cache: "no-store"})
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (d) { if (d) update(d); })
      .catch(function () {})
      .finally(function () { setTimeout(poll, 2000); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    localTimes(document);
    confirmations();
    if (document.body.dataset.page === "overview") poll();
  });
})();
