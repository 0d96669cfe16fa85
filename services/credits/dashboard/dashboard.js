/* Operator dashboard: signs in with the admin token (kept in sessionStorage, sent as a Bearer token),
   reads GET /v1/admin/analytics for a UTC date range and draws it with Chart.js (vendored). */
"use strict";

(function () {
  const TOKEN_KEY = "cp-admin-token";
  const $ = (id) => document.getElementById(id);
  const charts = {};
  const palette = ["#2f5bea", "#e8590c", "#2b8a3e", "#ae3ec9", "#f59f00", "#0c8599", "#c92a2a", "#5c7cfa"];

  const usd = (dollars) =>
    dollars === null || dollars === undefined
      ? "—"
      : dollars.toLocaleString("en-US", { style: "currency", currency: "USD", maximumFractionDigits: dollars !== 0 && Math.abs(dollars) < 1 ? 4 : 2 });
  const money = (cents) => usd(cents / 100);
  const pct = (x) => (x === null || x === undefined ? "—" : (x * 100).toFixed(1) + "%");
  const num = (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString("en-US"));

  function showError(el, message) {
    el.textContent = message;
    el.hidden = !message;
  }

  function signedIn(yes) {
    $("signin").hidden = yes;
    $("board").hidden = !yes;
    $("signout").hidden = !yes;
  }

  async function fetchAnalytics(token, from, to) {
    const params = new URLSearchParams();
    if (from) params.set("from", from);
    if (to) params.set("to", to);
    const query = params.toString();
    const response = await fetch("/v1/admin/analytics" + (query ? "?" + query : ""), {
      headers: { Authorization: "Bearer " + token },
    });
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    return { status: response.status, body };
  }

  function kpis(a) {
    const items = [
      ["Revenue", money(a.revenue_cents), "kpi-revenue"],
      ["Packs sold", num(a.packs_sold), "kpi-packs"],
      ["Paying users", num(a.paying_users) + " / " + num(a.total_users), "kpi-paying"],
      ["Conversion", pct(a.conversion_rate), "kpi-conversion"],
      ["Average pack", money(a.average_pack_cents), "kpi-average-pack"],
      ["Lifetime value", money(a.lifetime_value_cents), "kpi-ltv"],
      ["Repeat buyers", pct(a.repeat_purchase_rate), "kpi-repeat"],
      ["Days between purchases", a.median_days_between_purchases === null ? "—" : a.median_days_between_purchases.toFixed(1), "kpi-refill"],
      ["Credits used", num(a.total_credits_used), "kpi-used"],
      ["Credit utilization", pct(a.credit_utilization), "kpi-utilization"],
      ["Upstream cost", usd(a.upstream_cost_usd), "kpi-upstream"],
      ["Gross margin", pct(a.gross_margin), "kpi-margin"],
    ];
    const box = $("kpis");
    box.replaceChildren();
    for (const [label, value, id] of items) {
      const dl = document.createElement("dl");
      dl.className = "kpi";
      const dt = document.createElement("dt");
      dt.textContent = label;
      const dd = document.createElement("dd");
      dd.textContent = value;
      dd.dataset.testid = id;
      dl.append(dt, dd);
      box.append(dl);
    }
  }

  function draw(id, config) {
    if (charts[id]) charts[id].destroy();
    config.options = Object.assign({ responsive: true, maintainAspectRatio: false, animation: false }, config.options || {});
    charts[id] = new Chart($(id), config);
  }

  function entries(obj) {
    return Object.entries(obj).sort((x, y) => (y[1].credits ?? y[1]) - (x[1].credits ?? x[1]));
  }

  function render(a) {
    kpis(a);
    const days = a.daily.map((d) => d.date);
    draw("chart-revenue", {
      type: "bar",
      data: {
        labels: days,
        datasets: [
          { label: "Revenue ($)", data: a.daily.map((d) => d.revenue_cents / 100), backgroundColor: palette[0] },
          { label: "Upstream cost ($)", data: a.daily.map((d) => d.upstream_cost_usd), backgroundColor: palette[1] },
        ],
      },
    });
    draw("chart-packs", {
      type: "bar",
      data: { labels: days, datasets: [{ label: "Packs sold", data: a.daily.map((d) => d.packs_sold), backgroundColor: palette[2] }] },
      options: { scales: { y: { ticks: { precision: 0 } } } },
    });
    draw("chart-credits", {
      type: "bar",
      data: {
        labels: days,
        datasets: [
          { label: "Purchased", data: a.daily.map((d) => d.credits_purchased), borderColor: palette[0], backgroundColor: palette[0] },
          { label: "Used", data: a.daily.map((d) => d.credits_used), borderColor: palette[1], backgroundColor: palette[1] },
        ],
      },
    });
    const models = entries(a.usage_by_model);
    draw("chart-models", {
      type: "bar",
      data: {
        labels: models.map(([m]) => m),
        datasets: [{ label: "Credits", data: models.map(([, v]) => v.credits), backgroundColor: palette[3] }],
      },
      options: { indexAxis: "y", plugins: { legend: { display: false } } },
    });
    const operations = entries(a.usage_by_operation);
    draw("chart-operations", {
      type: "doughnut",
      data: {
        labels: operations.map(([op]) => op),
        datasets: [{ data: operations.map(([, credits]) => credits), backgroundColor: palette }],
      },
    });
    const f = a.funnel;
    draw("chart-funnel", {
      type: "bar",
      data: {
        labels: ["Signed up", "Bought", "Bought again"],
        datasets: [{ label: "Users", data: [f.signed_up, f.bought, f.bought_again], backgroundColor: [palette[0], palette[2], palette[4]] }],
      },
      options: { indexAxis: "y", plugins: { legend: { display: false } }, scales: { x: { ticks: { precision: 0 } } } },
    });
    draw("chart-margin", {
      type: "bar",
      data: {
        labels: ["Revenue", "Upstream cost", "Gross profit"],
        datasets: [
          {
            label: "USD",
            data: [a.revenue_cents / 100, a.upstream_cost_usd, a.revenue_cents / 100 - a.upstream_cost_usd],
            backgroundColor: [palette[0], palette[1], palette[2]],
          },
        ],
      },
      options: { plugins: { legend: { display: false } } },
    });
    draw("chart-packs-economics", {
      type: "bar",
      data: {
        labels: a.packs.map((p) => p.pack),
        datasets: [
          { label: "Price ($)", data: a.packs.map((p) => p.price_cents / 100), backgroundColor: palette[0] },
          { label: "Upstream cost of its credits ($)", data: a.packs.map((p) => p.upstream_cost_usd), backgroundColor: palette[1] },
          { label: "Revenue in range ($)", data: a.packs.map((p) => p.revenue_cents / 100), backgroundColor: palette[2] },
        ],
      },
    });
    const rows = $("pack-rows");
    rows.replaceChildren();
    for (const p of a.packs) {
      const tr = document.createElement("tr");
      tr.dataset.testid = "pack-row-" + p.pack;
      const cells = [p.pack, money(p.price_cents), num(p.credits), num(p.packs_sold), money(p.revenue_cents), usd(p.upstream_cost_usd), pct(p.margin)];
      cells.forEach((text, i) => {
        const td = document.createElement(i === 0 ? "th" : "td");
        if (i === 0) td.scope = "row";
        else td.className = i >= 2 && i <= 4 ? "num hide-phone" : "num";
        td.textContent = text;
        tr.append(td);
      });
      rows.append(tr);
    }
    $("footnote").textContent =
      "Range: " + (a.from || "the beginning") + " to " + (a.to || "today") + " (UTC). Users and tiers: accounts existing at the end of the range; " +
      "credits remaining: " + num(a.total_credits_remaining) + " now. Upstream cost per credit used: " + usd(a.upstream_cost_per_credit_usd) + ".";
  }

  async function load() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) {
      signedIn(false);
      return;
    }
    const { status, body } = await fetchAnalytics(token, $("from").value, $("to").value);
    if (status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      signedIn(false);
      showError($("signin-error"), "That token was refused: sign in with the service's admin token.");
      return;
    }
    if (status !== 200) {
      signedIn(true);
      showError($("range-error"), (body && body.error && body.error.message) || "The analytics could not be read (HTTP " + status + ").");
      return;
    }
    showError($("range-error"), "");
    showError($("signin-error"), "");
    signedIn(true);
    render(body);
    document.body.dataset.loaded = "true";
  }

  function isoDay(date) {
    return date.toISOString().slice(0, 10);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("signin-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token").value.trim();
      if (!token) {
        showError($("signin-error"), "Enter the admin token.");
        return;
      }
      sessionStorage.setItem(TOKEN_KEY, token);
      $("token").value = "";
      load();
    });
    $("signout").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      signedIn(false);
    });
    $("range-form").addEventListener("submit", (event) => {
      event.preventDefault();
      load();
    });
    for (const button of document.querySelectorAll("[data-preset]")) {
      button.addEventListener("click", () => {
        if (button.dataset.preset === "all") {
          $("from").value = "";
          $("to").value = "";
        } else {
          const today = new Date();
          $("to").value = isoDay(today);
          $("from").value = isoDay(new Date(today.getTime() - (Number(button.dataset.preset) - 1) * 86400000));
        }
        load();
      });
    }
    load();
  });
})();
