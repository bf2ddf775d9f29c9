// DistDiff status: shows the live sidecar (strategy, ranks, pids) under every DistDiff node and adds
// "Release GPUs" to the canvas menu. Everything is prefixed "distdiff" (extension name, routes, classes).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const DISTDIFF_NODES = new Set(["LoadSharded", "EncodeOnGPUs", "ParallelDenoise", "DecodeVAE", "DistDiffReleaseGPUs",
                                "DistDiffLoRA"]);

async function fetchStatus() {
  try {
    const response = await api.fetchApi("/distdiff/status");
    return response.ok ? await response.json() : { running: false, error: response.status };
  } catch (err) {
    return { running: false, error: String(err) };
  }
}

function describe(status) {
  if (!status.running) return "DistDiff: no ranks running";
  let text = `DistDiff: ${status.strategy} on ${status.ranks} ${status.device} rank(s), pids ${status.pids.join(", ")}`;
  const run = status.last_run ?? {};
  if (run.cache && run.cache !== "none") {
    text += `; ${run.cache} cache skipped ${run.forwards_skipped} of ${run.forwards_cached} forwards`;
  }
  if (run.compile === "regional") text += `; compiled (${run.graphs_compiled} new graphs)`;
  return text;
}

app.registerExtension({
  name: "distdiff.status",
  async setup() {
    const refresh = async () => {
      const text = describe(await fetchStatus());
      for (const node of app.graph?._nodes ?? []) {
        if (DISTDIFF_NODES.has(node.type)) {
          node.distdiffStatus = text;
          node.setDirtyCanvas?.(true, false);
        }
      }
    };
    api.addEventListener("executed", refresh);
    api.addEventListener("execution_error", refresh);
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
    return [null, { content: "DistDiff: Release GPUs", callback: () => api.fetchApi("/distdiff/release", { method: "POST" }) }];
  },
});
