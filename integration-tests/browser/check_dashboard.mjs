// The built-in dashboard page in a real browser (Debian's Chromium, driven by playwright-core):
// it loads with no console error and no page error, every tile comes to show data, and a
// screenshot is kept.
//
//   node check_dashboard.mjs <page url> <screenshot path> [timeout seconds]
//
// The page is served by a running `sightline demo` (or `run`); its windows arrive every few
// seconds, so the check waits, up to the timeout, for every tile to have data.
import { createRequire } from "node:module";

// playwright-core from the directory SIGHTLINE_NODE_MODULES names (the test command installs it
// under .tools/node), else from the usual resolution.
const modules = process.env.SIGHTLINE_NODE_MODULES;
const require = createRequire(modules ? `${modules.replace(/\/$/, "")}/` : import.meta.url);
const { chromium } = require("playwright-core");

const [url, screenshot, timeoutArg] = process.argv.slice(2);
if (!url || !screenshot) {
  console.error("usage: node check_dashboard.mjs <page url> <screenshot path> [timeout seconds]");
  process.exit(2);
}
const timeoutMs = 1000 * Number(timeoutArg || 240);

// The demo starts in the background: wait (up to a minute) until its server answers, so that
// a slow start is not taken for the page's failure.
{
  const ready = Date.now() + 60_000;
  for (;;) {
    try {
      if ((await fetch(url)).ok) break;
    } catch (_) { /* not listening yet */ }
    if (Date.now() > ready) { console.error(`check failed: ${url} did not answer within 60 s`); process.exit(1); }
    await new Promise((r) => setTimeout(r, 250));
  }
}
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const problems = [];
// Requests cut short by closing the browser at the end are not the page's fault.
let closing = false;
const problem = (p) => { if (!closing) problems.push(p); };
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1800 } });
  page.on("console", (m) => { if (m.type() === "error") problem(`console error: ${m.text()}`); });
  page.on("pageerror", (e) => problem(`page error: ${e.message}`));
  page.on("requestfailed", (r) => problem(`request failed: ${r.url()} (${r.failure()?.errorText})`));
  page.on("response", (r) => { if (r.status() >= 400) problem(`HTTP ${r.status()}: ${r.url()}`); });
  // Every request must stay on the page's own server: nothing from a CDN.
  const origin = new URL(url).origin;
  page.on("request", (r) => {
    if (!r.url().startsWith(origin) && !r.url().startsWith("data:")) problem(`external request: ${r.url()}`);
  });

  await page.goto(url, { waitUntil: "load" });
  const tiles = await page.$$eval(".tile", (ts) => ts.map((t) => t.id));
  if (tiles.length < 10) problems.push(`only ${tiles.length} tiles on the page`);
  const deadline = Date.now() + timeoutMs;
  let empty = tiles;
  while (Date.now() < deadline) {
    empty = await page.$$eval('.tile[data-state="empty"]', (ts) => ts.map((t) => t.id));
    if (empty.length === 0) break;
    await page.waitForTimeout(2000);
  }
  if (empty.length) problems.push(`tiles without data after ${timeoutMs / 1000} s: ${empty.join(", ")}`);
  // Charts, not only numbers: every tile but the alerts and guardrail lists draws an SVG chart.
  const withoutChart = await page.$$eval(".tile", (ts) => ts
    .filter((t) => !["alerts", "guardrails"].includes(t.id) && !t.querySelector("svg rect, svg polyline, svg circle"))
    .map((t) => t.id));
  if (withoutChart.length) problems.push(`tiles with no chart: ${withoutChart.join(", ")}`);
  // The freshness tile's source: every Kafka partition with a watermark and a consumer lag.
  const status = await (await page.request.get(`${origin}/api/status`)).json();
  const partial = status.partitions.filter((p) => p.watermark_ms == null || p.consumer_lag == null);
  if (!status.partitions.length || partial.length) {
    problems.push(`partitions without a watermark or a consumer lag: ${JSON.stringify(status.partitions)}`);
  }
  const state = await page.textContent("#s-state");
  if (state !== "running") problems.push(`header says "${state}", not "running"`);
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(`dashboard: ${tiles.length} tiles with data; screenshot ${screenshot}`);
} catch (e) {
  problems.push(`check failed: ${e.stack || e}`);
} finally {
  closing = true;
  await browser.close();
}
for (const p of problems) console.error(p);
process.exit(problems.length > 0 ? 1 : 0);
