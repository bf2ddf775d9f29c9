// DistDiff status panel: the live sidecar (state, model, strategy, one row per rank with memory and stage, the
// failed rank's error and log tail, the last run's stage timings) and the buttons Release GPUs / Restart.
// Modern frontend: a sidebar tab (app.extensionManager.registerSidebarTab); legacy frontend: a floating panel
// opened from the canvas menu. Live through ComfyUI's websocket: the pack sends "distdiff.status" events.
// Everything is prefixed "distdiff" (extension name, routes, events, CSS classes, ids).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EVENT = "distdiff.status";
const TAB_ID = "distdiff-status";
const DISTDIFF_NODES = new Set(["LoadSharded", "EncodeOnGPUs", "ParallelDenoise", "DecodeVAE", "DistDiffReleaseGPUs",
                                "DistDiffLoRA", "DistDiffLoadFiles", "DistDiffDecodeVAETiled"]);
const STYLE = `
.distdiff-panel { font: 12px/1.4 sans-serif; color: var(--fg-color, #ddd); padding: 8px; overflow: auto; }
.distdiff-panel h3 { margin: 4px 0 8px; font-size: 14px; }
.distdiff-panel table { border-collapse: collapse; width: 100%; margin: 6px 0; }
.distdiff-panel th, .distdiff-panel td { text-align: left; padding: 2px 4px; border-bottom: 1px solid #444; white-space: nowrap; }
.distdiff-panel th { color: #999; font-weight: normal; }
.distdiff-panel .distdiff-dim { color: #888; }
.distdiff-panel .distdiff-kv td:first-child { color: #999; width: 7em; }
.distdiff-panel .distdiff-state { font-weight: bold; padding: 1px 6px; border-radius: 3px; }
.distdiff-state-none { background: #555; } .distdiff-state-starting, .distdiff-state-loading { background: #846a1a; }
.distdiff-state-ready { background: #2d6b3a; } .distdiff-state-running { background: #23588f; }
.distdiff-state-failed { background: #8f2323; }
.distdiff-panel pre { background: #1b1b1b; color: #e88; padding: 6px; white-space: pre-wrap; max-height: 14em; overflow: auto; }
.distdiff-panel button { margin: 6px 6px 0 0; padding: 3px 10px; cursor: pointer; }
.distdiff-panel .distdiff-rank-error { color: #e88; display: inline-block; max-width: 16em; overflow: hidden;
  text-overflow: ellipsis; vertical-align: bottom; }
.distdiff-panel .distdiff-plan summary { cursor: pointer; }
.distdiff-panel .distdiff-plan li { white-space: normal; margin: 2px 0; }
.distdiff-panel .distdiff-plan .distdiff-warning { color: #eb6; }
.distdiff-floating { position: fixed; right: 12px; top: 60px; width: 460px; max-height: 80vh; z-index: 1000;
  background: #222; border: 1px solid #555; border-radius: 6px; box-shadow: 0 4px 16px #0008; }
`;

let latest = { state: "none", ranks: [] };
const views = new Set(); // mounted panel bodies (the sidebar tab's, or the floating one)

function esc(value) {
  return String(value ?? "").replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

function mib(bytes) {
  return bytes == null ? "—" : `${(bytes / 2 ** 20).toFixed(0)} MiB`;
}

function step(s) {
  return s ? `${s[0]} / ${s[1]}` : "—";
}

function speed(status) {
  // What the speed options did in the last denoise (cfg, step cache, regional compile); "" when none is on.
  const run = status.last_run ?? {};
  const parts = [];
  if (run.cfg > 1) parts.push(`CFG parallel (cfg ${run.cfg})`);
  if (run.cache && run.cache !== "none") {
    parts.push(`${run.cache} cache skipped ${run.forwards_skipped} of ${run.forwards_cached} forwards`);
  }
  if (run.compile === "regional") parts.push(`compiled (${run.graphs_compiled} new graphs)`);
  return parts.join("; ");
}

function plan(status) {
  // The loader's plan (strategy manual/auto): its first line, then reasons and warnings, folded.
  const p = status.plan;
  if (!p) return "";
  const warnings = [...(p.warnings ?? []), ...(p.last_request ?? [])];
  return `<details class="distdiff-plan"><summary>plan (${esc(p.strategy)}): <span class="distdiff-plan-layout">${esc(p.layout ?? "as set")}</span>${
    warnings.length ? ` <span class="distdiff-warning">⚠ ${warnings.length}</span>` : ""}</summary>
    <div class="distdiff-dim">${esc(p.summary)}</div><ul>${(p.reasons ?? []).map((r) => `<li>${esc(r)}</li>`).join("")}${
    warnings.map((w) => `<li class="distdiff-warning">${esc(w)}</li>`).join("")}</ul></details>`;
}

function render(status) {
  const ranks = status.ranks ?? [];
  // Each row: that rank's stage and its own step (a dp rank counts its own images); the stage line above shows the
  // progress summed over the ranks.
  // A node's rank (joined from another machine) shows the node's address from the cluster SPEC and its hostname, and
  // its pid is labelled as that machine's; memory is what each rank reported itself. A failed sidecar keeps its rows,
  // the ranks the error names (all of a lost node's) carrying it.
  const rows = ranks.map((r) => `<tr class="distdiff-rank${r.remote ? " distdiff-rank-remote" : ""}${r.error ? " distdiff-rank-failed" : ""}" data-rank="${r.rank}"><td>${r.rank}</td>
    <td>${esc(r.device ?? "?")}<span class="distdiff-dim">@${esc(r.remote ? `${r.node} (${r.hostname ?? "?"})` : r.hostname ?? "local")}</span></td>
    <td>${r.pid ?? "—"}${r.remote ? `<span class="distdiff-dim"> on ${esc(r.node)}</span>` : ""}</td>
    <td>${mib(r.rss_bytes)}${r.gpu_allocated_bytes != null
      ? `<br><span class="distdiff-dim">GPU ${mib(r.gpu_allocated_bytes)} / ${mib(r.gpu_reserved_bytes)}</span>` : ""}</td>
    <td>${r.error ? `<span class="distdiff-rank-error" title="${esc(r.error)}">${esc(r.error)}</span>`
      : `${esc(r.stage ?? "idle")}${r.step ? ` <span class="distdiff-rank-step">${step(r.step)}</span>` : ""}`}</td></tr>`).join("");
  const who = status.failure?.node ? `node ${status.failure.node}` : `rank ${status.failure?.rank ?? "?"}`;
  const failure = status.failure
    ? `<div class="distdiff-failure"><b>${esc(who)} failed during ${esc(status.failure.phase)}</b>
       <div class="distdiff-error">${esc(status.failure.error)}</div>
       ${status.failure.log_tail?.length ? `<pre class="distdiff-log">${esc(status.failure.log_tail.join("\n"))}</pre>` : ""}</div>`
    : "";
  const timings = Object.entries(status.last_seconds ?? {});
  return `<h3>DistDiff <span class="distdiff-state distdiff-state-${esc(status.state)}">${esc(status.state)}</span></h3>
    <table class="distdiff-kv">
      <tr><td>model</td><td class="distdiff-model">${esc(status.model ?? "—")} ${status.family ? `(${esc(status.family)})` : ""}</td></tr>
      <tr><td>strategy</td><td class="distdiff-strategy">${esc(status.strategy ?? "—")}${status.degrees
        ? ` — world ${status.degrees.world_size}, dp ${status.degrees.dp}, cfg ${status.degrees.cfg ?? 1}, ring ${status.degrees.ring}, ulysses ${status.degrees.ulysses}` : ""}</td></tr>
      ${speed(status) ? `<tr><td>speed</td><td class="distdiff-speed">${esc(speed(status))}</td></tr>` : ""}
      <tr><td>stage</td><td class="distdiff-stage">${esc(status.stage ?? "—")}${status.step
        ? ` · step <span class="distdiff-total-step">${step(status.step)}</span> <span class="distdiff-dim">(all ranks)</span>` : ""}</td></tr>
    </table>
    ${plan(status)}
    ${ranks.length ? `<table class="distdiff-ranks"><tr><th>rank</th><th>device@node</th><th>pid</th><th>memory</th><th>stage · step</th></tr>${rows}</table>` : `<div class="distdiff-empty">no ranks running</div>`}
    ${failure}
    ${timings.length ? `<table class="distdiff-timings"><tr><th>last run</th><th>seconds</th></tr>${timings
      .map(([k, v]) => `<tr><td>${esc(k)}</td><td>${Number(v).toFixed(2)}</td></tr>`).join("")}</table>` : ""}
    <button class="distdiff-release">Release GPUs</button><button class="distdiff-restart">Restart</button>`;
}

function paint() {
  for (const body of views) body.innerHTML = render(latest);
}

function mount(el) {
  if (!document.getElementById("distdiff-style")) {
    const style = document.createElement("style");
    style.id = "distdiff-style";
    style.textContent = STYLE;
    document.head.appendChild(style);
  }
  const body = document.createElement("div");
  body.className = "distdiff-panel";
  body.addEventListener("click", async (event) => {
    const route = event.target.closest(".distdiff-release") ? "/distdiff/release"
      : event.target.closest(".distdiff-restart") ? "/distdiff/restart" : null;
    if (!route) return;
    event.target.disabled = true;
    try {
      await api.fetchApi(route, { method: "POST" });
    } finally {
      event.target.disabled = false;
      await refresh();
    }
  });
  el.appendChild(body);
  views.add(body);
  body.innerHTML = render(latest);
  refresh();
  return body;
}

async function refresh() {
  try {
    const response = await api.fetchApi("/distdiff/status");
    if (response.ok) latest = await response.json();
  } catch (err) {
    latest = { ...latest, state: latest.state, fetch_error: String(err) };
  }
  paint();
  paintNodes();
}

function describe(status) {
  if (!status.ranks?.length) return `DistDiff: ${status.state}`;
  const extra = speed(status);
  return `DistDiff: ${status.state}, ${status.strategy} on ${status.ranks.length} rank(s)${extra ? `; ${extra}` : ""}`;
}

function paintNodes() {
  const text = describe(latest);
  for (const node of app.graph?._nodes ?? []) {
    if (DISTDIFF_NODES.has(node.type)) {
      node.distdiffStatus = text;
      node.setDirtyCanvas?.(true, false);
    }
  }
}

function openFloating() {
  let panel = document.getElementById("distdiff-floating");
  if (panel) {
    panel.remove();
    for (const body of views) if (!body.isConnected) views.delete(body);
    return;
  }
  panel = document.createElement("div");
  panel.id = "distdiff-floating";
  panel.className = "distdiff-floating";
  document.body.appendChild(panel);
  mount(panel);
}

app.registerExtension({
  name: "distdiff.status",
  async setup() {
    api.addEventListener(EVENT, (event) => {
      latest = event.detail;
      paint();
      paintNodes();
    });
    api.addEventListener("reconnected", refresh);
    const manager = app.extensionManager;
    if (manager?.registerSidebarTab) {
      manager.registerSidebarTab({
        id: TAB_ID,
        icon: "pi pi-sitemap",
        title: "DistDiff",
        tooltip: "DistDiff ranks",
        type: "custom",
        render: (el) => mount(el),
        destroy: () => {
          for (const body of views) if (!body.isConnected) views.delete(body);
        },
      });
    }
    setTimeout(refresh, 500);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!DISTDIFF_NODES.has(nodeData.name)) return;
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      if (!this.distdiffStatus || this.flags?.collapsed) return;
      ctx.save();
      ctx.font = "10px sans-serif";
      ctx.fillStyle = "#8a8";
      ctx.fillText(this.distdiffStatus, 6, this.size[1] + 12);
      ctx.restore();
    };
  },
  getCanvasMenuItems() {
    const items = [null, { content: "DistDiff: Release GPUs", callback: () => api.fetchApi("/distdiff/release", { method: "POST" }) }];
    if (!app.extensionManager?.registerSidebarTab) items.push({ content: "DistDiff: status panel", callback: openFloating });
    return items;
  },
});

// For the tests and the legacy frontend's menu: open the panel without the sidebar.
window.distdiffOpenFloating = openFloating;
