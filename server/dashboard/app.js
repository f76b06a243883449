// The operator dashboard. It holds no data itself: it asks for the admin
// key, keeps it in sessionStorage and calls /api/v1/dashboard,
// /api/v1/dashboard/jobs, /api/v1/dashboard/samples, the node routes and a
// job's own routes with it as a bearer key. A job's events are read with
// fetch() as a Server-Sent Events stream, so the key stays in a header and
// out of URLs and logs.
(function () {
  "use strict";
  var KEY = "comfyfarm_admin_key";
  var REFRESH_MS = 2000;
  var STATES = ["queued", "dispatched", "running", "storing", "succeeded", "failed", "cancelled"];
  var TERMINAL = { succeeded: true, failed: true, cancelled: true };
  var $ = function (id) { return document.getElementById(id); };

  var timer = null;
  var view = null;         // "overview" | "jobs" | "job"
  var samplesAt = 0;       // when the charts were last fetched
  var sampleMs = 10000;    // the server's sample interval
  var frontends = [];
  var jobCursor = "";      // the last id shown in the job list, for "older"
  var stream = null;       // the open job's event stream: {abort}

  // ---- helpers ----
  function key() { return sessionStorage.getItem(KEY); }
  function setStatus(s) { $("status").textContent = s; }
  function make(tag, text, cls) {
    var e = document.createElement(tag);
    if (text != null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function cell(tr, content, cls) {
    var td = make("td", null, cls);
    if (content instanceof Node) td.appendChild(content); else if (content != null) td.textContent = String(content);
    tr.appendChild(td);
    return td;
  }
  function gib(b) { return (b / 1073741824).toFixed(1) + " GiB"; }
  function when(s) { return s ? new Date(s).toLocaleTimeString() : ""; }
  function stateSpan(state) { return make("span", state, "state s-" + state); }
  function jobHref(j) { return "#/jobs/" + encodeURIComponent(j.frontend) + "/" + encodeURIComponent(j.id); }
  function bar(fraction, label) {
    var b = make("span", null, "bar" + (fraction > 0.9 ? " hot" : ""));
    b.setAttribute("role", "img");
    b.setAttribute("aria-label", label);
    var fill = make("span");
    fill.style.width = Math.round(Math.max(0, Math.min(1, fraction)) * 100) + "%";
    b.appendChild(fill);
    return b;
  }

  function api(method, path, body) {
    var opts = { method: method, headers: { "Authorization": "Bearer " + key() }, cache: "no-store" };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    return fetch(path, opts).then(function (res) {
      if (res.status === 401) { signOut("key refused"); throw new Error("key refused"); }
      if (res.status === 204) return null;
      return res.json().catch(function () { return null; }).then(function (data) {
        if (!res.ok) {
          var msg = data && data.error ? data.error.message : "HTTP " + res.status;
          throw new Error(msg);
        }
        return data;
      });
    });
  }
  function report(what) {
    return function (err) { setStatus(what + " failed: " + err.message); };
  }

  // ---- sign in and routing ----
  function signedIn(on) {
    $("login").hidden = on;
    $("nav").hidden = !on;
    $("signout").hidden = !on;
    if (!on) document.querySelectorAll(".view").forEach(function (v) { v.hidden = true; });
  }
  function signOut(msg) {
    sessionStorage.removeItem(KEY);
    $("updated").textContent = "";
    clearTimeout(timer);
    closeStream();
    signedIn(false);
    setStatus(msg);
  }

  function route() {
    if (!key()) { signedIn(false); return; }
    signedIn(true);
    var h = location.hash.replace(/^#\/?/, "").split("?")[0];
    var parts = h.split("/").map(decodeURIComponent);
    var next = "overview";
    if (parts[0] === "jobs" && parts.length === 3) next = "job";
    else if (parts[0] === "jobs") next = "jobs";
    document.querySelectorAll(".view").forEach(function (v) { v.hidden = v.id !== "view-" + next; });
    document.querySelectorAll("#nav a").forEach(function (a) {
      var target = a.getAttribute("href") === "#/jobs" ? "jobs" : "overview";
      if (target === next || (next === "job" && target === "jobs")) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    });
    if (next !== "job") closeStream();
    view = next;
    if (next === "job") openJob(parts[1], parts[2]);
    else if (next === "jobs") { jobCursor = ""; refreshJobs(false); }
    refresh();
  }

  // refresh runs one round of reads and schedules the next; a round started
  // meanwhile (by an action or a new view) takes over the schedule.
  var round = 0;
  function refresh() {
    clearTimeout(timer);
    if (!key()) return;
    var mine = ++round;
    var work;
    if (view === "overview") work = refreshOverview();
    else if (view === "jobs") work = refreshJobs(true);
    else work = Promise.resolve();
    work.then(function () {
      $("updated").textContent = "updated " + new Date().toLocaleTimeString();
      if ($("status").textContent.indexOf("refresh failed") === 0) setStatus("");
    }, function (err) {
      if (key()) setStatus("refresh failed: " + err.message);
    }).then(function () {
      if (key() && mine === round) timer = setTimeout(refresh, REFRESH_MS);
    });
  }

  // ---- overview: nodes, counts, charts ----
  function refreshOverview() {
    var data = api("GET", "/api/v1/dashboard");
    var active = function (state) {
      return api("GET", "/api/v1/dashboard/jobs?limit=200&state=" + state).catch(function () { return []; });
    };
    // The charts change once a sample; read them that often (at most every
    // refresh).
    var charts = Date.now() - samplesAt >= Math.max(REFRESH_MS, sampleMs) - 100 ? refreshCharts() : Promise.resolve();
    return Promise.all([data, active("running"), active("dispatched"), charts]).then(function (r) {
      var byID = {};
      (r[1] || []).concat(r[2] || []).forEach(function (j) { byID[j.id] = j; });
      renderNodes(r[0].nodes || [], byID);
      renderCounts(r[0].jobs || {}, r[0].capped);
      frontends = Object.keys(r[0].jobs || {}).sort();
    });
  }

  var editing = {}; // node name -> true while its max in-flight field is being edited

  // renderNodes updates the table in place, row by row, so that a max
  // in-flight field being edited keeps its focus and value.
  function renderNodes(nodes, running) {
    var body = $("nodes");
    var rows = {};
    body.querySelectorAll("tr[data-node]").forEach(function (tr) { rows[tr.dataset.node] = tr; });
    body.querySelectorAll("tr.empty").forEach(function (tr) { tr.remove(); });
    if (!nodes.length) {
      body.textContent = "";
      var tr = make("tr", null, "empty");
      cell(tr, "no nodes registered", "dim").colSpan = 10;
      body.appendChild(tr);
      return;
    }
    nodes.forEach(function (n, i) {
      var fresh = nodeRow(n, running);
      var old = rows[n.name];
      delete rows[n.name];
      if (!old) {
        body.insertBefore(fresh, body.children[i] || null);
        return;
      }
      Array.prototype.slice.call(fresh.cells).forEach(function (td, c) {
        if (c === 4 && editing[n.name]) {
          old.cells[4].querySelector("span").textContent = (n.inflight || 0) + " /";
          return;
        }
        old.replaceChild(td, old.cells[c]);
      });
    });
    Object.keys(rows).forEach(function (name) { rows[name].remove(); });
  }

  function nodeRow(n, running) {
    var tr = make("tr");
    tr.dataset.node = n.name;
    var name = cell(tr, n.name);
    name.appendChild(make("span", n.url + (n.tags && n.tags.length ? " · " + n.tags.join(", ") : ""), "reason small"));
    if (n.catalogue_at) {
      // What the node offers, from its catalogue (placement sends a job only
      // to nodes that have every model and file it names).
      name.appendChild(make("span", (n.checkpoints || 0) + " checkpoints · " + (n.loras || 0) + " LoRAs · " +
        (n.custom_node_packs || 0) + " custom node packs", "reason small"));
    }

    var st = cell(tr, stateSpan(n.state));
    st.dataset.field = "state";
    // reason: why the farm set the state (degraded); error: the last probe's.
    [n.reason, n.error !== n.reason ? n.error : ""].forEach(function (why) {
      if (why) st.appendChild(make("span", why, "reason small"));
    });

    var v = cell(tr, "");
    if (n.devices && n.devices.length) {
      var free = 0, total = 0;
      n.devices.forEach(function (d) { free += d.vram_free || 0; total += d.vram_total || 0; });
      var used = total - free;
      v.appendChild(bar(total > 0 ? used / total : 0, "VRAM " + Math.round(total > 0 ? used / total * 100 : 0) + "% used"));
      v.appendChild(document.createTextNode(gib(used) + " / " + gib(total)));
    }
    cell(tr, (n.queue_running || 0) + " / " + (n.queue_pending || 0), "num");
    cell(tr, inflightForm(n), "num");

    var cur = cell(tr, "");
    if (n.current_job) {
      var j = running[n.current_job];
      var a = make(j ? "a" : "span", n.current_job.slice(-8), "mono");
      a.title = n.current_job;
      if (j) a.href = jobHref(j);
      cur.appendChild(a);
      if (j && j.progress) {
        var pct = Math.round(j.progress.percent || 0);
        cur.appendChild(document.createTextNode(" "));
        cur.appendChild(bar(pct / 100, "progress " + pct + "%"));
        cur.appendChild(make("span", pct + "%", "small dim"));
      }
    }
    cell(tr, n.jobs_done || 0, "num");
    cell(tr, n.jobs_failed || 0, "num");
    cell(tr, n.latency_ms ? n.latency_ms.toFixed(1) + " ms" : "", "num");

    var acts = make("div", null, "actions");
    var draining = n.state === "draining";
    acts.appendChild(action(draining ? "Undrain" : "Drain", n.name, function () {
      return api("POST", "/api/v1/nodes/" + encodeURIComponent(n.name) + "/drain", { drain: !draining });
    }));
    acts.appendChild(action("Probe", n.name, function () {
      return api("POST", "/api/v1/nodes/" + encodeURIComponent(n.name) + "/probe");
    }));
    var rm = action("Remove", n.name, function () {
      if (!window.confirm("Remove node " + n.name + "? Its unfinished jobs go back to the queue.")) return null;
      return api("DELETE", "/api/v1/nodes/" + encodeURIComponent(n.name));
    });
    rm.className = "small danger";
    acts.appendChild(rm);
    cell(tr, acts);
    return tr;
  }

  // action is a button that runs fn (a promise, or null to do nothing) and
  // refreshes the page after it.
  function action(label, node, fn) {
    var b = make("button", label, "small secondary");
    b.type = "button";
    b.setAttribute("aria-label", label + " " + node);
    b.addEventListener("click", function () {
      var p = fn();
      if (!p) return;
      b.disabled = true;
      setStatus(label.toLowerCase() + " " + node + "…");
      p.then(function () { setStatus(label.toLowerCase() + " " + node + ": done"); refresh(); },
        report(label.toLowerCase() + " " + node))
        .then(function () { b.disabled = false; });
    });
    return b;
  }

  function inflightForm(n) {
    var f = make("form", null, "inflight-form");
    f.appendChild(make("span", (n.inflight || 0) + " /"));
    var input = make("input");
    input.type = "number";
    input.min = "1";
    input.max = "64";
    input.required = true;
    input.name = "max_inflight";
    input.value = n.max_inflight || 1;
    input.setAttribute("aria-label", "max in flight for " + n.name);
    input.addEventListener("focus", function () { editing[n.name] = true; });
    input.addEventListener("blur", function () { delete editing[n.name]; });
    var save = make("button", "Set", "small secondary");
    save.type = "submit";
    save.setAttribute("aria-label", "Set max in flight of " + n.name);
    f.appendChild(input);
    f.appendChild(save);
    f.addEventListener("submit", function (ev) {
      ev.preventDefault();
      delete editing[n.name];
      api("PATCH", "/api/v1/nodes/" + encodeURIComponent(n.name), { max_inflight: parseInt(input.value, 10) })
        .then(function () { setStatus(n.name + ": max in flight " + input.value); refresh(); }, report("set max in flight"));
    });
    return f;
  }

  function renderCounts(jobs, capped) {
    var names = Object.keys(jobs).sort();
    var head = $("countshead");
    head.textContent = "";
    var hr = make("tr");
    hr.appendChild(make("th", "frontend"));
    STATES.forEach(function (s) { var th = make("th", s); th.scope = "col"; hr.appendChild(th); });
    head.appendChild(hr);
    var body = $("counts");
    body.textContent = "";
    names.forEach(function (f) {
      var tr = make("tr");
      var a = make("a", f);
      a.href = "#/jobs?frontend=" + encodeURIComponent(f);
      cell(tr, a);
      STATES.forEach(function (s) { cell(tr, jobs[f][s] || 0, "num"); });
      body.appendChild(tr);
    });
    $("capped").textContent = capped ? "(counts are lower bounds)" : "";
  }

  function refreshCharts() {
    return api("GET", "/api/v1/dashboard/samples").then(function (v) {
      samplesAt = Date.now();
      var samples = v.samples || [];
      var interval = (v.interval_seconds || 10) * 1000;
      sampleMs = interval;
      var span = interval * (v.capacity || 360); // ms the ring covers when full
      var times = samples.map(function (s) { return Date.parse(s.t); });
      var t1 = times.length ? times[times.length - 1] : Date.now();
      $("charts-note").textContent = samples.length ? "(a sample every " + v.interval_seconds + " s, " + samples.length + " so far)" : "(no samples yet)";

      var names = {};
      samples.forEach(function (s) { Object.keys(s.queued || {}).forEach(function (f) { names[f] = true; }); });
      var series = Object.keys(names).sort().map(function (f) {
        return { label: f, values: samples.map(function (s) { return s.queued ? (s.queued[f] || 0) : null; }) };
      });
      Charts.line($("chart-queue"), times, series, t1, span,
        "Queue depth per frontend: " + series.map(function (s) { return s.label + " " + (s.values[s.values.length - 1] || 0); }).join(", "));

      var buckets = (v.finished_per_minute || []).map(function (b) {
        return { t: Date.parse(b.t), seconds: b.seconds, succeeded: b.succeeded, failed: b.failed, cancelled: b.cancelled };
      });
      var last = buckets.length ? buckets[buckets.length - 1] : null;
      Charts.stacked($("chart-finished"), buckets, [
        { key: "succeeded", label: "succeeded", color: "#3fb950" },
        { key: "failed", label: "failed", color: "#f85149" },
        { key: "cancelled", label: "cancelled", color: "#8b949e" }
      ], t1, span, "Jobs finished per minute" + (last ? ", latest: " + Math.round(last.succeeded) + " succeeded, " +
        Math.round(last.failed) + " failed, " + Math.round(last.cancelled) + " cancelled" : ""));

      Charts.heat($("chart-busy"), times, v.busy || {}, interval, t1, span, "Node busy fraction over the last hour");
    });
  }

  $("addform").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var f = ev.target;
    var tags = f.elements.tags.value.split(",").map(function (s) { return s.trim(); }).filter(Boolean);
    api("POST", "/api/v1/nodes", {
      name: f.elements.name.value.trim(), url: f.elements.url.value.trim(), tags: tags,
      max_inflight: parseInt(f.elements.max_inflight.value, 10)
    }).then(function (n) {
      setStatus("node " + n.name + " added");
      f.reset();
      refresh();
    }, report("add node"));
  });

  // ---- job list ----
  function filterQuery() {
    var f = $("jobfilter").elements;
    var q = new URLSearchParams();
    ["frontend", "state", "user_id", "node"].forEach(function (k) { if (f[k].value.trim()) q.set(k, f[k].value.trim()); });
    return q;
  }
  function fillSelect(sel, values) {
    var cur = sel.value;
    while (sel.options.length > 1) sel.remove(1);
    values.forEach(function (v) { sel.add(new Option(v, v)); });
    sel.value = values.indexOf(cur) >= 0 ? cur : "";
  }
  function refreshJobs(live) {
    var f = $("jobfilter").elements;
    if (f.state.options.length === 1) fillSelect(f.state, STATES);
    // Filters may come from the address: #/jobs?frontend=style
    var fromHash = location.hash.split("?")[1];
    if (fromHash && !live) {
      new URLSearchParams(fromHash).forEach(function (v, k) { if (f[k]) f[k].value = v; });
    }
    var q = filterQuery();
    q.set("limit", "50");
    var lists = [api("GET", "/api/v1/dashboard/jobs?" + q.toString())];
    if (!frontends.length) lists.push(api("GET", "/api/v1/dashboard").then(function (d) { frontends = Object.keys(d.jobs || {}).sort(); }));
    return Promise.all(lists).then(function (r) {
      if (f.frontend.options.length !== frontends.length + 1) {
        fillSelect(f.frontend, frontends);
        if (fromHash && !live) new URLSearchParams(fromHash).forEach(function (v, k) { if (k === "frontend") f.frontend.value = v; });
      }
      if (live && jobCursor && $("jobs").dataset.paged) return; // keep older pages the operator opened
      renderJobs(r[0], false);
    });
  }
  function renderJobs(list, append) {
    var body = $("jobs");
    if (!append) { body.textContent = ""; delete body.dataset.paged; }
    if (!list.length && !append) {
      var tr = make("tr");
      cell(tr, "no jobs match", "dim").colSpan = 8;
      body.appendChild(tr);
    }
    list.forEach(function (j) {
      var tr = make("tr");
      var a = make("a", j.id, "mono");
      a.href = jobHref(j);
      cell(tr, a);
      cell(tr, j.frontend);
      cell(tr, j.user_id);
      cell(tr, stateSpan(j.state));
      cell(tr, j.node || "");
      var p = cell(tr, "");
      if (j.progress && !TERMINAL[j.state]) {
        var pct = Math.round(j.progress.percent || 0);
        p.appendChild(bar(pct / 100, "progress " + pct + "%"));
        p.appendChild(make("span", pct + "%", "small dim"));
      }
      cell(tr, when(j.created_at));
      cell(tr, when(j.finished_at));
      body.appendChild(tr);
    });
    if (list.length) jobCursor = list[list.length - 1].id;
    $("older").hidden = list.length < 50;
  }
  $("jobfilter").addEventListener("submit", function (ev) {
    ev.preventDefault();
    jobCursor = "";
    var q = filterQuery().toString();
    var target = "#/jobs" + (q ? "?" + q : "");
    if (location.hash !== target) location.hash = target; else refreshJobs(false);
  });
  $("older").addEventListener("click", function () {
    var q = filterQuery();
    q.set("limit", "50");
    q.set("before", jobCursor);
    api("GET", "/api/v1/dashboard/jobs?" + q.toString()).then(function (list) {
      $("jobs").dataset.paged = "1";
      renderJobs(list, true);
    }, report("older jobs"));
  });

  // ---- one job ----
  var current = null; // {frontend, id, job}

  function openJob(frontend, id) {
    closeStream();
    current = { frontend: frontend, id: id, job: null };
    $("job-id").textContent = id;
    $("job-state").textContent = "";
    $("job-facts").textContent = "";
    $("job-events").textContent = "";
    $("job-error").hidden = true;
    $("job-outputs-box").hidden = true;
    $("job-preview-fig").hidden = true;
    $("job-progress-row").hidden = true;
    $("job-stream").textContent = "";
    $("job-cancel").disabled = true;
    var c = current;
    loadJob().then(function (j) { if (j && c === current) follow(c); });
  }
  function jobPath(c, suffix) {
    return "/api/v1/jobs/" + encodeURIComponent(c.id) + (suffix || "") + "?frontend=" + encodeURIComponent(c.frontend);
  }
  function loadJob() {
    var c = current;
    return api("GET", jobPath(c)).then(function (j) {
      if (c !== current) return null;
      c.job = j;
      renderJob(j);
      return j;
    }, function (err) { setStatus("job: " + err.message); return null; });
  }
  function fact(dl, k, v) {
    if (v == null || v === "") return;
    dl.appendChild(make("dt", k));
    var dd = make("dd");
    if (v instanceof Node) dd.appendChild(v); else dd.textContent = String(v);
    dl.appendChild(dd);
  }
  function renderJob(j) {
    var st = $("job-state");
    st.textContent = j.state;
    st.className = "state s-" + j.state;
    var dl = $("job-facts");
    dl.textContent = "";
    fact(dl, "frontend", j.frontend);
    fact(dl, "user", j.user_id);
    fact(dl, "node", j.node);
    fact(dl, "attempts", j.attempts);
    if (j.state === "queued") fact(dl, "position", j.position);
    fact(dl, "created", j.created_at && new Date(j.created_at).toLocaleString());
    fact(dl, "dispatched", j.dispatched_at && new Date(j.dispatched_at).toLocaleString());
    fact(dl, "started", j.started_at && new Date(j.started_at).toLocaleString());
    fact(dl, "finished", j.finished_at && new Date(j.finished_at).toLocaleString());
    if (j.template) fact(dl, "template", j.template);
    $("job-cancel").disabled = !!TERMINAL[j.state] || j.state === "storing";
    if (j.progress && !TERMINAL[j.state]) showProgress(j.progress);
    if (TERMINAL[j.state]) $("job-progress-row").hidden = true;
    renderError(j.error);
    renderOutputs(j.outputs || []);
  }
  function showProgress(p) {
    $("job-progress-row").hidden = false;
    var pct = Math.round(p.percent != null ? p.percent : (p.max ? p.value / p.max * 100 : 0));
    $("job-progress").value = pct;
    $("job-progress").textContent = pct + "%";
    $("job-progress-label").textContent = "progress " + pct + "%" + (p.node_id ? " (at workflow node " + p.node_id + ")" : "");
  }
  function renderError(e) {
    var box = $("job-error");
    box.textContent = "";
    if (!e) { box.hidden = true; return; }
    box.hidden = false;
    box.appendChild(make("h3", "Error: " + e.code));
    box.appendChild(make("p", e.message));
    if (e.node_type || e.node_id) box.appendChild(make("p", "in node " + (e.node_id || "?") + (e.node_type ? " (" + e.node_type + ")" : ""), "dim"));
    var d = e.details || {};
    var tb = d.traceback;
    if (tb) box.appendChild(make("pre", Array.isArray(tb) ? tb.join("") : String(tb)));
    var rest = {};
    Object.keys(d).forEach(function (k) { if (k !== "traceback") rest[k] = d[k]; });
    if (Object.keys(rest).length) box.appendChild(make("pre", JSON.stringify(rest, null, 2)));
  }
  // renderOutputs rebuilds the thumbnails only when the outputs differ from
  // those shown: every view carries freshly signed URLs, and replacing an
  // image would load it again.
  function renderOutputs(outs) {
    var ul = $("job-outputs");
    var shown = outs.map(function (o) { return o.photo_id + ":" + o.filename + ":" + !!o.url; }).join("|");
    if (ul.dataset.shown === shown && current && ul.dataset.job === current.id) return;
    ul.dataset.shown = shown;
    ul.dataset.job = current ? current.id : "";
    ul.textContent = "";
    $("job-outputs-box").hidden = !outs.length;
    outs.forEach(function (o, i) {
      var li = make("li");
      var a = make("a");
      a.href = o.url;
      a.target = "_blank";
      a.rel = "noopener";
      if ((o.content_type || "").indexOf("image/") === 0) {
        var img = make("img");
        img.src = o.url;
        img.alt = "output " + (i + 1) + (o.filename ? " (" + o.filename + ")" : "");
        img.loading = "lazy";
        a.appendChild(img);
      } else {
        a.textContent = o.filename || "output " + (i + 1);
      }
      li.appendChild(a);
      li.appendChild(make("span", (o.width ? o.width + "×" + o.height + " · " : "") + (o.content_type || ""), "small dim"));
      ul.appendChild(li);
    });
  }

  $("job-cancel").addEventListener("click", function () {
    var c = current;
    if (!c) return;
    var b = $("job-cancel");
    b.disabled = true;
    api("DELETE", jobPath(c)).then(function (j) {
      setStatus("job " + c.id + " cancelled");
      if (c === current) renderJob(j);
    }, function (err) { b.disabled = false; report("cancel")(err); });
  });

  function logEvent(ev) {
    var ol = $("job-events");
    var s = (ev.time ? new Date(ev.time).toLocaleTimeString() + "  " : "") + ev.type;
    if (ev.type === "queued" && ev.position != null) s += " position " + ev.position;
    if (ev.node) s += " node " + ev.node;
    if (ev.type === "progress") s += " " + ev.node_id + " " + ev.value + "/" + ev.max;
    if (ev.type === "executed") s += " " + ev.node_id;
    if (ev.error) s += " " + ev.error.code + ": " + ev.error.message;
    var li = make("li", s);
    li.title = "seq " + ev.seq;
    ol.appendChild(li);
    while (ol.children.length > 300) ol.removeChild(ol.firstChild);
    ol.scrollTop = ol.scrollHeight;
  }
  function onEvent(c, ev) {
    if (c !== current) return;
    if (ev.type !== "preview") logEvent(ev);
    switch (ev.type) {
      case "snapshot":
        if (ev.job) { c.job = ev.job; renderJob(ev.job); }
        break;
      case "progress":
        showProgress(ev);
        break;
      case "preview":
        $("job-preview").src = "data:" + (ev.format || "image/jpeg") + ";base64," + ev.image;
        $("job-preview-fig").hidden = false;
        break;
      case "queued": case "dispatched": case "running": case "storing":
        var st = $("job-state");
        st.textContent = ev.type;
        st.className = "state s-" + ev.type;
        $("job-cancel").disabled = ev.type === "storing";
        break;
      case "succeeded": case "failed": case "cancelled":
        loadJob(); // the view builds the output URLs
        break;
    }
  }

  // follow reads the job's events as SSE through fetch, resuming after the
  // last seq when the stream breaks, until a terminal event.
  function follow(c) {
    var ctrl = new AbortController();
    var last = 0, done = false, refused = false;
    stream = { abort: function () { done = true; ctrl.abort(); } };
    function connect() {
      if (done || c !== current) return;
      $("job-stream").textContent = "(live)";
      var url = jobPath(c, "/events") + "&previews=1" + (last ? "&after=" + last : "");
      fetch(url, { headers: { "Authorization": "Bearer " + key(), "Accept": "text/event-stream" }, signal: ctrl.signal, cache: "no-store" })
        .then(function (res) {
          if (!res.ok || !res.body) {
            if (res.status >= 400 && res.status < 500 && res.status !== 429) refused = true; // asking again will not help
            throw new Error("events: HTTP " + res.status);
          }
          var reader = res.body.getReader();
          var dec = new TextDecoder();
          var buf = "";
          function pump() {
            return reader.read().then(function (r) {
              if (r.done) return;
              buf += dec.decode(r.value, { stream: true });
              var i;
              while ((i = buf.indexOf("\n\n")) >= 0) {
                var block = buf.slice(0, i);
                buf = buf.slice(i + 2);
                var data = "";
                block.split("\n").forEach(function (line) {
                  if (line.indexOf("data:") === 0) data += line.slice(5).replace(/^ /, "");
                });
                if (!data) continue;
                var ev;
                try { ev = JSON.parse(data); } catch (e) { continue; }
                if (ev.seq) last = ev.seq;
                onEvent(c, ev);
                // A finished job's stream may end after its snapshot.
                if (TERMINAL[ev.type] || (ev.type === "snapshot" && ev.job && TERMINAL[ev.job.state])) done = true;
              }
              return pump();
            });
          }
          return pump();
        })
        .catch(function (err) { if (!done) setStatus(err.message); })
        .then(function () {
          if (c !== current) return;
          if (done || refused) { $("job-stream").textContent = done ? "(finished)" : "(not available)"; return; }
          $("job-stream").textContent = "(reconnecting)";
          setTimeout(connect, 1000);
        });
    }
    connect();
  }
  function closeStream() {
    if (stream) stream.abort();
    stream = null;
  }

  // ---- start ----
  $("loginform").addEventListener("submit", function (ev) {
    ev.preventDefault();
    sessionStorage.setItem(KEY, $("key").value);
    $("key").value = "";
    setStatus("signing in…");
    api("GET", "/api/v1/dashboard").then(function () { setStatus("signed in"); route(); }, function (err) {
      if (key()) signOut("sign in failed: " + err.message);
    });
  });
  $("signout").addEventListener("click", function () { signOut("signed out"); });
  window.addEventListener("hashchange", route);
  route();
})();
