/* The History tab's usage chart: credits used per day (UTC), stacked by model, over the account's
 * history, from the `details` of the usage entries of /v1/account/transactions (read page by page,
 * newest first). Drawn with Chart.js, vendored at /portal/vendor/chart.umd.js. Kept apart from
 * app.js: it only reads the session token app.js stores and redraws when the History tab opens. */
(function () {
  "use strict";

  var TOKEN_KEY = "credit_proxy.token";
  var PAGE = 500; // the most credits returns per page
  var MAX_PAGES = 40; // 20,000 entries: beyond that the chart shows the most recent ones
  var COLORS = ["#4f46e5", "#e8590c", "#2b8a3e", "#ae3ec9", "#f59f00", "#0c8599", "#c92a2a", "#5c7cfa"];
  var chart = null;
  var loading = false;

  function $(id) { return document.getElementById(id); }

  function fetchPage(token, before) {
    var q = "?limit=" + PAGE + (before ? "&before=" + encodeURIComponent(before) : "");
    return fetch("/v1/account/transactions" + q, { headers: { Authorization: "Bearer " + token } })
      .then(function (res) {
        if (!res.ok) throw new Error("HTTP " + res.status);
        return res.json();
      });
  }

  function collect(token) {
    var usage = [];
    var truncated = false;
    function next(before, pages) {
      return fetchPage(token, before).then(function (res) {
        var rows = (res && res.data) || [];
        rows.forEach(function (t) { if (t.type === "usage") usage.push(t); });
        if (res.has_more && rows.length) {
          if (pages + 1 >= MAX_PAGES) { truncated = true; return; }
          return next(rows[rows.length - 1].id, pages + 1);
        }
      });
    }
    return next(null, 0).then(function () { return { usage: usage, truncated: truncated }; });
  }

  function label(t) {
    var d = t.details;
    if (!d) return "other";
    return d.model || d.operation || "other";
  }

  function series(usage) {
    var days = {};
    var models = {};
    usage.forEach(function (t) {
      var day = String(t.created_at).slice(0, 10); // ISO timestamps in UTC
      var m = label(t);
      models[m] = (models[m] || 0) + -Number(t.amount);
      days[day] = days[day] || {};
      days[day][m] = (days[day][m] || 0) + -Number(t.amount);
    });
    var labels = Object.keys(days).sort();
    var names = Object.keys(models).sort(function (a, b) { return models[b] - models[a]; });
    return {
      labels: labels,
      datasets: names.map(function (m, i) {
        return {
          label: m,
          data: labels.map(function (day) { return days[day][m] || 0; }),
          backgroundColor: COLORS[i % COLORS.length],
          stack: "credits"
        };
      })
    };
  }

  function draw() {
    var token = null;
    try { token = sessionStorage.getItem(TOKEN_KEY); } catch (e) { token = null; }
    if (!token || loading || typeof Chart === "undefined") return;
    loading = true;
    var card = $("usage-card");
    card.setAttribute("aria-busy", "true");
    collect(token).then(function (found) {
      var data = series(found.usage);
      $("usage-empty").hidden = found.usage.length > 0;
      $("usage-chart-box").hidden = found.usage.length === 0;
      $("usage-note").textContent = found.truncated ? "Showing the most recent " + found.usage.length + " requests." : "";
      if (chart) chart.destroy();
      chart = new Chart($("usage-chart"), {
        type: "bar",
        data: data,
        options: {
          responsive: true,
          maintainAspectRatio: false,
          animation: false,
          scales: { x: { stacked: true }, y: { stacked: true, ticks: { precision: 0 }, title: { display: true, text: "credits" } } },
          plugins: { legend: { position: "bottom" } }
        }
      });
      card.dataset.loaded = "true";
    }, function () {
      $("usage-note").textContent = "Usage could not be loaded right now.";
    }).finally(function () {
      loading = false;
      card.setAttribute("aria-busy", "false");
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var panel = $("panel-history");
    if (!panel) return;
    // Redraw whenever the History tab is shown (new usage may have come in meanwhile).
    new MutationObserver(function () { if (!panel.hidden) draw(); })
      .observe(panel, { attributes: true, attributeFilter: ["hidden"] });
    if (!panel.hidden) draw();
  });
})();
