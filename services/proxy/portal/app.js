/* Credit Proxy customer portal. Plain JS, no build step.
 * Talks only to the public account endpoints on the same origin (see README.md). */
(function () {
  "use strict";

  var TOKEN_KEY = "credit_proxy.token";
  // The balance when the user left for checkout, so the return can tell when the credits arrived
  // (they may already be there on the first load back).
  var CHECKOUT_BALANCE_KEY = "credit_proxy.balance_before_checkout";
  var CHECKOUT_LOCKED_KEY = "credit_proxy.api_locked_before_checkout";
  var POLL_MS = 5000;
  var FAST_POLL_MS = 1500;
  var FAST_POLL_FOR_MS = 60000;
  var REQUEST_TIMEOUT_MS = 15000;
  var DEFAULT_LOW_THRESHOLD = 5;
  var PAGE_SIZE = 20;
  var UNAVAILABLE_MSG = "The service is unavailable right now. Please try again in a moment.";
  var EXPIRED_MSG = "Your session has expired or the token is invalid. Please sign in again.";
  var LOCALE = document.documentElement.lang || "en";

  var numberFmt = new Intl.NumberFormat(LOCALE);
  var dateFmt = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
  // This year's dates without the year: keeps table rows on one or two short lines on a phone.
  var recentDateFmt = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric", hour: "numeric", minute: "2-digit" });

  var TX_TYPES = {
    signup_bonus: "Signup bonus",
    purchase: "Purchase",
    usage: "Usage",
    admin_add: "Admin grant",
    migration: "Migration",
    refund_clawback: "Refund"
  };
  var STATUS_LABELS = {
    pending: "Pending",
    paid: "Paid",
    failed: "Failed",
    // Billing records a checkout the customer cancelled (or left until Stripe expired it) as expired;
    // to the customer it is a cancelled checkout.
    expired: "Cancelled",
    refunded: "Refunded",
    partially_refunded: "Partially refunded"
  };
  var TABS = ["pricing", "history", "keys"];

  var state = {
    token: null,
    account: null,
    packs: null,
    packsPromise: null,
    tab: "pricing",
    pollTimer: null,
    fastUntil: 0,
    txCursors: [null],   // stack of `before` cursors; last one is the current page
    txHasMore: false,
    historyStale: true,
    keysStale: true,
    buying: null,
    newKeyId: null,
    lockedBeforeCheckout: false,
    balanceBeforeCheckout: null
  };

  // ---------- small helpers ----------
  function $(id) { return document.getElementById(id); }
  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        var v = attrs[k];
        if (v === null || v === undefined || v === false) return;
        if (k === "text") node.textContent = v;
        else if (k === "className") node.className = v;
        else if (k === "dataset") Object.keys(v).forEach(function (d) { node.dataset[d] = v[d]; });
        else if (k.slice(0, 2) === "on" && typeof v === "function") node.addEventListener(k.slice(2), v);
        else node.setAttribute(k, v === true ? "" : String(v));
      });
    }
    (children || []).forEach(function (c) {
      if (c === null || c === undefined) return;
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }
  function show(node, on) { node.hidden = !on; }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  function formatCredits(n) {
    var v = Number(n) || 0;
    return numberFmt.format(v) + (Math.abs(v) === 1 ? " credit" : " credits");
  }
  function formatMoney(cents, currency) {
    var code = String(currency || "usd").toUpperCase();
    try {
      return new Intl.NumberFormat(LOCALE, { style: "currency", currency: code }).format((Number(cents) || 0) / 100);
    } catch (e) {
      return ((Number(cents) || 0) / 100).toFixed(2) + " " + code;
    }
  }
  function formatPerCredit(pack) {
    var c = pack.price_per_credit_cents;
    if (c === null || c === undefined || isNaN(Number(c))) {
      c = pack.credits ? pack.price_cents / pack.credits : 0;
    }
    c = Number(c);
    if (c >= 100) return formatMoney(c, pack.currency) + " per credit";
    return new Intl.NumberFormat(LOCALE, { maximumFractionDigits: 3 }).format(c) + "\u00a2 per credit";
  }
  function formatDate(iso) {
    if (!iso) return "—";
    var d = new Date(iso);
    if (isNaN(d.getTime())) return String(iso);
    return d.getFullYear() === new Date().getFullYear() ? recentDateFmt.format(d) : dateFmt.format(d);
  }
  function supportTierFor(credits) {
    var c = Number(credits) || 0;
    if (c >= 5000) return "Dedicated (12h response)";
    if (c >= 1200) return "Priority (24h response)";
    if (c >= 500) return "Email (48h response)";
    return "Community";
  }
  function titleCase(s) {
    s = String(s || "");
    return s.charAt(0).toUpperCase() + s.slice(1).replace(/_/g, " ");
  }
  function packName(id) {
    var p = (state.packs || []).filter(function (x) { return x.id === id; })[0];
    return p ? p.name : titleCase(id);
  }
  function isLow(acct) {
    if (!acct) return false;
    if (typeof acct.low_balance === "boolean") return acct.low_balance;
    var threshold = acct.low_balance_threshold != null ? Number(acct.low_balance_threshold) : DEFAULT_LOW_THRESHOLD;
    return Number(acct.credits_remaining) <= threshold;
  }

  // ---------- API ----------
  function ApiError(status, code, message, unavailable) {
    this.status = status;
    this.code = code;
    this.message = message;
    this.unavailable = !!unavailable;
  }

  function api(method, path, body, poll) {
    var headers = { "Accept": "application/json" };
    // A periodic refresh: the gateway logs it at DEBUG, not as an INFO line every few seconds.
    if (poll) headers["X-Poll"] = "1";
    if (state.token) headers["Authorization"] = "Bearer " + state.token;
    var opts = { method: method, headers: headers, cache: "no-store", credentials: "same-origin" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    var ctrl = typeof AbortController === "function" ? new AbortController() : null;
    var timer = null;
    if (ctrl) {
      opts.signal = ctrl.signal;
      timer = setTimeout(function () { ctrl.abort(); }, REQUEST_TIMEOUT_MS);
    }
    return fetch(path, opts).then(function (res) {
      if (timer) clearTimeout(timer);
      return res.text().then(function (text) {
        var data = null;
        if (text) { try { data = JSON.parse(text); } catch (e) { data = null; } }
        if (res.ok) return data;
        var err = data && data.error ? data.error : {};
        if (res.status === 401) {
          handleUnauthorized();
          throw new ApiError(401, err.code || "unauthorized", EXPIRED_MSG, false);
        }
        if (res.status >= 500) {
          throw new ApiError(res.status, err.code || "unavailable", UNAVAILABLE_MSG, true);
        }
        throw new ApiError(res.status, err.code || "error",
          err.message || ("Request failed (HTTP " + res.status + ")."), false);
      });
    }, function () {
      if (timer) clearTimeout(timer);
      throw new ApiError(0, "network_error", UNAVAILABLE_MSG, true);
    });
  }

  // ---------- error banner ----------
  var retryAction = null;
  function showError(err, retry) {
    var unavailable = err && err.unavailable;
    $("error-title").textContent = unavailable ? "Service unavailable." : "Something went wrong.";
    $("error-message").textContent = unavailable ? UNAVAILABLE_MSG : (err && err.message) || String(err);
    retryAction = retry || retryAll;
    $("error-banner").dataset.kind = unavailable ? "unavailable" : "error";
    show($("error-banner"), true);
  }
  function clearError(onlyUnavailable) {
    var b = $("error-banner");
    if (b.hidden) return;
    if (onlyUnavailable && b.dataset.kind !== "unavailable") return;
    show(b, false);
    retryAction = null;
  }
  function handleLoadError(err, retry) {
    if (err && err.status === 401) return; // already back at sign-in
    showError(err, retry);
  }
  function retryAll() {
    clearError();
    state.historyStale = true;
    state.keysStale = true;
    refreshAccount().then(function () { loadTab(state.tab); });
    if (!state.packs) loadPacks();
  }

  // ---------- toasts ----------
  function clearToasts() { clear($("toasts")); }
  function toast(message, kind, testid) {
    var box = el("div", { className: "toast toast-" + (kind || "info"), role: "status", "data-testid": testid || "toast" }, [
      el("span", { text: message }),
    ]);
    var close = el("button", { type: "button", className: "toast-close", "aria-label": "Dismiss notification", text: "\u00d7" });
    close.addEventListener("click", function () { box.remove(); });
    box.appendChild(close);
    $("toasts").appendChild(box);
    setTimeout(function () { if (box.parentNode) box.remove(); }, 7000);
  }

  // ---------- auth ----------
  function readTokenFromHash() {
    var h = window.location.hash || "";
    var m = h.match(/[#&]token=([^&]+)/);
    if (!m) return null;
    var tok = decodeURIComponent(m[1]);
    var rest = h.replace(/^#/, "").split("&").filter(function (p) { return p && p.indexOf("token=") !== 0; }).join("&");
    history.replaceState(null, "", window.location.pathname + window.location.search + (rest ? "#" + rest : ""));
    return tok;
  }
  function decodeSub(token) {
    try {
      var part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      while (part.length % 4) part += "=";
      return JSON.parse(atob(part)).sub || null;
    } catch (e) { return null; }
  }
  function setToken(tok) {
    if (tok !== state.token) resetSession();
    state.token = tok;
    try { sessionStorage.setItem(TOKEN_KEY, tok); } catch (e) { /* private mode */ }
  }
  function forgetToken() {
    state.token = null;
    try { sessionStorage.removeItem(TOKEN_KEY); } catch (e) { /* ignore */ }
  }
  function handleUnauthorized() {
    if (!state.token) return;
    signOut(EXPIRED_MSG);
  }
  function signOut(message) {
    forgetToken();
    resetSession();
    showSignIn(message);
  }
  // Forget everything that belongs to the previous user / token.
  function resetSession() {
    stopPolling();
    state.account = null;
    state.historyStale = true;
    state.keysStale = true;
    state.forceLocked = false;
    state.lockedBeforeCheckout = false;
    state.txCursors = [null];
    state.lastTxId = null;
    $("balance").textContent = "\u2026";
    $("balance").classList.remove("is-low");
    show($("low-balance-prompt"), false);
    show($("empty-banner"), false);
    ["sum-tier", "sum-support", "sum-purchased", "sum-used", "sum-api"].forEach(function (id) {
      $(id).textContent = "\u2014";
      $(id).className = "";
    });
    clear($("tx-body"));
    clear($("purchase-body"));
    clear($("keys-body"));
    clear($("revoked-body"));
    show($("revoked-keys"), false);
    hideNewKey();
    clearToasts();
    markCurrentTier();
  }
  function showSignIn(message) {
    clearError();
    show($("app-nav"), false);
    show($("header-account"), false);
    show($("empty-banner"), false);
    TABS.forEach(function (t) { show($("panel-" + t), false); });
    show($("signin"), true);
    var errBox = $("signin-error");
    errBox.textContent = message || "";
    show(errBox, !!message);
    $("signin-token").value = "";
    $("signin-token").focus();
  }
  function startApp() {
    show($("signin"), false);
    show($("app-nav"), true);
    show($("header-account"), true);
    var sub = decodeSub(state.token);
    $("signout").title = sub ? "Signed in as " + sub : "";
    selectTab(tabFromHash() || state.tab, false);
    loadPacks();
    refreshAccount().then(function () { loadTab(state.tab); });
    startPolling();
  }

  // ---------- account / balance ----------
  function refreshAccount(poll) {
    if (!state.token) return Promise.resolve();
    return api("GET", "/v1/account", undefined, poll).then(function (acct) {
      var prev = state.account;
      state.account = acct;
      clearError(true);
      renderAccount(acct, prev);
    }, function (err) {
      // Never loaded: replace the loading ellipsis, so the pill does not look like it is still working.
      if (!state.account && state.token) {
        $("balance").textContent = "Balance unavailable";
        $("balance").classList.add("is-low");
      }
      handleLoadError(err, retryAll);
    });
  }

  function renderAccount(acct, prev) {
    var remaining = Number(acct.credits_remaining) || 0;
    // After a successful checkout, remember the balance we came back with so we can say when credits arrive.
    if (state.balanceBeforeCheckout === -1) state.balanceBeforeCheckout = remaining;
    var text = formatCredits(remaining);
    var bal = $("balance");
    if (bal.textContent !== text) bal.textContent = text;
    bal.classList.toggle("is-low", isLow(acct));
    // At 0 the empty banner says it all; the low-balance prompt is for a balance still above 0.
    show($("low-balance-prompt"), isLow(acct) && remaining > 0);
    show($("empty-banner"), remaining <= 0);

    $("sum-tier").textContent = acct.tier ? titleCase(packNameOrTier(acct.tier)) : "Free";
    $("sum-support").textContent = acct.support_tier || supportTierFor(acct.credits_purchased_total);
    $("sum-purchased").textContent = formatCredits(acct.credits_purchased_total);
    $("sum-used").textContent = formatCredits(acct.credits_lifetime_used);
    var api = $("sum-api");
    api.textContent = acct.api_access_unlocked ? "Unlocked" : "Locked";
    api.className = acct.api_access_unlocked ? "status-ok" : "status-locked";

    markCurrentTier();

    var wasLocked = prev ? !prev.api_access_unlocked : state.lockedBeforeCheckout;
    if (acct.api_access_unlocked && wasLocked) {
      state.lockedBeforeCheckout = false;
      toast("API unlocked \u2014 create a key under API keys to call the API from your code", "success", "toast-api-unlocked");
    }

    if (state.balanceBeforeCheckout !== null && remaining > state.balanceBeforeCheckout) {
      // "Your credits will appear in a moment" is now out of date.
      Array.prototype.forEach.call(document.querySelectorAll("[data-testid=toast-checkout-success]"), function (t) { t.remove(); });
      toast("Credits added — new balance " + text, "success", "toast-credits-added");
      state.balanceBeforeCheckout = null;
    }
    if (prev) {
      if (prev.credits_remaining !== acct.credits_remaining || prev.credits_purchased_total !== acct.credits_purchased_total) {
        state.historyStale = true;
        if (state.tab === "history" && state.txCursors.length === 1) loadHistory();
      }
      if (prev.api_access_unlocked !== acct.api_access_unlocked) {
        state.keysStale = true;
        if (state.tab === "keys") loadKeys();
      }
    }
  }
  function packNameOrTier(tier) {
    if (tier === "free") return "Free";
    return packName(tier);
  }

  function stopPolling() {
    if (state.pollTimer) clearTimeout(state.pollTimer);
    state.pollTimer = null;
  }
  function startPolling() {
    stopPolling();
    var delay = Date.now() < state.fastUntil ? FAST_POLL_MS : POLL_MS;
    state.pollTimer = setTimeout(function () {
      if (!state.token) return;
      if (document.visibilityState === "hidden") { startPolling(); return; }
      refreshAccount(true).then(function () { if (state.token) startPolling(); });
    }, delay);
  }
  function pollFast() {
    state.fastUntil = Date.now() + FAST_POLL_FOR_MS;
    if (state.token) startPolling();
  }

  // ---------- tabs ----------
  function tabFromHash() {
    var h = (window.location.hash || "").replace(/^#/, "").split(/[/&]/)[0];
    return TABS.indexOf(h) >= 0 ? h : null;
  }
  function selectTab(name, focus) {
    if (TABS.indexOf(name) < 0) name = "pricing";
    state.tab = name;
    TABS.forEach(function (t) {
      var tab = $("tab-" + t);
      var on = t === name;
      tab.setAttribute("aria-selected", on ? "true" : "false");
      tab.tabIndex = on ? 0 : -1;
      show($("panel-" + t), on && !!state.token);
    });
    if (focus) $("tab-" + name).focus();
    if (window.location.hash !== "#" + name) {
      history.replaceState(null, "", window.location.pathname + window.location.search + "#" + name);
    }
  }
  function goToTab(name) {
    if (name !== state.tab) clearToasts();  // a notice belongs to the page it was raised on
    selectTab(name, false);
    loadTab(name);
  }
  function loadTab(name) {
    if (!state.token) return;
    if (name === "history" && state.historyStale) loadHistory();
    if (name === "keys" && state.keysStale) loadKeys();
    if (name === "pricing" && !state.packs) loadPacks();
  }

  // ---------- pricing ----------
  function loadPacks() {
    if (state.packsPromise) return state.packsPromise;
    var grid = $("pack-grid");
    grid.setAttribute("aria-busy", "true");
    state.packsPromise = api("GET", "/v1/packs").then(function (res) {
      var packs = (res && res.data) || [];
      packs.sort(function (a, b) { return a.price_cents - b.price_cents; });
      state.packs = packs;
      renderPacks();
      if (state.account) renderAccount(state.account, null);
      renderKeysLock();
      return packs;
    }, function (err) {
      clear(grid);
      grid.appendChild(el("div", { className: "card panel-error" }, [
        el("p", { text: err.unavailable ? UNAVAILABLE_MSG : err.message }),
        el("button", { type: "button", className: "btn btn-secondary btn-sm", text: "Retry", onclick: function () { loadPacks(); } })
      ]));
      handleLoadError(err, retryAll);
      throw err;
    }).finally(function () {
      grid.setAttribute("aria-busy", "false");
      state.packsPromise = null;
    });
    state.packsPromise.catch(function () {});
    return state.packsPromise;
  }

  function renderPacks() {
    var grid = $("pack-grid");
    clear(grid);
    if (!state.packs.length) {
      grid.appendChild(el("p", { className: "muted", text: "No packs are available right now." }));
      return;
    }
    state.packs.forEach(function (p) {
      var badgeClass = p.badge ? (/value|api/i.test(p.badge) ? "badge badge-value" : "badge badge-popular") : null;
      var perks = [];
      perks.push(el("li", { className: p.unlocks_api ? "perk perk-yes" : "perk perk-no" },
        [p.unlocks_api ? "Unlocks API access" : "In-app use only (no API access)"]));
      perks.push(el("li", { className: "perk perk-yes" }, ["Support: " + supportTierFor(p.credits)]));
      perks.push(el("li", { className: "perk perk-yes" }, ["Credits never expire"]));

      var btn = el("button", {
        type: "button", className: "btn btn-block " + (p.badge ? "btn-primary" : "btn-secondary"),
        "data-testid": "buy-" + p.id, "aria-describedby": "pack-name-" + p.id,
        text: "Buy " + p.name
      });
      btn.addEventListener("click", function () { buy(p, btn); });
      var errBox = el("p", { className: "form-error", id: "buy-error-" + p.id, "data-testid": "buy-error-" + p.id, role: "alert", hidden: true });

      var card = el("article", {
        className: "card pack-card" + (p.badge ? " is-featured" : "") + (badgeClass && /value/.test(badgeClass) ? " is-value" : ""),
        id: "pack-" + p.id, "data-testid": "pack-card-" + p.id, tabindex: "-1",
        "aria-labelledby": "pack-name-" + p.id
      }, [
        p.badge ? el("span", { className: badgeClass, "data-testid": "badge-" + p.id, text: p.badge }) : null,
        el("h2", { className: "pack-name", id: "pack-name-" + p.id, text: p.name }),
        el("p", { className: "pack-price" }, [
          el("span", { className: "price", "data-testid": "price-" + p.id, text: formatMoney(p.price_cents, p.currency) }),
          el("span", { className: "price-note", text: "one-time" })
        ]),
        el("p", { className: "pack-credits", "data-testid": "credits-" + p.id, text: formatCredits(p.credits) }),
        el("p", { className: "pack-unit muted", "data-testid": "per-credit-" + p.id, text: formatPerCredit(p) }),
        el("ul", { className: "perks" }, perks),
        el("p", { className: "current-tier", id: "current-" + p.id, hidden: true, text: "Your current tier" }),
        btn,
        errBox
      ]);
      grid.appendChild(card);
    });
    markCurrentTier();
  }

  function markCurrentTier() {
    if (!state.packs) return;
    var tier = state.account && state.account.tier;
    state.packs.forEach(function (p) {
      var n = $("current-" + p.id);
      if (n) show(n, tier === p.id);
    });
  }

  function buy(pack, btn) {
    if (state.buying) return;
    state.buying = pack.id;
    var errBox = $("buy-error-" + pack.id);
    show(errBox, false);
    var label = btn.textContent;
    btn.disabled = true;
    btn.setAttribute("aria-busy", "true");
    btn.textContent = "Redirecting to checkout…";
    api("POST", "/v1/account/checkout", { pack: pack.id }).then(function (res) {
      if (!res || !res.url) throw new ApiError(0, "bad_response", "Checkout could not be started. Please try again.", false);
      if (state.account) {
        try {
          sessionStorage.setItem(CHECKOUT_BALANCE_KEY, String(state.account.credits_remaining));
          if (!state.account.api_access_unlocked) sessionStorage.setItem(CHECKOUT_LOCKED_KEY, "1");
        } catch (e) { /* ignore */ }
      }
      window.location.assign(res.url);
    }).catch(function (err) {
      state.buying = null;
      btn.disabled = false;
      btn.removeAttribute("aria-busy");
      btn.textContent = label;
      if (err.status === 401) return;
      errBox.textContent = err.unavailable ? UNAVAILABLE_MSG : err.message;
      show(errBox, true);
    });
  }

  function focusPack(id) {
    goToTab("pricing");
    var go = function () {
      var card = $("pack-" + id);
      if (!card) return;
      card.scrollIntoView({ behavior: "smooth", block: "center" });
      card.focus({ preventScroll: true });
      card.classList.remove("flash");
      void card.offsetWidth;
      card.classList.add("flash");
    };
    if (state.packs) go(); else loadPacks().then(go, function () {});
  }

  // ---------- history ----------
  function loadHistory() {
    var before = state.txCursors[state.txCursors.length - 1];
    var q = "?limit=" + PAGE_SIZE + (before ? "&before=" + encodeURIComponent(before) : "");
    var body = $("tx-body");
    body.parentNode.setAttribute("aria-busy", "true");
    $("tx-older").disabled = true;
    $("tx-newer").disabled = true;
    var txReq = api("GET", "/v1/account/transactions" + q).then(function (res) {
      var rows = (res && res.data) || [];
      state.txHasMore = !!(res && res.has_more);
      state.lastTxId = rows.length ? rows[rows.length - 1].id : null;
      renderTransactions(rows);
      state.historyStale = false;
    }, function (err) {
      handleLoadError(err, function () { clearError(); loadHistory(); });
    }).finally(function () {
      body.parentNode.setAttribute("aria-busy", "false");
      $("tx-newer").disabled = state.txCursors.length <= 1;
      $("tx-older").disabled = !state.txHasMore || !state.lastTxId;
    });
    var purchaseReq = state.txCursors.length === 1 ? loadPurchases() : Promise.resolve();
    return Promise.all([txReq, purchaseReq]);
  }

  function renderTransactions(rows) {
    var body = $("tx-body");
    clear(body);
    rows.forEach(function (t) {
      var amt = Number(t.amount) || 0;
      var sign = amt > 0 ? "+" : amt < 0 ? "\u2212" : "";
      body.appendChild(el("tr", { "data-testid": "history-row", "data-type": t.type }, [
        el("td", { className: "nowrap", text: formatDate(t.created_at) }),
        el("td", {}, [el("span", { className: "tx-type tx-" + t.type, text: TX_TYPES[t.type] || titleCase(t.type) })]),
        el("td", { className: "num amount " + (amt > 0 ? "pos" : amt < 0 ? "neg" : ""), text: sign + numberFmt.format(Math.abs(amt)) }),
        el("td", { className: "num", text: numberFmt.format(Number(t.balance_after) || 0) }),
        el("td", { className: "ref muted hide-phone", text: usageDetails(t) || t.reference || "—", title: t.reference || "" })
      ]));
    });
    show($("tx-empty"), rows.length === 0);
    var page = state.txCursors.length;
    $("tx-page").textContent = rows.length ? "Page " + page : "";
  }

  // "gpt-4o-mini · 12 in / 40 out tokens" for a usage row whose details say so.
  function usageDetails(t) {
    var d = t.details;
    if (t.type !== "usage" || !d || typeof d !== "object") return "";
    var parts = [];
    if (d.model) parts.push(d.model);
    else if (d.operation) parts.push(d.operation);
    if (typeof d.input_tokens === "number" || typeof d.output_tokens === "number") {
      parts.push(numberFmt.format(d.input_tokens || 0) + " in / " + numberFmt.format(d.output_tokens || 0) + " out tokens");
    }
    return parts.join(" \u00b7 ");
  }

  function loadPurchases() {
    return api("GET", "/v1/account/purchases").then(function (res) {
      var rows = (res && res.data) || [];
      var body = $("purchase-body");
      clear(body);
      rows.forEach(function (p) {
        body.appendChild(el("tr", { "data-testid": "purchase-row" }, [
          el("td", { className: "nowrap", text: formatDate(p.created_at) }),
          el("td", { text: packName(p.pack) }),
          el("td", { className: "num", text: numberFmt.format(Number(p.credits) || 0) }),
          el("td", { className: "num", text: formatMoney(p.amount_cents, p.currency) }),
          el("td", {}, [el("span", { className: "status status-" + p.status, text: STATUS_LABELS[p.status] || titleCase(p.status) })])
        ]));
      });
      show($("purchase-empty"), rows.length === 0);
    }, function (err) {
      handleLoadError(err, function () { clearError(); loadPurchases(); });
    });
  }

  // ---------- API keys ----------
  function cheapestApiPack() {
    return (state.packs || []).filter(function (p) { return p.unlocks_api; })
      .sort(function (a, b) { return a.price_cents - b.price_cents; })[0] || null;
  }
  function apiLocked() {
    return !!(state.account && state.account.api_access_unlocked === false) || state.forceLocked === true;
  }
  function renderKeysLock() {
    var locked = apiLocked();
    var pack = cheapestApiPack();
    var name = pack ? pack.name : "Pro";
    $("api-locked-text").textContent = "API access is locked. Buy the " + name + " pack (or larger) to unlock it.";
    var cta = $("api-locked-cta");
    cta.textContent = pack ? "See the " + pack.name + " pack — " + formatMoney(pack.price_cents, pack.currency) : "See packs";
    cta.dataset.pack = pack ? pack.id : "";
    show($("api-locked"), locked);
    show($("create-key-card"), !locked);
  }

  function loadKeys() {
    renderKeysLock();
    show($("keys-error"), false);
    return api("GET", "/v1/account/api-keys").then(function (res) {
      var list = Array.isArray(res) ? res : (res && res.data) || [];
      renderKeys(list);
      state.keysStale = false;
    }, function (err) {
      if (err.code === "api_access_locked") {
        state.forceLocked = true;
        renderKeysLock();
        renderKeys([]);
        state.keysStale = false;
        return;
      }
      handleLoadError(err, function () { clearError(); loadKeys(); });
    });
  }

  function isRevoked(k) {
    return !!(k.revoked_at || k.revoked === true || k.active === false || k.status === "revoked");
  }
  function renderKeys(list) {
    var body = $("keys-body");
    var revokedBody = $("revoked-body");
    clear(body);
    clear(revokedBody);
    var active = list.filter(function (k) { return !isRevoked(k); });
    var revoked = list.filter(function (k) { return isRevoked(k); });
    active.forEach(function (k) {
      var btn = el("button", {
        type: "button", className: "btn btn-danger btn-sm", "data-testid": "revoke-" + k.id,
        "aria-label": "Revoke key " + (k.name || k.prefix || k.id), text: "Revoke"
      });
      btn.addEventListener("click", function () { revokeKey(k, btn); });
      body.appendChild(el("tr", { "data-testid": "api-key-row", "data-key-id": k.id }, [
        el("td", { className: "key-name", text: k.name || "Untitled key" }),
        el("td", {}, [el("code", { className: "key-prefix", text: (k.prefix || "") + "…" })]),
        el("td", { className: "nowrap hide-phone", text: formatDate(k.created_at) }),
        el("td", { className: "actions" }, [btn])
      ]));
    });
    revoked.forEach(function (k) {
      revokedBody.appendChild(el("tr", { "data-testid": "revoked-api-key-row" }, [
        el("td", { text: k.name || "Untitled key" }),
        el("td", {}, [el("code", { className: "key-prefix", text: (k.prefix || "") + "…" })]),
        el("td", { className: "nowrap hide-phone", text: formatDate(k.created_at) }),
        el("td", { className: "nowrap", text: formatDate(k.revoked_at) })
      ]));
    });
    // The secret of a key that is no longer active must not stay on screen.
    if (state.newKeyId && !active.some(function (k) { return k.id === state.newKeyId; })) hideNewKey();
    show($("keys-empty"), active.length === 0);
    $("revoked-count").textContent = String(revoked.length);
    show($("revoked-keys"), revoked.length > 0);
  }

  function createKey(ev) {
    ev.preventDefault();
    var input = $("api-key-name");
    var btn = $("create-key-btn");
    var errBox = $("create-key-error");
    show(errBox, false);
    var name = input.value.trim();
    btn.disabled = true;
    btn.textContent = "Creating…";
    var body = name ? { name: name } : {};
    api("POST", "/v1/account/api-keys", body).then(function (res) {
      input.value = "";
      state.newKeyId = res.id;
      $("new-key-value").textContent = res.key;
      $("copy-status").textContent = "";
      show($("new-key-box"), true);
      $("copy-key").focus();
      state.keysStale = true;
      loadKeys();
    }, function (err) {
      if (err.status === 401) return;
      if (err.code === "api_access_locked") {
        state.forceLocked = true;
        renderKeysLock();
        refreshAccount();
        return;
      }
      errBox.textContent = err.unavailable ? UNAVAILABLE_MSG : err.message;
      show(errBox, true);
    }).finally(function () {
      btn.disabled = false;
      btn.textContent = "Create key";
    });
  }

  function hideNewKey() {
    state.newKeyId = null;
    $("new-key-value").textContent = "";
    $("copy-status").textContent = "";
    show($("new-key-box"), false);
  }

  function copyKey() {
    var node = $("new-key-value");
    var text = node.textContent;
    var status = $("copy-status");
    var fallback = function () {
      var range = document.createRange();
      range.selectNodeContents(node);
      var sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      var ok = false;
      try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
      status.textContent = ok ? "Copied to clipboard." : "Key selected — press Ctrl+C (\u2318C on Mac) to copy.";
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(function () {
        status.textContent = "Copied to clipboard.";
        $("copy-key").textContent = "Copied";
        setTimeout(function () { $("copy-key").textContent = "Copy"; }, 2000);
      }, fallback);
    } else {
      fallback();
    }
  }

  function revokeKey(k, btn) {
    var label = k.name ? "\u201c" + k.name + "\u201d" : "this key";
    if (!window.confirm("Revoke " + label + "? Applications using it will stop working within a few seconds. This cannot be undone.")) return;
    btn.disabled = true;
    btn.textContent = "Revoking…";
    api("DELETE", "/v1/account/api-keys/" + encodeURIComponent(k.id)).then(function () {
      if (k.id === state.newKeyId) hideNewKey();
      toast("Key " + label + " revoked", "info", "toast-revoked");
      return loadKeys();
    }, function (err) {
      btn.disabled = false;
      btn.textContent = "Revoke";
      if (err.status === 401) return;
      var box = $("keys-error");
      box.textContent = err.unavailable ? UNAVAILABLE_MSG : err.message;
      show(box, true);
    });
  }

  // ---------- checkout return ----------
  function handleCheckoutReturn() {
    var params = new URLSearchParams(window.location.search);
    var result = params.get("checkout");
    if (!result) return;
    params.delete("checkout");
    ["session_id"].forEach(function (k) { params.delete(k); });
    var qs = params.toString();
    history.replaceState(null, "", window.location.pathname + (qs ? "?" + qs : "") + window.location.hash);
    var before = null;
    try {
      before = sessionStorage.getItem(CHECKOUT_BALANCE_KEY);
      sessionStorage.removeItem(CHECKOUT_BALANCE_KEY);
      // Locked when the checkout began: the unlock may already be there when this page first loads.
      state.lockedBeforeCheckout = result === "success" && sessionStorage.getItem(CHECKOUT_LOCKED_KEY) === "1";
      sessionStorage.removeItem(CHECKOUT_LOCKED_KEY);
    } catch (e) { before = null; }
    if (result === "success") {
      toast("Payment received — your credits will appear in a moment", "success", "toast-checkout-success");
      // Unknown (another tab started the checkout): judged from the first account load instead.
      state.balanceBeforeCheckout = before !== null && !isNaN(Number(before)) ? Number(before) : -1;
      pollFast();
    } else if (result === "cancel" || result === "cancelled" || result === "canceled") {
      toast("Checkout cancelled", "info", "toast-checkout-cancel");
    }
  }

  // ---------- wiring ----------
  function onTabKeydown(ev) {
    var idx = TABS.indexOf(ev.currentTarget.dataset.tab);
    var next = null;
    if (ev.key === "ArrowRight") next = TABS[(idx + 1) % TABS.length];
    else if (ev.key === "ArrowLeft") next = TABS[(idx + TABS.length - 1) % TABS.length];
    else if (ev.key === "Home") next = TABS[0];
    else if (ev.key === "End") next = TABS[TABS.length - 1];
    if (next) {
      ev.preventDefault();
      clearToasts();
      selectTab(next, true);
      loadTab(next);
    }
  }

  function init() {
    TABS.forEach(function (t) {
      var tab = $("tab-" + t);
      tab.addEventListener("click", function () { goToTab(t); });
      tab.addEventListener("keydown", onTabKeydown);
    });
    document.addEventListener("click", function (ev) {
      var a = ev.target.closest && ev.target.closest("a[href='#pricing']");
      if (!a || !state.token) return;
      ev.preventDefault();
      if (a.dataset.pack) focusPack(a.dataset.pack);
      else { goToTab("pricing"); $("pack-grid").scrollIntoView({ behavior: "smooth", block: "start" }); }
    });
    $("signin-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      var tok = $("signin-token").value.trim().replace(/^Bearer\s+/i, "");
      if (!tok) {
        $("signin-error").textContent = "Paste your access token to sign in.";
        show($("signin-error"), true);
        $("signin-token").focus();
        return;
      }
      setToken(tok);
      startApp();
    });
    $("signout").addEventListener("click", function () { signOut(""); });
    $("error-retry").addEventListener("click", function () {
      var fn = retryAction || retryAll;
      clearError();
      fn();
    });
    $("tx-older").addEventListener("click", function () {
      if (!state.lastTxId) return;
      state.txCursors.push(state.lastTxId);
      loadHistory();
    });
    $("tx-newer").addEventListener("click", function () {
      if (state.txCursors.length > 1) state.txCursors.pop();
      loadHistory();
    });
    $("create-key-form").addEventListener("submit", createKey);
    $("copy-key").addEventListener("click", copyKey);
    $("dismiss-key").addEventListener("click", function () {
      hideNewKey();
      $("api-key-name").focus();
    });
    window.addEventListener("hashchange", function () {
      var tok = readTokenFromHash();
      if (tok) { setToken(tok); startApp(); return; }
      var t = tabFromHash();
      if (t && t !== state.tab && state.token) goToTab(t);
    });
    document.addEventListener("visibilitychange", function () {
      if (document.visibilityState === "visible" && state.token) refreshAccount();
    });
    window.addEventListener("pageshow", function (ev) {
      // Back/forward cache: e.g. the user pressed Back on the checkout page.
      if (ev.persisted && state.token) { refreshAccount(); pollFast(); }
    });

    var tok = readTokenFromHash();
    if (tok) setToken(tok);
    else {
      try { state.token = sessionStorage.getItem(TOKEN_KEY); } catch (e) { state.token = null; }
    }
    handleCheckoutReturn();
    if (state.token) {
      startApp();
    } else {
      state.balanceBeforeCheckout = null;
      showSignIn("");
    }
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
