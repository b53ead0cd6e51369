// The live page: polls dashboard/data, keeps ten minutes of snapshots, and draws
// each panel with uPlot. Rates and means are computed here, between two polls.
"use strict";
(function () {
  const every = Number(new URLSearchParams(location.search).get("every")) || 2000;
  const keep = Math.ceil(600000 / every);
  const palette = ["#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777", "#4b5563", "#65a30d"];
  const history = []; // {t, panels: {id: panel}}
  const plots = {};   // id -> {plot, names, el}

  function value(kind, cur, prev, dt) {
    if (!cur) return null;
    if (kind === "gauge") return cur.v;
    if (!prev || dt <= 0) return null;
    if (kind === "rate") {
      const d = cur.v - prev.v;
      return d < 0 ? null : d / dt; // below zero: the process restarted
    }
    const dc = (cur.count || 0) - (prev.count || 0);
    if (dc <= 0) return null;
    return ((cur.sum || 0) - (prev.sum || 0)) / dc * 1000;
  }

  function panelEl(p) {
    let box = document.getElementById("panel-" + p.id);
    if (!box) {
      box = document.createElement("section");
      box.className = "panel";
      box.id = "panel-" + p.id;
      const h = document.createElement("h2");
      h.textContent = p.title + " (" + p.unit + ")";
      box.appendChild(h);
      const body = document.createElement("div");
      body.className = "body";
      box.appendChild(body);
      document.getElementById("panels").appendChild(box);
    }
    return box.querySelector(".body");
  }

  function draw(p) {
    const names = [...new Set(history.flatMap(h => Object.keys(h.panels[p.id].series)))].sort();
    const el = panelEl(p);
    if (names.length === 0) {
      if (plots[p.id]) { plots[p.id].plot.destroy(); delete plots[p.id]; }
      if (!el.querySelector(".empty")) {
        el.innerHTML = '<p class="empty">No data in this process.</p>';
      }
      return;
    }
    const xs = history.map(h => h.t / 1000);
    const data = [xs].concat(names.map(n => history.map((h, i) => {
      const prev = i > 0 ? history[i - 1] : null;
      return value(p.kind, h.panels[p.id].series[n], prev && prev.panels[p.id].series[n], prev ? (h.t - prev.t) / 1000 : 0);
    })));
    const cur = plots[p.id];
    if (cur && cur.names.join("\u0000") === names.join("\u0000")) {
      cur.plot.setData(data);
      return;
    }
    if (cur) cur.plot.destroy();
    el.innerHTML = "";
    const opts = {
      width: Math.max(300, el.clientWidth || 460), height: 220,
      scales: { x: { time: true } },
      series: [{}].concat(names.map((n, k) => ({ label: n, stroke: palette[k % palette.length], width: 2 }))),
      axes: [{}, { size: 60 }],
    };
    plots[p.id] = { plot: new uPlot(opts, data, el), names };
  }

  function totals(last) {
    const show = (id, v) => {
      document.getElementById(id).textContent = v === undefined ? "–" : Math.round(v).toLocaleString("en-US").replace(/,/g, " ");
    };
    const outcomes = last.panels.outcomes ? last.panels.outcomes.series : {};
    for (const o of ["stored", "repeat", "dead_letter"]) show("total-" + o, outcomes[o] && outcomes[o].v);
    const lag = last.panels.lag && last.panels.lag.series.lag;
    show("total-lag", lag && lag.v);
    const firing = last.panels.alerts && last.panels.alerts.series.firing;
    show("total-firing", firing && firing.v);
  }

  async function poll() {
    const status = document.getElementById("status");
    try {
      const resp = await fetch("dashboard/data", { cache: "no-store" });
      if (!resp.ok) throw new Error(resp.status + " " + (await resp.text()));
      const snap = await resp.json();
      const panels = {};
      for (const p of snap.panels) panels[p.id] = p;
      history.push({ t: snap.t, panels });
      if (history.length > keep) history.shift();
      for (const p of snap.panels) draw(p);
      totals(history[history.length - 1]);
      status.textContent = "updated " + new Date(snap.t).toLocaleTimeString();
      status.className = "";
      document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
    } catch (err) {
      status.textContent = "cannot read this process's metrics: " + err.message;
      status.className = "error";
    }
    setTimeout(poll, every);
  }
  document.getElementById("note").textContent =
    "Totals count since this process started; charts show the last ten minutes, polled every " + every / 1000 + " s.";
  poll();
})();
