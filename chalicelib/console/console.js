// dagcast console: signs in with an API token and shows deployments, deploy history,
// sidecars and settings, polling the API that served this page. No dependencies.
"use strict";

(() => {
  const POLL_MS = 2000;
  const PAGE_SIZE = 20;
  const TOKEN_KEY = "dagcast.console.token";
  const PARSE_VIEWS = 5; // the newest deploys whose parse reports the history shows
  const TABS = ["history", "fleet", "sidecars", "webhooks", "settings"];
  const LIMITS = [
    ["max_bundle_bytes", "Max bundle size (compressed, bytes)"],
    ["max_total_bytes", "Max total size (uncompressed, bytes)"],
    ["max_members", "Max files in a bundle"],
    ["max_member_bytes", "Max file size (bytes)"],
    ["max_py_bytes", "Max Python file size (bytes)"],
    ["max_path_bytes", "Max path length (bytes)"],
  ];
  // API paths are relative to the page, so a stage prefix (/api/) keeps working.
  const BASE = new URL(".", window.location.href);

  const state = {
    token: null,
    admin: false,
    deployments: [],       // GET /deployments items
    sidecars: {},          // deployment name -> sidecar views
    deliveries: {},        // deployment name -> the last webhook delivery attempts
    selected: null,        // deployment name
    tab: "history",
    history: [],           // deploys shown, newest first
    cursor: null,          // next_cursor for "Load more"
    extraPages: false,     // whether "Load more" was used
    historyFor: null,      // deployment the history belongs to
    settingsFor: null,     // deployment whose settings the form shows
    settingsDirty: false,
    pending: null,         // deploy chosen for rollback
    focus: null,           // version named by the link (#...&v=N, Airflow's bundle links), highlighted once found
    focusShown: false,
    timer: null,
    polling: false,
    signatures: {},
    parse: {},             // deploy id -> what Airflow made of it (the deploy view's `parse`), for recent deploys
    me: null,              // GET /whoami: the signed-in token's name and role
    page: null,            // the deploy page shown: {deployment, version, deployId}
    pageData: null,        // its deploy view, file changes and the diffs opened
    chart: {},             // deployment name -> {at, items}: the last 50 deploys for the timings chart
  };

  const $ = (id) => document.getElementById(id);

  // --- small helpers -----------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.className = value;
      else if (key === "text") el.textContent = value;
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else if (key === "dataset") Object.assign(el.dataset, value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  // A table cell with one wrapper, so narrow screens can lay out label and value as two columns.
  function td(attrs, ...children) {
    return h("td", attrs, h("div", { class: "cell" }, ...children));
  }

  // Replace a container's children only when what it shows changed; keep focus on the
  // element with the same data-key so polling never steals it.
  function render(container, signature, build) {
    if (state.signatures[container.id] === signature) return false;
    state.signatures[container.id] = signature;
    const active = document.activeElement;
    const key = active && container.contains(active) ? active.dataset.key : null;
    container.replaceChildren(...build());
    if (key) {
      const again = container.querySelector(`[data-key="${CSS.escape(key)}"]`);
      if (again) again.focus();
    }
    return true;
  }

  function setText(el, text) {
    if (el.textContent !== text) el.textContent = text;
  }

  function announce(message, kind) {
    const el = $("status");
    el.className = "status" + (kind ? " status-" + kind : "");
    el.textContent = message;
  }

  function formatTime(ms) {
    if (!ms) return "—";
    const d = new Date(ms);
    return d.toLocaleString(undefined, { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  function ago(ms) {
    if (!ms) return "never";
    const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return formatTime(ms);
  }

  function timeEl(ms, text) {
    return ms ? h("time", { datetime: new Date(ms).toISOString(), title: new Date(ms).toISOString() }, text) : h("span", {}, text);
  }

  function plural(n, word) {
    return `${n} ${word}${n === 1 ? "" : "s"}`;
  }

  // --- API -----------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(method, path, body) {
    const init = { method, headers: { Authorization: `Bearer ${state.token}`, Accept: "application/json" }, cache: "no-store" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(new URL(path, BASE), init);
    } catch (err) {
      throw new ApiError(0, "network", "Cannot reach the API: " + err.message);
    }
    const text = await resp.text();
    let doc = null;
    try { doc = text ? JSON.parse(text) : null; } catch (err) { doc = null; }
    if (!resp.ok) {
      const e = doc && doc.error ? doc.error : { code: "http_error", message: `HTTP ${resp.status}` };
      throw new ApiError(resp.status, e.code, e.message);
    }
    return doc;
  }

  const enc = encodeURIComponent;

  // --- badges --------------------------------------------------------------------------

  // "converged" when every live sidecar runs the current version, else "2 of 5 sidecars on v12".
  function convergence(dep) {
    const sidecars = state.sidecars[dep.name];
    const v = dep.current_version;
    if (!v) return { text: "no version live yet", kind: "muted" };
    if (!sidecars) return { text: "checking sidecars…", kind: "muted" };
    const live = sidecars.filter((s) => s.live);
    // registered but silent, and not on the live version: never hidden behind a "converged"
    const staleBehind = sidecars.filter((s) => !s.live && !s.on_current);
    const stale = staleBehind.length ? `; ${staleBehind.length} stale and behind` : "";
    if (!live.length) return staleBehind.length ? { text: `no live sidecars${stale}`, kind: "error" } : { text: "no live sidecars", kind: "muted" };
    const on = live.filter((s) => s.on_current).length;  // the API's word: exact version, sha256 and deployment id
    if (on === live.length && !staleBehind.length) return { text: "converged", kind: "ok" };
    if (on === live.length) return { text: `${on} of ${plural(live.length, "live sidecar")} on v${v}${stale}`, kind: "error" };
    return { text: `${on} of ${plural(live.length, "sidecar")} on v${v}${stale}`, kind: "progress" };
  }

  function badge(info, extra) {
    return h("span", { class: `badge badge-${info.kind}${extra ? " " + extra : ""}` }, info.text);
  }

  const STATE_KIND = {
    PENDING: "progress", VALIDATING: "progress", ACTIVE: "ok", REJECTED: "error",
    EXPIRED: "muted", CANCELLED: "muted", SUPERSEDED: "muted",
  };

  // --- deployments list ----------------------------------------------------------------

  function renderDeployments() {
    const list = $("deployment-list");
    $("no-deployments").hidden = state.deployments.length > 0;
    const rows = state.deployments.map((d) => [d.name, d.mechanism, d.current_version, convergence(d).text, d.name === state.selected]);
    render(list, JSON.stringify(rows), () => state.deployments.map((d) => {
      const conv = convergence(d);
      const selected = d.name === state.selected;
      return h("li", { class: "deployment" + (selected ? " selected" : ""), dataset: { deployment: d.name } },
        h("button", {
          type: "button", class: "deployment-button", "aria-current": selected ? "true" : null,
          dataset: { key: "dep:" + d.name }, onclick: () => select(d.name),
        },
          h("span", { class: "deployment-name" }, d.name),
          h("span", { class: "deployment-meta" },
            h("span", { class: "version" }, d.current_version ? `v${d.current_version}` : "no version"),
            h("span", { class: "mechanism" }, d.mechanism === "DAG_ONLY" ? "DAG-only deploys" : "Image only")),
          badge(conv, "convergence")));
    }));
    const dep = current();
    if (dep) {
      const conv = convergence(dep);
      const el = $("detail-badge");
      el.className = `badge badge-${conv.kind}`;
      setText(el, conv.text === "converged" ? `converged on v${dep.current_version}` : conv.text);
    }
  }

  function current() {
    return state.deployments.find((d) => d.name === state.selected) || null;
  }

  // --- history ---------------------------------------------------------------------------

  function canRollBack(d, dep) {
    if (!state.admin || d.version === null || d.version === undefined) return false;
    if (d.state === "SUPERSEDED") return true;
    return d.state === "ACTIVE" && dep && d.version !== dep.current_version;
  }

  function diffSummary(diff) {
    if (!diff) return [h("span", { class: "muted" }, "—")];
    const out = [];
    const dags = [];
    if (diff.dags_added_count) dags.push(`+${diff.dags_added_count} DAG${diff.dags_added_count === 1 ? "" : "s"}`);
    if (diff.dags_removed_count) dags.push(`−${diff.dags_removed_count} DAG${diff.dags_removed_count === 1 ? "" : "s"}`);
    out.push(h("span", { class: "diff-dags" }, dags.length ? dags.join(", ") : "no DAG changes"));
    if (diff.dags_removed && diff.dags_removed.length) {
      out.push(h("span", { class: "diff-removed" }, "removed: " + diff.dags_removed.join(", ")));
    }
    out.push(h("span", { class: "diff-files" },
      `files: ${diff.files_changed || 0} changed, ${diff.files_added || 0} added, ${diff.files_removed || 0} removed`));
    return out;
  }

  function errorList(d) {
    if (!d.errors || !d.errors.length) return null;
    const items = d.errors.map((e) => {
      const where = e.path ? (e.line ? `${e.path}:${e.line}` : e.path) : "bundle";
      return h("li", {}, h("code", { class: "where" }, where), ": ", h("span", { class: "code" }, e.code), ": ", e.message);
    });
    if (d.errors_truncated) items.push(h("li", { class: "muted" }, `… and ${d.errors_truncated} more`));
    return h("ul", { class: "errors", "aria-label": "Errors" }, items);
  }

  function secs(s) {
    return s < 10 ? `${s.toFixed(2)} s` : `${s.toFixed(1)} s`;
  }

  // Where the deploy's time went, from the timestamps on its record (the API computes `stages`).
  function stagesLine(d) {
    const st = d.stages;
    if (!st) return null;
    const parts = [];
    if (st.upload_to_ingest_s != null && st.ingest_to_active_s != null) {
      const validation = st.validation_s != null ? ` (validation ${secs(st.validation_s)})` : "";
      parts.push(`upload → ACTIVE ${secs(st.upload_to_ingest_s + st.ingest_to_active_s)}${validation}`);
    }
    if (st.active_to_all_live_s != null) parts.push(`ACTIVE → all sidecars ${secs(st.active_to_all_live_s)}`);
    if (!parts.length) return null;
    const each = (st.sidecars || []).map((s) => `${s.name}: ` +
      (s.notified_s != null ? `notified after ${secs(s.notified_s)}, ` : "") +
      (s.live_s != null ? `live after ${secs(s.live_s)}` : "not live")).join("\n");
    return h("div", { class: "stages muted", title: each || null }, parts.join(" · "));
  }

  function gitCell(git) {
    if (!git || !git.sha) return h("span", { class: "muted" }, "—");
    return h("span", { class: "git" },
      h("code", { title: git.sha }, git.sha.slice(0, 8)),
      git.dirty ? h("span", { class: "dirty", title: "uncommitted changes" }, "+dirty") : null,
      git.branch ? h("span", { class: "branch", title: git.branch }, git.branch) : null);
  }

  function renderHistory() {
    const body = $("history-body");
    const dep = current();
    const admin = state.admin;
    $("history-empty").hidden = state.history.length > 0 || state.historyFor !== state.selected;
    $("history-table").hidden = state.history.length === 0;
    $("load-more").hidden = !state.cursor;
    const sig = JSON.stringify([admin, dep && dep.current_version, state.focus, state.history,
      state.history.map((d) => state.parse[d.deploy_id] || null)]);
    render(body, sig, () => state.history.map((d) => {
      const rollback = canRollBack(d, dep);
      const isCurrent = dep && d.version && d.version === dep.current_version && d.state === "ACTIVE";
      const focused = state.focus !== null && d.version === state.focus;
      return h("tr", { class: `deploy state-${d.state.toLowerCase()}${isCurrent ? " current" : ""}${focused ? " focused" : ""}`,
        dataset: { deployId: d.deploy_id },
        onclick: (event) => { if (!event.target.closest("a, button")) openDeploy(d); } },
        td({ "data-label": "Version", class: "version" },
          h("a", { class: "open-deploy", href: pageHash(d), dataset: { key: "open:" + d.deploy_id },
            "aria-label": `Open ${d.version ? "v" + d.version : "deploy " + d.deploy_id}` }, d.version ? `v${d.version}` : "open"),
          isCurrent ? h("span", { class: "tag" }, "live") : null),
        td({ "data-label": "State" }, h("span", { class: `badge badge-${STATE_KIND[d.state] || "muted"} state` }, d.state)),
        td({ "data-label": "Description", class: "description" },
          h("div", {}, d.description || h("span", { class: "muted" }, "(no description)")),
          d.promoted_from ? h("div", { class: "promoted" }, h("span", { class: "tag" }, "promoted"),
            ` from ${d.promoted_from.deployment} v${d.promoted_from.version} (same sha256 ${d.promoted_from.sha256.slice(0, 12)}…)`) : null,
          h("div", { class: "deploy-id muted" }, d.deploy_id),
          stagesLine(d),
          errorList(d),
          parseList(d)),
        td({ "data-label": "Who" }, d.created_by || "—"),
        td({ "data-label": "When" }, timeEl(d.created_at, formatTime(d.created_at))),
        td({ "data-label": "Git" }, gitCell(d.git)),
        td({ "data-label": "Changes", class: "diff" }, diffSummary(d.diff)),
        td({ class: "actions-cell" }, rollback ? h("button", {
          type: "button", class: "btn btn-small", dataset: { key: "rb:" + d.deploy_id },
          onclick: () => askRollback(d),
        }, `Roll back to v${d.version}`) : null));
    }));
    const row = body.querySelector("tr.focused");
    if (row && !state.focusShown) {
      state.focusShown = true;
      row.scrollIntoView({ block: "center" });
    }
  }

  async function loadHistory(reset) {
    const name = state.selected;
    if (!name) return;
    const page = await api("GET", `deployments/${enc(name)}/deploys?limit=${PAGE_SIZE}`);
    if (name !== state.selected) return;
    const fresh = page.items;
    if (reset || state.historyFor !== name || !state.extraPages) {
      state.history = fresh;
      state.cursor = page.next_cursor || null;
      state.extraPages = false;
    } else {
      // Keep pages loaded with "Load more" below the refreshed first page.
      const ids = new Set(fresh.map((d) => d.deploy_id));
      const overlaps = state.history.some((d) => ids.has(d.deploy_id));
      if (overlaps) {
        state.history = fresh.concat(state.history.filter((d) => !ids.has(d.deploy_id) && !isNewer(d, fresh)));
      } else {
        state.history = fresh;
        state.cursor = page.next_cursor || null;
        state.extraPages = false;
      }
    }
    state.historyFor = name;
    renderHistory();
    await loadParses(name);
  }

  // What Airflow made of the newest deploys: the sidecars' parse reports, merged by the API in each
  // deploy's view (the history list carries only who reported, in `parsed`).
  async function loadParses(name) {
    const wanted = state.history.filter((d) => d.parsed && Object.keys(d.parsed).length).slice(0, PARSE_VIEWS);
    const stale = wanted.filter((d) => {
      const had = state.parse[d.deploy_id];
      return !had || had.reported.length !== Object.keys(d.parsed).length;
    });
    if (!stale.length) return;
    const views = await Promise.all(stale.map((d) =>
      api("GET", `deployments/${enc(name)}/deploys/${enc(d.deploy_id)}`).then((v) => v.parse, () => null)));
    stale.forEach((d, i) => { if (views[i]) state.parse[d.deploy_id] = views[i]; });
    if (name === state.selected) renderHistory();
  }

  function parseList(d) {
    const p = state.parse[d.deploy_id];
    if (!p || p.status === "none") return null;
    if (p.status === "unavailable") {
      return h("div", { class: "parse muted" }, "Airflow parse: not available on these sidecars");
    }
    const errors = p.import_errors || [];
    const loaded = Math.max(0, (p.files || 0) - new Set(errors.map((e) => e.path)).size);
    const head = h("div", { class: "parse" + (errors.length ? " parse-errors" : "") },
      `Airflow loaded ${loaded} of ${p.files} files (${plural(p.dags, "DAG")})`,
      p.held && p.held.length ? h("span", { class: "badge badge-error" }, `held on ${p.held.join(", ")}`) : null,
      p.pending && p.pending.length ? h("span", { class: "muted" }, ` · waiting on ${p.pending.join(", ")}`) : null);
    const items = errors.map((e) => h("li", {},
      h("code", { class: "where" }, e.line ? `${e.path}:${e.line}` : e.path), ": ",
      h("span", { class: "code" }, e.type), ": ", e.message.split("\n")[0],
      e.new ? h("span", { class: "tag" }, "new") : null,
      h("span", { class: "muted" }, ` (${e.sidecars.join(", ")})`)));
    (p.duplicates || []).forEach((dup) => items.push(h("li", {},
      h("span", { class: "code" }, "duplicate DAG id"), ": ", h("code", {}, dup.dag_id), " in ", dup.paths.join(", "))));
    if (p.import_errors_total > errors.length) items.push(h("li", { class: "muted" }, `… and ${p.import_errors_total - errors.length} more`));
    return h("div", {}, head, items.length ? h("ul", { class: "errors", "aria-label": "Import errors" }, items) : null);
  }

  function isNewer(d, page) {
    // A deploy older than the last one of the refreshed page belongs below it, never inside it.
    const last = page[page.length - 1];
    return last ? d.created_at > last.created_at : false;
  }

  async function loadMore() {
    const name = state.selected;
    if (!state.cursor || !name) return;
    const btn = $("load-more");
    btn.disabled = true;
    try {
      const page = await api("GET", `deployments/${enc(name)}/deploys?limit=${PAGE_SIZE}&cursor=${enc(state.cursor)}`);
      if (name !== state.selected) return;
      const ids = new Set(state.history.map((d) => d.deploy_id));
      state.history = state.history.concat(page.items.filter((d) => !ids.has(d.deploy_id)));
      state.cursor = page.next_cursor || null;
      state.extraPages = true;
      renderHistory();
      announce(`Loaded ${plural(page.items.length, "more deploy")}.`);
    } catch (err) {
      failed(err);
    } finally {
      btn.disabled = false;
    }
  }

  // --- the deploy page: one deploy looked into (#d=...&v=N, or &deploy=ID for one without a version) ----

  const SVG = "http://www.w3.org/2000/svg";

  function sv(tag, attrs, ...children) {
    const el = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined) continue;
      if (key === "text") el.textContent = value;
      else if (key === "class") el.setAttribute("class", value);
      else el.setAttribute(key, String(value));
    }
    for (const child of children.flat()) if (child) el.append(child);
    return el;
  }

  function bytes(n) {
    if (n === null || n === undefined) return "—";
    if (n < 1024) return `${n} B`;
    if (n < 1048576) return `${(n / 1024).toFixed(1)} KiB`;
    return `${(n / 1048576).toFixed(1)} MiB`;
  }

  function pageHash(d) {
    return `#d=${enc(d.deployment)}&tab=history&` + (d.version ? `v=${d.version}` : `deploy=${enc(d.deploy_id)}`);
  }

  function openDeploy(d) {
    const hash = pageHash(d);
    if (window.location.hash !== hash) window.location.hash = hash; // a history entry: Back closes the page
    else applyHash();
  }

  function closePage() {
    if (!state.page) return;
    state.focus = state.page.version || null;
    state.focusShown = false;
    state.page = null;
    state.pageData = null;
    delete state.signatures["page-body"];
    delete state.signatures["history-body"];
    history.replaceState(null, "", `#d=${enc(state.selected)}&tab=history` + (state.focus ? `&v=${state.focus}` : ""));
    showTab("history", false);
    renderAll();
  }

  // The page follows the URL: a link, a click on a history row, or the browser's Back.
  function applyHash() {
    const wanted = readHash();
    if (!state.token) return;
    if (wanted.deployment && wanted.deployment !== state.selected && state.deployments.some((d) => d.name === wanted.deployment)) {
      select(wanted.deployment);
    }
    if (wanted.version || wanted.deployId) {
      const same = state.page && (wanted.deployId ? state.page.deployId === wanted.deployId : state.page.version === wanted.version);
      if (!same) {
        state.page = { deployment: wanted.deployment || state.selected, version: wanted.version, deployId: wanted.deployId };
        state.pageData = { view: null, files: null, filesError: null, diffs: {}, error: null };
        delete state.signatures["page-body"];
        loadPage();
      }
    } else if (state.page) {
      closePage();
      return;
    }
    renderPageVisibility();
  }

  function renderPageVisibility() {
    const on = !!state.page;
    $("deploy-page").hidden = !on;
    $("tabs").hidden = on;
    for (const t of TABS) $("panel-" + t).hidden = on || t !== state.tab;
  }

  async function loadPage() {
    const page = state.page;
    if (!page) return;
    const data = state.pageData;
    try {
      if (!page.deployId) {
        const found = state.history.find((d) => d.version === page.version && d.deployment === page.deployment);
        page.deployId = found ? found.deploy_id
          : (await api("GET", `deployments/${enc(page.deployment)}/versions/${page.version}`)).version.deploy_id;
      }
      const view = await api("GET", `deployments/${enc(page.deployment)}/deploys/${enc(page.deployId)}`);
      if (state.page !== page) return;
      data.view = view;
      data.error = null;
      page.version = view.deploy.version || null;
      if (view.deploy.version && !data.files && !data.filesError) {
        try {
          data.files = await api("GET", `deployments/${enc(page.deployment)}/deploys/${enc(page.deployId)}/files`);
        } catch (err) {
          if (err.status === 401) throw err;
          data.filesError = err.message;
        }
      }
    } catch (err) {
      if (err.status === 401) { failed(err); return; }
      if (state.page === page) data.error = err.status === 404 ? `No such deploy in ${page.deployment}.` : err.message;
    }
    if (state.page === page) renderPage();
  }

  async function loadDiff(path) {
    const page = state.page;
    const data = state.pageData;
    if (!page || !data) return;
    if (data.diffs[path] && !data.diffs[path].error) {
      delete data.diffs[path]; // a second click hides it
      renderPage();
      return;
    }
    data.diffs[path] = { loading: true };
    renderPage();
    try {
      const doc = await api("GET", `deployments/${enc(page.deployment)}/deploys/${enc(page.deployId)}/files/diff?path=${enc(path)}`);
      if (state.pageData === data) data.diffs[path] = { doc };
    } catch (err) {
      if (err.status === 401) { failed(err); return; }
      if (state.pageData === data) data.diffs[path] = { error: err.message };
    }
    if (state.pageData === data) renderPage();
  }

  function section(title, id, ...children) {
    return h("section", { class: "page-section", "aria-labelledby": id }, h("h4", { id }, title), ...children);
  }

  function renderPage() {
    const data = state.pageData;
    const body = $("page-body");
    if (!state.page || !data) return;
    const dep = current();
    const sig = JSON.stringify([data, state.admin, dep && dep.current_version, $("page-body").clientWidth]);
    render(body, sig, () => {
      if (data.error) return [h("p", { class: "error-text", id: "page-title" }, data.error)];
      if (!data.view) return [h("p", { class: "muted", id: "page-title" }, "Loading the deploy…")];
      const d = data.view.deploy;
      const isCurrent = dep && d.version && d.version === dep.current_version && d.state === "ACTIVE";
      return [
        h("div", { class: "page-head" },
          h("h3", { id: "page-title" }, `${d.deployment} ${d.version ? "v" + d.version : "deploy"}`),
          h("span", { class: `badge badge-${STATE_KIND[d.state] || "muted"} state` }, d.state),
          isCurrent ? h("span", { class: "tag" }, "live") : null),
        h("p", { class: "page-description" }, d.description || h("span", { class: "muted" }, "(no description)")),
        facts(d),
        pageActions(d, dep),
        section("Timeline", "page-timeline", timeline(d, data.view)),
        section("DAGs", "page-dags", dagChanges(d)),
        section("Files", "page-files", fileChanges(data)),
        d.errors && d.errors.length ? section("Validation errors", "page-errors", errorsByFile(d)) : null,
        section("Airflow parse", "page-parse", parseByFile(data.view)),
      ].filter(Boolean);
    });
  }

  function facts(d) {
    const g = d.git || {};
    const rows = [
      ["Deployed by", h("span", { class: "created-by" }, d.created_by || "—")],
      ["When", timeEl(d.created_at, formatTime(d.created_at))],
      ["Deploy id", h("code", {}, d.deploy_id)],
      ["Bundle", `${bytes(d.size)} compressed` + (d.files != null ? `, ${plural(d.files, "file")}, ${bytes(d.bytes)}` : "")],
      ["sha256", h("code", { class: "sha" }, d.sha256)],
    ];
    if (g.sha) {
      rows.push(["Commit", h("span", { class: "git git-full" }, h("code", { title: g.sha }, g.sha.slice(0, 12)),
        g.dirty ? h("span", { class: "dirty" }, "+dirty") : null, g.branch ? h("span", { class: "branch", title: g.branch }, g.branch) : null)]);
      if (g.author) rows.push(["Author", g.author]);
      if (g.subject) rows.push(["Subject", g.subject]);
    }
    if (d.promoted_from) {
      const p = d.promoted_from;
      rows.push(["Promoted from", h("span", { class: "promoted" }, `${p.deployment} v${p.version} (deploy ${p.deploy_id}, same sha256)`)]);
    }
    if (d.rollback_of) rows.push(["Rollback of", h("code", {}, d.rollback_of)]);
    return h("dl", { class: "facts" }, rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
  }

  function pageActions(d, dep) {
    if (!canRollBack(d, dep)) return null;
    return h("div", { class: "actions page-actions" }, h("button", {
      type: "button", class: "btn", dataset: { key: "page-rb:" + d.deploy_id }, onclick: () => askRollback(d),
    }, `Roll back to v${d.version}`));
  }

  // created, uploaded, ACTIVE, each sidecar live: one row per event, a bar from the deploy's creation
  function timeline(d, view) {
    const t0 = d.created_at;
    const events = [["created", d.created_at], ["uploaded", d.stored_at || d.uploaded_at], ["validating", d.uploaded_at],
      ["ACTIVE", d.activated_at]];
    for (const [name, at] of Object.entries(d.activations || {}).sort((a, b) => a[1] - b[1])) events.push([`${name} live`, at]);
    if (d.converged_at) events.push(["all sidecars live", d.converged_at]);
    const shown = events.filter(([, at]) => at && t0);
    if (shown.length < 2) return h("p", { class: "muted" }, "No timings yet.");
    const span = Math.max(1, ...shown.map(([, at]) => at - t0));
    const width = Math.max(300, Math.min(760, Math.round($("page-body").clientWidth || 640)));
    const label = Math.min(170, Math.round(width * 0.4)), value = 64, row = 22;
    const scale = (width - label - value) / span;
    const desc = shown.map(([name, at]) => `${name} at +${secs((at - t0) / 1000)}`).join(", ");
    const svg = sv("svg", { class: "timeline", role: "img", viewBox: `0 0 ${width} ${shown.length * row + 4}`,
      width, height: shown.length * row + 4,
      "aria-labelledby": "timeline-title timeline-desc" },
      sv("title", { id: "timeline-title", text: "Stage timeline of this deploy" }),
      sv("desc", { id: "timeline-desc", text: desc }),
      shown.map(([name, at], i) => {
        const y = i * row + 4;
        const w = Math.max(2, (at - t0) * scale);
        return sv("g", { class: "tl-row" + (name.endsWith(" live") ? " tl-sidecar" : "") },
          sv("text", { x: 0, y: y + 13, class: "tl-label", text: name }),
          sv("rect", { x: label, y: y + 3, width: w, height: 12, rx: 2, class: "tl-bar" }),
          sv("text", { x: label + w + 6, y: y + 13, class: "tl-value", text: `+${secs((at - t0) / 1000)}` }));
      }));
    const notLive = (view.sidecars || []).filter((x) => x.live && !(d.activations || {})[x.name]).map((x) => x.name);
    return h("div", {}, svg, notLive.length && d.state === "ACTIVE"
      ? h("p", { class: "muted" }, `Not live yet on ${notLive.join(", ")}.`) : null);
  }

  function dagChanges(d) {
    const diff = d.diff;
    if (!diff) return h("p", { class: "muted" }, d.version ? "No DAG changes recorded." : "This deploy never went live.");
    const list = (label, cls, items, total) => items && items.length
      ? h("div", { class: "dag-list " + cls }, h("span", { class: "dag-label" }, `${label} (${total || items.length})`),
        h("ul", { "aria-label": label }, items.map((x) => h("li", {}, h("code", {}, x)))))
      : null;
    const parts = [
      list("DAGs added", "dags-added", diff.dags_added, diff.dags_added_count),
      list("DAGs removed", "dags-removed", diff.dags_removed, diff.dags_removed_count),
      list("DAGs no longer given by name (maybe built at parse time)", "dags-maybe", diff.dags_maybe_removed),
      list(`Files with DAG ids computed at parse time (${plural(diff.dynamic_dags || 0, "DAG")})`, "dags-dynamic", diff.dynamic_files),
      list("Removed files that had DAGs computed at parse time", "dags-dynamic-removed", diff.dynamic_files_removed),
    ].filter(Boolean);
    return parts.length ? h("div", { class: "dag-changes" }, parts) : h("p", { class: "muted" }, "No DAG added or removed.");
  }

  function fileChanges(data) {
    if (data.filesError) return h("p", { class: "muted" }, data.filesError);
    const f = data.files;
    if (!f) return h("p", { class: "muted" }, data.view.deploy.version ? "Loading the file list…" : "This deploy never went live: no files changed.");
    const against = f.base_version ? `against v${f.base_version}` : "the first version: every file is new";
    const group = (kind, label, items, total) => {
      if (!items.length) return null;
      return h("div", { class: "file-group file-" + kind },
        h("h5", {}, `${label} (${total})`),
        h("ul", { class: "file-list", "aria-label": `Files ${kind}` }, items.map((c) => fileItem(kind, c, f, data))),
        total > items.length ? h("p", { class: "muted" }, `… and ${total - items.length} more`) : null);
    };
    const none = !f.added_total && !f.removed_total && !f.changed_total;
    return h("div", {},
      h("p", { class: "muted files-summary" }, `${f.changed_total} changed, ${f.added_total} added, ${f.removed_total} removed, ${against}`),
      none ? h("p", { class: "muted" }, "The same files as the version before.") : null,
      group("changed", "Changed", f.changed, f.changed_total),
      group("added", "Added", f.added, f.added_total),
      group("removed", "Removed", f.removed, f.removed_total));
  }

  function fileItem(kind, c, f, data) {
    const sizes = kind === "changed" ? `${bytes(c.base_size)} → ${bytes(c.size)}` : bytes(c.size);
    const tooBig = Math.max(c.size || 0, c.base_size || 0) > f.diff_max_bytes;
    const shown = data.diffs[c.path];
    return h("li", { class: "file", dataset: { path: c.path } },
      h("div", { class: "file-line" },
        h("code", { class: "file-path" }, c.path),
        h("span", { class: "file-size muted" }, sizes),
        tooBig ? h("span", { class: "muted file-nodiff" }, "too large for a diff")
          : h("button", { type: "button", class: "btn btn-small", "aria-expanded": shown && !shown.error ? "true" : "false",
            dataset: { key: "diff:" + c.path }, onclick: () => loadDiff(c.path) },
          shown && !shown.error && !shown.loading ? "Hide diff" : "Show diff")),
      shown ? diffView(shown) : null);
  }

  function diffView(shown) {
    if (shown.loading) return h("p", { class: "muted" }, "Loading the diff…");
    if (shown.error) return h("p", { class: "error-text diff-error" }, shown.error);
    const doc = shown.doc;
    if (doc.status === "unchanged") return h("p", { class: "muted" }, "Unchanged.");
    const lines = doc.diff.replace(/\n$/, "").split("\n").map((line) => {
      const cls = line.startsWith("+++") || line.startsWith("---") ? "dl-file" : line.startsWith("@@") ? "dl-hunk"
        : line.startsWith("+") ? "dl-add" : line.startsWith("-") ? "dl-del" : "dl-ctx";
      return h("span", { class: "dl " + cls }, line + "\n");
    });
    return h("div", { class: "diff-box" },
      h("pre", { class: "diff-text", tabindex: "0", "aria-label": `Diff of ${doc.path}` }, lines),
      doc.truncated ? h("p", { class: "muted" }, "The diff is cut short here.") : null);
  }

  function byPath(items) {
    const out = new Map();
    for (const item of items) {
      const key = item.path || "(the bundle)";
      if (!out.has(key)) out.set(key, []);
      out.get(key).push(item);
    }
    return out;
  }

  function errorsByFile(d) {
    const files = [...byPath(d.errors).entries()].map(([path, items]) => h("li", { class: "error-file" },
      h("code", { class: "where" }, path),
      h("ul", {}, items.map((e) => h("li", {},
        e.line ? h("span", { class: "line" }, `line ${e.line}: `) : null, h("span", { class: "code" }, e.code), ": ", e.message)))));
    return h("div", {}, h("ul", { class: "errors by-file", "aria-label": "Validation errors by file" }, files),
      d.errors_truncated ? h("p", { class: "muted" }, `… and ${d.errors_truncated} more`) : null);
  }

  function parseByFile(view) {
    const p = view.parse;
    if (!p || p.status === "none") return h("p", { class: "muted" }, "No parse report: no sidecar parses with Airflow here.");
    if (p.status === "unavailable") return h("p", { class: "muted" }, "Airflow parse is not available on these sidecars.");
    const components = {};
    for (const x of view.sidecars || []) components[x.name] = x.component;
    const errors = p.import_errors || [];
    const head = h("p", { class: "parse" + (errors.length ? " parse-errors" : "") },
      `Airflow loaded ${Math.max(0, (p.files || 0) - byPath(errors).size)} of ${p.files} files (${plural(p.dags, "DAG")})`,
      p.pending && p.pending.length ? h("span", { class: "muted" }, ` · waiting on ${p.pending.join(", ")}`) : null,
      p.held && p.held.length ? h("span", { class: "badge badge-error" }, `held on ${p.held.join(", ")}`) : null);
    const files = [...byPath(errors).entries()].map(([path, items]) => h("li", { class: "error-file" },
      h("code", { class: "where" }, path),
      h("ul", {}, items.map((e) => {
        const by = {};
        for (const name of e.sidecars) (by[components[name] || "sidecar"] ||= []).push(name);
        return h("li", {}, e.line ? h("span", { class: "line" }, `line ${e.line}: `) : null,
          h("span", { class: "code" }, e.type), ": ", e.message.split("\n")[0], e.new ? h("span", { class: "tag" }, "new") : null,
          h("span", { class: "muted" }, " — " + Object.entries(by).map(([c, names]) => `${c}: ${names.join(", ")}`).join("; ")));
      }))));
    return h("div", {}, head, files.length ? h("ul", { class: "errors by-file", "aria-label": "Import errors by file" }, files) : null);
  }

  // --- the chart of the last deploys: upload → ACTIVE and ACTIVE → all live, stacked bars ------------

  const CHART_MS = 10000;

  async function loadChart(name) {
    const had = state.chart[name];
    if (had && Date.now() - had.at < CHART_MS) return;
    try {
      const page = await api("GET", `deployments/${enc(name)}/deploys?limit=50`);
      state.chart[name] = { at: Date.now(), items: page.items };
    } catch (err) {
      if (!had) state.chart[name] = { at: Date.now(), items: [] };
    }
  }

  function chartPoints(items) {
    return items.filter((d) => d.version && d.stages).map((d) => {
      const st = d.stages;
      const up = st.upload_to_ingest_s != null && st.ingest_to_active_s != null ? st.upload_to_ingest_s + st.ingest_to_active_s : null;
      return { version: d.version, id: d.deploy_id, up, live: st.active_to_all_live_s };
    }).filter((p) => p.up != null || p.live != null).reverse(); // oldest left
  }

  function renderChart() {
    const entry = state.chart[state.selected];
    const points = entry ? chartPoints(entry.items) : [];
    $("deploy-chart").hidden = points.length === 0;
    const box = $("chart-box");
    const width = Math.max(300, Math.min(1200, Math.round(box.clientWidth || 600)));
    render(box, JSON.stringify([points, width]), () => {
      if (!points.length) return [];
      const height = 160, left = 44, bottom = 22, top = 10;
      const max = Math.max(0.1, ...points.map((p) => (p.up || 0) + (p.live || 0)));
      const plotW = width - left - 8, plotH = height - top - bottom;
      const slot = plotW / Math.max(points.length, 10);
      const bar = Math.max(2, Math.min(24, slot * 0.7));
      const y = (v) => top + plotH - (v / max) * plotH;
      const bars = points.map((p, i) => {
        const x = left + i * slot + (slot - bar) / 2;
        const up = p.up || 0, live = p.live || 0;
        const label = `v${p.version}: upload → ACTIVE ${p.up != null ? secs(p.up) : "—"}, ACTIVE → all live ${p.live != null ? secs(p.live) : "—"}`;
        return sv("g", { class: "bar", "data-version": p.version },
          sv("title", { text: label }),
          sv("rect", { class: "bar-up", x, y: y(up), width: bar, height: Math.max(0, (up / max) * plotH) }),
          sv("rect", { class: "bar-live", x, y: y(up + live), width: bar, height: Math.max(0, (live / max) * plotH) }),
          points.length <= 20 || i % Math.ceil(points.length / 12) === 0
            ? sv("text", { class: "axis-label", x: x + bar / 2, y: height - 6, "text-anchor": "middle", text: `v${p.version}` }) : null);
      });
      const slowest = points.reduce((a, b) => ((b.up || 0) + (b.live || 0) > (a.up || 0) + (a.live || 0) ? b : a));
      return [sv("svg", { class: "deploy-chart", role: "img", viewBox: `0 0 ${width} ${height}`, width, height,
        "aria-labelledby": "chart-title chart-desc" },
        sv("title", { id: "chart-title", text: `Timings of the last ${plural(points.length, "deploy")}` }),
        sv("desc", { id: "chart-desc", text: `Stacked bars per version, oldest first: upload → ACTIVE, then ACTIVE → all live sidecars. ` +
          `Slowest: v${slowest.version} (${secs((slowest.up || 0) + (slowest.live || 0))}).` }),
        sv("line", { class: "axis", x1: left, y1: top + plotH, x2: width - 4, y2: top + plotH }),
        sv("line", { class: "axis", x1: left, y1: top, x2: left, y2: top + plotH }),
        sv("text", { class: "axis-label", x: left - 4, y: top + 8, "text-anchor": "end", text: secs(max) }),
        sv("text", { class: "axis-label", x: left - 4, y: top + plotH, "text-anchor": "end", text: "0 s" }),
        bars),
      h("p", { class: "legend" }, h("span", { class: "key key-up" }), "upload → ACTIVE ", h("span", { class: "key key-live" }), "ACTIVE → all live")];
    });
    render($("chart-body"), JSON.stringify(points), () => points.slice().reverse().map((p) => h("tr", {},
      td({ "data-label": "Version" }, `v${p.version}`),
      td({ "data-label": "Upload → ACTIVE" }, p.up != null ? secs(p.up) : "—"),
      td({ "data-label": "ACTIVE → all live" }, p.live != null ? secs(p.live) : "—"))));
  }

  // --- the fleet: sidecars by component, each one's version and heartbeat --------------------------

  function renderFleet() {
    const box = $("fleet");
    const dep = current();
    const items = state.sidecars[state.selected] || [];
    $("fleet-empty").hidden = items.length > 0;
    const v = dep ? dep.current_version : 0;
    const groups = new Map();
    for (const x of items) {
      const c = x.component || "(no component)";
      if (!groups.has(c)) groups.set(c, []);
      groups.get(c).push(x);
    }
    const sig = JSON.stringify([v, items, Math.floor(Date.now() / 1000)]);
    render(box, sig, () => [...groups.entries()].sort().map(([component, members]) => {
      const on = members.filter((x) => x.live && x.on_current).length;
      const bad = members.filter((x) => !x.live || (v && !x.on_current)).length;
      return h("section", { class: "fleet-group", dataset: { component }, "aria-label": `Component ${component}` },
        h("div", { class: "fleet-head" }, h("h3", {}, component),
          h("span", { class: `badge badge-${bad ? "error" : "ok"}` }, v ? `${on} of ${members.length} on v${v}` : plural(members.length, "sidecar"))),
        h("ul", { class: "fleet-list" }, members.map((x) => {
          const mark = !x.live ? { text: "stale", kind: "error", title: `no heartbeat for ${secs(x.last_seen_s || 0)}` }
            : v && !x.on_current ? { text: `behind v${v}`, kind: "progress" } : { text: "current", kind: "ok" };
          return h("li", { class: `fleet-sidecar mark-${mark.kind}`, dataset: { sidecar: x.name } },
            h("span", { class: "fleet-name" }, x.name),
            h("span", { class: "fleet-version" }, x.version ? `v${x.version}` : "none"),
            h("span", { class: `badge badge-${mark.kind} fleet-mark`, title: mark.title || null }, mark.text),
            h("span", { class: "fleet-beat muted" }, "heartbeat ", timeEl(x.last_heartbeat, ago(x.last_heartbeat))),
            x.last_error ? h("span", { class: "error-text fleet-error" }, x.last_error) : null);
        })));
    }));
  }

  // --- rollback --------------------------------------------------------------------------

  function askRollback(d) {
    const dep = current();
    state.pending = d;
    const next = dep ? dep.last_version + 1 : null;
    $("rollback-title").textContent = `Roll back ${state.selected} to v${d.version}?`;
    $("rollback-text").textContent =
      `This makes a new version${next ? ` (v${next})` : ""} that serves the DAGs of v${d.version}` +
      (d.description ? ` (“${d.description}”)` : "") +
      ". Sidecars switch to it within seconds; tasks already running keep their files.";
    $("rollback-confirm").textContent = `Roll back to v${d.version}`;
    $("rollback-dialog").showModal();
  }

  async function onRollbackClosed() {
    const d = state.pending;
    state.pending = null;
    if (!d || $("rollback-dialog").returnValue !== "confirm") {
      if (d) announce("Rollback cancelled.");
      return;
    }
    try {
      const created = await api("POST", `deployments/${enc(d.deployment)}/deploys/${enc(d.deploy_id)}/rollback`);
      announce(`Rollback started: v${created.version || "?"} serves the DAGs of v${d.version}.`, "ok");
      await refresh();
    } catch (err) {
      failed(err);
    }
  }

  // --- sidecars ----------------------------------------------------------------------------

  function renderSidecars() {
    const body = $("sidecar-body");
    const dep = current();
    const items = state.sidecars[state.selected] || [];
    $("sidecars-empty").hidden = items.length > 0;
    $("sidecar-table").hidden = items.length === 0;
    const v = dep ? dep.current_version : 0;
    const sig = JSON.stringify([v, items, Math.floor(Date.now() / 1000)]);
    render(body, sig, () => items.map((s) => {
      const behind = s.live && v && !s.on_current;
      return h("tr", { class: "sidecar" + (s.live ? "" : " stale") + (behind ? " behind" : ""), dataset: { sidecar: s.name } },
        td({ "data-label": "Name", class: "name" }, s.name),
        td({ "data-label": "Component" }, s.component),
        td({ "data-label": "Version", class: "sidecar-version" }, s.version ? `v${s.version}` : "none",
          behind ? h("span", { class: "tag tag-progress" }, `behind v${v}`) : null),
        td({ "data-label": "Status" }, s.live
          ? h("span", { class: "badge badge-ok" }, "live")
          : h("span", { class: "badge badge-error", title: "no heartbeat recently" }, "stale")),
        td({ "data-label": "Last heartbeat" }, timeEl(s.last_heartbeat, ago(s.last_heartbeat))),
        td({ "data-label": "Last sync" }, timeEl(s.last_sync_at, ago(s.last_sync_at))),
        td({ "data-label": "Last error", class: "last-error" }, s.last_error
          ? h("span", { class: "error-text" }, s.last_error) : h("span", { class: "muted" }, "—")));
    }));
  }

  // --- webhook deliveries ----------------------------------------------------------------------

  function renderDeliveries() {
    const body = $("delivery-body");
    const items = state.deliveries[state.selected] || [];
    $("deliveries-empty").hidden = items.length > 0;
    $("delivery-table").hidden = items.length === 0;
    render(body, JSON.stringify(items), () => items.map((d) =>
      h("tr", { class: "delivery" + (d.ok ? "" : " failed"), dataset: { eventId: d.event_id } },
        td({ "data-label": "When" }, timeEl(d.at, formatTime(d.at))),
        td({ "data-label": "Webhook", class: "mono" }, d.webhook_id),
        td({ "data-label": "Event" }, d.event_type),
        td({ "data-label": "Attempt" }, String(d.attempt)),
        td({ "data-label": "HTTP status" }, d.status === null || d.status === undefined ? "—" : String(d.status)),
        td({ "data-label": "Result" }, d.ok
          ? h("span", { class: "badge badge-ok" }, "delivered")
          : h("span", { class: "error-text" }, d.error || "failed")))));
  }

  async function loadDeliveries(name) {
    try {
      const doc = await api("GET", `deployments/${enc(name)}/deliveries?limit=50`);
      state.deliveries[name] = doc.items;
    } catch (err) {
      state.deliveries[name] = [];
    }
  }

  // --- settings ----------------------------------------------------------------------------

  function buildLimitFields() {
    const box = $("limit-fields");
    box.replaceChildren(...LIMITS.map(([key, label]) => h("div", { class: "field" },
      h("label", { for: "limit-" + key }, label),
      h("input", { type: "number", id: "limit-" + key, name: key, min: 1, step: 1, required: true, "aria-describedby": "limit-" + key + "-hint" }),
      h("span", { class: "hint", id: "limit-" + key + "-hint" }))));
    for (const [key] of LIMITS) {
      $("limit-" + key).addEventListener("input", () => describeLimit(key));
    }
  }

  function describeLimit(key) {
    const input = $("limit-" + key);
    const n = Number(input.value);
    let text = "";
    if (key.endsWith("_bytes") && key !== "max_path_bytes" && n >= 1024) {
      text = n >= 1048576 ? `${(n / 1048576).toLocaleString(undefined, { maximumFractionDigits: 1 })} MiB`
        : `${(n / 1024).toLocaleString(undefined, { maximumFractionDigits: 1 })} KiB`;
    }
    setText($("limit-" + key + "-hint"), text);
  }

  function fillSettings(dep) {
    const form = $("settings-form");
    form.elements.mechanism.value = dep.mechanism;
    $("keep-versions").value = dep.keep_versions;
    $("retention-days").value = dep.retention_days;
    for (const [key] of LIMITS) {
      $("limit-" + key).value = dep.limits[key];
      describeLimit(key);
    }
    state.settingsFor = dep.name;
    state.settingsDirty = false;
    applyRole();
  }

  function applyRole() {
    const readOnly = !state.admin;
    for (const el of $("settings-form").querySelectorAll("input")) el.disabled = readOnly;
    $("settings-readonly").hidden = !readOnly;
    $("settings-actions").hidden = readOnly;
    $("save-settings").disabled = readOnly;
    const me = state.me;
    const role = state.admin ? "admin" : me ? me.role : "read-only";
    setText($("who"), me ? `Signed in as ${me.name} (${role})` : `Signed in: ${role}`);
  }

  function renderSettings() {
    const dep = current();
    if (!dep) return;
    if (state.settingsFor !== dep.name || !state.settingsDirty) fillSettings(dep);
  }

  function readSettings() {
    const form = $("settings-form");
    const num = (el, what) => {
      const n = Number(el.value);
      if (!el.value || !Number.isInteger(n) || !el.checkValidity()) {
        el.setAttribute("aria-invalid", "true");
        throw new ApiError(0, "invalid", `${what}: enter a whole number${el.min ? ` from ${el.min}` : ""}${el.max ? ` to ${el.max}` : ""}.`);
      }
      el.removeAttribute("aria-invalid");
      return n;
    };
    const limits = {};
    for (const [key, label] of LIMITS) limits[key] = num($("limit-" + key), label);
    return {
      mechanism: form.elements.mechanism.value,
      keep_versions: num($("keep-versions"), "Versions to keep"),
      retention_days: num($("retention-days"), "Retention (days)"),
      limits,
    };
  }

  async function saveSettings(event) {
    event.preventDefault();
    if (!state.admin || !state.selected) return;
    const name = state.selected;
    const btn = $("save-settings");
    btn.disabled = true;
    try {
      const body = readSettings();
      const updated = await api("PATCH", `deployments/${enc(name)}`, body);
      const i = state.deployments.findIndex((d) => d.name === name);
      if (i >= 0) state.deployments[i] = updated;
      fillSettings(updated);
      renderDeployments();
      announce(`Saved settings of ${name}: ${updated.mechanism === "DAG_ONLY" ? "DAG-only deploys" : "image only"}.`, "ok");
    } catch (err) {
      failed(err);
    } finally {
      btn.disabled = !state.admin;
    }
  }

  // --- tabs and selection ------------------------------------------------------------------

  function showTab(tab, focus) {
    state.tab = tab;
    for (const t of TABS) {
      const button = $("tab-" + t);
      const on = t === tab;
      button.setAttribute("aria-selected", on ? "true" : "false");
      button.tabIndex = on ? 0 : -1;
      $("panel-" + t).hidden = !on;
      if (on && focus) button.focus();
    }
    writeHash();
  }

  function onTabKey(event) {
    const i = TABS.indexOf(state.tab);
    let next = null;
    if (event.key === "ArrowRight") next = TABS[(i + 1) % TABS.length];
    else if (event.key === "ArrowLeft") next = TABS[(i + TABS.length - 1) % TABS.length];
    else if (event.key === "Home") next = TABS[0];
    else if (event.key === "End") next = TABS[TABS.length - 1];
    if (next) {
      event.preventDefault();
      showTab(next, true);
    }
  }

  function select(name) {
    if (state.selected === name) return;
    if (state.page && state.page.deployment !== name) {
      state.page = null;
      state.pageData = null;
    }
    state.selected = name;
    state.focus = null;
    state.history = [];
    state.cursor = null;
    state.extraPages = false;
    state.historyFor = null;
    state.settingsDirty = false;
    delete state.signatures["history-body"];
    $("history-body").replaceChildren();
    writeHash();
    renderAll();
    refresh();
  }

  function readHash() {
    const params = new URLSearchParams(window.location.hash.slice(1));
    // v=12, or an Airflow bundle version (the version folder, 12-<first 16 hex digits of the sha256>)
    const v = /^([1-9][0-9]*)(-[0-9a-f]{16})?$/.exec(params.get("v") || "");
    const version = v ? Number(v[1]) : null;
    const id = /^[0-9a-f]{11}-[0-9a-f]{6}$/.exec(params.get("deploy") || "");
    return { deployment: params.get("d"), tab: TABS.includes(params.get("tab")) ? params.get("tab") : null, version,
      deployId: id ? id[0] : null };
  }

  function writeHash() {
    if (!state.selected) return;
    const p = state.page;
    const hash = p ? `#d=${enc(state.selected)}&tab=history&` + (p.version ? `v=${p.version}` : `deploy=${enc(p.deployId)}`)
      : `#d=${enc(state.selected)}&tab=${state.tab}` + (state.focus ? `&v=${state.focus}` : "");
    if (window.location.hash !== hash) history.replaceState(null, "", hash);
  }

  function renderAll() {
    renderDeployments();
    const dep = current();
    $("detail").hidden = !dep;
    if (!dep) return;
    setText($("detail-title"), dep.name);
    renderHistory();
    renderChart();
    renderFleet();
    renderSidecars();
    renderDeliveries();
    renderSettings();
    renderPageVisibility();
    renderPage();
  }

  // --- polling -------------------------------------------------------------------------------

  async function refresh() {
    if (!state.token || state.polling) return;
    state.polling = true;
    try {
      const doc = await api("GET", "deployments");
      state.deployments = doc.items;
      if (!state.selected || !current()) {
        const wanted = readHash().deployment;
        const pick = state.deployments.find((d) => d.name === wanted) || state.deployments[0];
        state.selected = pick ? pick.name : null;
        writeHash();
      }
      const views = await Promise.all(state.deployments.map((d) =>
        api("GET", `deployments/${enc(d.name)}/sidecars`).then((r) => r.items, () => null)));
      state.deployments.forEach((d, i) => { if (views[i]) state.sidecars[d.name] = views[i]; });
      if (state.selected) await Promise.all([loadDeliveries(state.selected), loadChart(state.selected)]);
      renderAll();
      if (state.page) await loadPage();
      if (state.selected) await loadHistory(false);
      setText($("refreshed"), "updated " + new Date().toLocaleTimeString());
      if ($("status").classList.contains("status-error") && $("status").dataset.network) announce("");
    } catch (err) {
      failed(err);
    } finally {
      state.polling = false;
    }
  }

  function schedule() {
    clearTimeout(state.timer);
    state.timer = setTimeout(async () => {
      if (!document.hidden) await refresh();
      if (state.token) schedule();
    }, POLL_MS);
  }

  function failed(err) {
    if (err && err.status === 401) {
      signOut("Your token was not accepted (revoked or expired). Sign in again.");
      return;
    }
    const msg = err && err.message ? err.message : String(err);
    announce(msg, "error");
    $("status").dataset.network = err && err.status === 0 && err.code === "network" ? "1" : "";
  }

  // --- sign in / out -------------------------------------------------------------------------

  async function signIn(token, remember) {
    state.token = token;
    try {
      state.me = await api("GET", "whoami");
    } catch (err) {
      state.token = null;
      state.me = null;
      sessionStorage.removeItem(TOKEN_KEY);
      showSignIn();
      announce(err.status === 401 ? "That token was not accepted." : err.message, "error");
      return;
    }
    if (remember) sessionStorage.setItem(TOKEN_KEY, token);
    // Admins may change settings and roll back (in the deployments their token is scoped to).
    state.admin = state.me.role === "admin";
    $("signin").hidden = true;
    $("app").hidden = false;
    $("session").hidden = false;
    $("token").value = "";
    applyRole();
    const wanted = readHash();
    if (wanted.tab) state.tab = wanted.tab;
    state.focus = wanted.version;
    state.focusShown = false;
    showTab(state.tab, false);
    announce(state.admin ? "Signed in as an admin." : "Signed in with read-only access.", "ok");
    await refresh();
    applyHash();
    schedule();
  }

  function signOut(message) {
    clearTimeout(state.timer);
    Object.assign(state, {
      token: null, admin: false, me: null, page: null, pageData: null, chart: {}, deployments: [], sidecars: {}, deliveries: {}, selected: null, history: [], cursor: null,
      historyFor: null, settingsFor: null, settingsDirty: false, signatures: {},
    });
    sessionStorage.removeItem(TOKEN_KEY);
    for (const id of ["deployment-list", "history-body", "sidecar-body"]) $(id).replaceChildren();
    showSignIn();
    announce(message || "Signed out.", message ? "error" : null);
  }

  function showSignIn() {
    $("app").hidden = true;
    $("session").hidden = true;
    $("signin").hidden = false;
    $("token").focus();
  }

  // --- wiring ----------------------------------------------------------------------------------

  function init() {
    buildLimitFields();
    $("signin-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token").value.trim();
      if (token) signIn(token, true);
    });
    $("sign-out").addEventListener("click", () => signOut());
    for (const t of TABS) $("tab-" + t).addEventListener("click", () => showTab(t, false));
    $("tabs").addEventListener("keydown", onTabKey);
    $("load-more").addEventListener("click", loadMore);
    $("settings-form").addEventListener("submit", saveSettings);
    $("settings-form").addEventListener("input", () => { state.settingsDirty = true; });
    $("settings-form").addEventListener("change", () => { state.settingsDirty = true; });
    $("reset-settings").addEventListener("click", () => {
      const dep = current();
      if (dep) fillSettings(dep);
      announce("Changes discarded.");
    });
    $("rollback-dialog").addEventListener("close", onRollbackClosed);
    $("page-back").addEventListener("click", closePage);
    window.addEventListener("hashchange", applyHash);
    document.addEventListener("visibilitychange", () => { if (!document.hidden && state.token) refresh(); });

    const saved = sessionStorage.getItem(TOKEN_KEY);
    if (saved) signIn(saved, false);
    else showSignIn();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
