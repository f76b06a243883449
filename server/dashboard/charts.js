// Charts drawn as inline SVG by hand: a line chart, stacked bars and heat
// rows. Each takes a container element and replaces its content.
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  // W is the width of the chart being drawn: its container's, so that one
  // SVG unit is one pixel and the text keeps its size.
  var W = 640, PAD = { l: 36, r: 10, t: 8, b: 20 };
  var PALETTE = ["#58a6ff", "#d2a8ff", "#3fb950", "#d29922", "#f778ba", "#79c0ff", "#ffa657", "#a5d6ff"];

  function el(name, attrs, parent) {
    var e = document.createElementNS(NS, name);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (parent) parent.appendChild(e);
    return e;
  }
  function text(parent, x, y, s, anchor) {
    var t = el("text", { x: x, y: y, "text-anchor": anchor || "start" }, parent);
    t.textContent = s;
    return t;
  }
  function niceMax(v) {
    if (!(v > 0)) return 1;
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var steps = [1, 2, 5, 10];
    for (var i = 0; i < steps.length; i++) if (steps[i] * p >= v) return steps[i] * p;
    return 10 * p;
  }
  function fmtNum(v) { return v >= 10 || v === Math.round(v) ? String(Math.round(v)) : v.toFixed(1); }
  // ago labels a time span given in milliseconds.
  function ago(ms) {
    var seconds = ms / 1000;
    if (seconds >= 120) return "−" + Math.round(seconds / 60) + " min";
    return "−" + Math.round(seconds) + " s";
  }
  function svgFor(container, h, label) {
    container.textContent = "";
    W = Math.max(320, Math.round(container.clientWidth || 640));
    var svg = el("svg", { viewBox: "0 0 " + W + " " + h, class: "chart", role: "img", "aria-label": label });
    el("title", {}, svg).textContent = label;
    container.appendChild(svg);
    return svg;
  }
  // frame draws the y grid (0, half, max) and the time axis of a window
  // [t1-span, t1] (milliseconds); it returns the x and y mappings.
  function frame(svg, h, maxY, t1, span, unit) {
    var x0 = PAD.l, x1 = W - PAD.r, y0 = h - PAD.b, y1 = PAD.t;
    [0, 0.5, 1].forEach(function (f) {
      var y = y0 - f * (y0 - y1);
      el("line", { x1: x0, x2: x1, y1: y, y2: y, stroke: "#262a33" }, svg);
      text(svg, x0 - 4, y + 3, fmtNum(maxY * f) + (f === 1 && unit ? unit : ""), "end");
    });
    [1, 0.5, 0].forEach(function (f) {
      var x = x1 - f * (x1 - x0);
      text(svg, x, h - 5, f === 0 ? "now" : ago(span * f), f === 1 ? "start" : f === 0 ? "end" : "middle");
    });
    return {
      x: function (t) { return x1 - Math.max(0, Math.min(1, (t1 - t) / span)) * (x1 - x0); },
      y: function (v) { return y0 - (maxY > 0 ? v / maxY : 0) * (y0 - y1); },
      x0: x0, x1: x1, y0: y0, y1: y1
    };
  }
  function legend(container, items) {
    var p = document.createElement("p");
    p.className = "legend";
    items.forEach(function (it) {
      var s = document.createElement("span");
      var i = document.createElement("i");
      i.style.background = it.color;
      s.appendChild(i);
      s.appendChild(document.createTextNode(it.label));
      p.appendChild(s);
    });
    container.appendChild(p);
  }

  // line: series [{label, values:[number|null]}] over times (ms), one line each.
  function line(container, times, series, t1, span, label) {
    var h = 170;
    var max = 0;
    series.forEach(function (s) { s.values.forEach(function (v) { if (v != null && v > max) max = v; }); });
    var svg = svgFor(container, h, label);
    var m = frame(svg, h, niceMax(max), t1, span);
    series.forEach(function (s, i) {
      s.color = PALETTE[i % PALETTE.length];
      var d = "", pen = false;
      s.values.forEach(function (v, j) {
        if (v == null) { pen = false; return; }
        d += (pen ? "L" : "M") + m.x(times[j]).toFixed(1) + " " + m.y(v).toFixed(1);
        pen = true;
      });
      if (d) el("path", { d: d, fill: "none", stroke: s.color, "stroke-width": 1.8, "stroke-linejoin": "round" }, svg);
    });
    legend(container, series.map(function (s) {
      var last = null;
      s.values.forEach(function (v) { if (v != null) last = v; });
      return { color: s.color, label: s.label + (last != null ? " (" + last + ")" : "") };
    }));
  }

  // stacked: buckets [{t (ms), seconds, <key>: value}] drawn as stacked bars
  // for keys [{key, label, color}].
  function stacked(container, buckets, keys, t1, span, label) {
    var h = 170;
    var max = 0;
    buckets.forEach(function (b) {
      var sum = 0;
      keys.forEach(function (k) { sum += b[k.key] || 0; });
      if (sum > max) max = sum;
    });
    var svg = svgFor(container, h, label);
    var m = frame(svg, h, niceMax(max), t1, span);
    buckets.forEach(function (b) {
      var xa = m.x(b.t), xb = m.x(b.t + b.seconds * 1000);
      var w = Math.max(1, xb - xa - 1);
      var base = 0;
      keys.forEach(function (k) {
        var v = b[k.key] || 0;
        if (v <= 0) return;
        var ya = m.y(base + v), yb = m.y(base);
        el("rect", { x: xa.toFixed(1), y: ya.toFixed(1), width: w.toFixed(1), height: Math.max(0.5, yb - ya).toFixed(1), fill: k.color }, svg)
          .appendChild(document.createElementNS(NS, "title")).textContent = k.label + ": " + fmtNum(v) + "/min";
        base += v;
      });
    });
    legend(container, keys.map(function (k) { return { color: k.color, label: k.label }; }));
  }

  // heat: rows {name: [fraction|-1]} over times (ms), one strip per row;
  // darker is idle, brighter is busy.
  function heat(container, times, rows, intervalMs, t1, span, label) {
    var names = Object.keys(rows).sort();
    var rowH = 16, h = PAD.t + Math.max(1, names.length) * (rowH + 4) + PAD.b;
    var svg = svgFor(container, h, label);
    var x0 = 90, x1 = W - PAD.r - 36;
    var xOf = function (t) { return x1 - Math.max(0, Math.min(1, (t1 - t) / span)) * (x1 - x0); };
    if (!names.length) text(svg, x0, PAD.t + 12, "no nodes");
    names.forEach(function (name, r) {
      var y = PAD.t + r * (rowH + 4);
      text(svg, x0 - 6, y + 12, name.length > 14 ? name.slice(0, 13) + "…" : name, "end");
      el("rect", { x: x0, y: y, width: x1 - x0, height: rowH, fill: "#0b0d11" }, svg);
      var now = rows[name].length ? rows[name][rows[name].length - 1] : -1; // -1: gone
      rows[name].forEach(function (f, i) {
        if (f < 0) return;
        var xa = xOf(times[i] - intervalMs), xb = xOf(times[i]);
        el("rect", { x: xa.toFixed(1), y: y, width: Math.max(0.8, xb - xa).toFixed(1), height: rowH, fill: "#58a6ff", "fill-opacity": (0.08 + 0.92 * f).toFixed(2) }, svg);
      });
      text(svg, x1 + 34, y + 12, now < 0 ? "gone" : Math.round(now * 100) + "%", "end");
    });
    [1, 0.5, 0].forEach(function (f) {
      var x = x1 - f * (x1 - x0);
      text(svg, x, h - 5, f === 0 ? "now" : ago(span * f), f === 1 ? "start" : f === 0 ? "end" : "middle");
    });
  }

  window.Charts = { line: line, stacked: stacked, heat: heat };
})();
