// slide-clip viewer page. Plain JS, no build step. Every text from the server is put into
// the page with textContent (never innerHTML), so slide ids, class and label names are
// shown as text whatever characters they hold.
"use strict";

const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;

const state = {
  cohort: null, tableKey: null, sort: { col: "slide_id", dir: 1 },
  slide: null,            // /api/slide answer of the open slide
  overlay: null,          // {key, img, kind}
  tiles: null,            // level-0 coords of the open slide's tiles (for the grid)
  selected: null,         // /api/slide/tile answer
  labels: [],             // rows of the label set
  labelColours: {},
};
window.viewerState = state;   // page state, read by the tests
window.viewerTiming = {};

// ---------------------------------------------------------------- helpers
function el(tag, text, attrs) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

async function api(url, options) {
  const r = await fetch(url, options);
  const type = r.headers.get("content-type") || "";
  const body = type.includes("json") ? await r.json() : await r.text();
  if (!r.ok) throw new Error((body && body.error) || (body && body.detail) || r.statusText);
  return body;
}

function sendJson(url, method, data) {
  return api(url, { method, headers: { "Content-Type": "application/json" }, body: JSON.stringify(data) });
}

function say(text) { $("status").textContent = text || ""; }
function fail(e) { say("error: " + (e && e.message ? e.message : e)); }
function fmt(v, digits) { return (v === null || v === undefined) ? "" : (typeof v === "number" ? v.toFixed(digits ?? 3) : String(v)); }

// ---------------------------------------------------------------- cohort
async function loadCohort() {
  const c = await api("api/cohort");
  state.cohort = c;
  $("out-path").textContent = c.out;
  const sel = $("table-select");
  sel.replaceChildren();
  for (const t of c.tables) sel.append(el("option", `${t.set} (${t.model})${t.missing ? " — no table" : ""}`, { value: t.key }));
  if (!c.tables.length) sel.append(el("option", "no score sets", { value: "" }));
  if (!state.tableKey || !c.tables.some((t) => t.key === state.tableKey)) state.tableKey = c.tables.length ? c.tables[0].key : null;
  sel.value = state.tableKey || "";
  if (c.label_sets && c.label_sets.length && !c.label_sets.includes($("label-set").value)) $("label-set").value = c.label_sets[0];
  renderCohort();
}

function currentTable() {
  return (state.cohort.tables || []).find((t) => t.key === state.tableKey) || null;
}

function cohortColumns(table) {
  const cols = [["slide_id", "Slide"], ["status", "Status"], ["n_tiles", "Tiles"], ["predicted", "Predicted"]];
  for (const c of (table ? table.classes : [])) cols.push([`slide_prob:${c}`, `P(${c})`]);
  return cols;
}

function cohortRows(table) {
  return state.cohort.slides.map((s) => {
    const t = table && table.rows[s.slide_id] ? table.rows[s.slide_id] : {};
    return { ...s, ...t, status: t.status || s.status, error: t.error || s.error, n_tiles: t.n_tiles ?? s.n_tiles };
  });
}

function renderCohort() {
  const table = currentTable();
  $("table-note").textContent = table && table.missing
    ? (table.error || `No cohort table for ${table.set} yet: run slide-clip summarize on this folder.`) : "";
  const cols = cohortColumns(table);
  const head = $("cohort-table").tHead.rows[0];
  head.replaceChildren();
  for (const [key, title] of cols) {
    const th = el("th", title, { "data-col": key });
    if (state.sort.col === key) th.className = state.sort.dir > 0 ? "sorted-asc" : "sorted-desc";
    th.addEventListener("click", () => {
      state.sort = { col: key, dir: state.sort.col === key ? -state.sort.dir : (key === "slide_id" ? 1 : -1) };
      renderCohort();
    });
    head.append(th);
  }
  const rows = cohortRows(table);
  const { col, dir } = state.sort;
  rows.sort((a, b) => {
    const x = a[col], y = b[col];
    if (x === y) return a.slide_id < b.slide_id ? -1 : 1;
    if (x === null || x === undefined) return 1;
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * dir;
  });
  const body = $("cohort-table").tBodies[0];
  body.replaceChildren();
  for (const r of rows) {
    const tr = el("tr", null, { "data-slide": r.slide_id });
    for (const [key] of cols) {
      const v = r[key];
      tr.append(el("td", typeof v === "number" && key !== "n_tiles" ? fmt(v) : (v ?? "")));
    }
    if (r.error) tr.title = r.error;
    if (!r.has_store) tr.className = "failed";
    else tr.addEventListener("click", () => openSlide(r.slide_id).catch(fail));
    if (state.slide && state.slide.slide_id === r.slide_id) tr.classList.add("current");
    body.append(tr);
  }
}

// ---------------------------------------------------------------- the slide
const viewer = OpenSeadragon({
  element: $("viewer"), prefixUrl: "osd/images/", showNavigator: true, navigatorPosition: "BOTTOM_RIGHT",
  maxZoomPixelRatio: 4, visibilityRatio: 0.5, animationTime: 0.6, immediateRender: true,
  gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true },
});
window.viewer = viewer;

async function openSlide(slideId, focus) {
  const t0 = performance.now();
  window.viewerTiming = { slide: slideId, start: t0, open: null, fullyLoaded: null };
  const info = await api(`api/slide?slide=${enc(slideId)}`);
  state.slide = info; state.tiles = null; state.selected = null; state.overlay = null;
  $("slide-title").textContent = info.slide_id;
  fillOverlayChoices(info, null);
  renderCohort();
  clearTile();
  setLabels(state.labels);   // this slide's labelled tiles and export link
  const opened = new Promise((resolve) => viewer.addOnceHandler("open", resolve));
  viewer.open({
    width: info.width, height: info.height, tileSize: 254, tileOverlap: 1, minLevel: 0,
    getTileUrl: (level, x, y) => `api/slide/dz/${level}/${x}_${y}.jpeg?slide=${enc(slideId)}`,
  });
  await opened;
  window.viewerTiming.open = performance.now() - t0;
  const item = viewer.world.getItemAt(0);
  const done = () => { if (window.viewerTiming.start === t0 && window.viewerTiming.fullyLoaded === null) window.viewerTiming.fullyLoaded = performance.now() - t0; };
  if (item.getFullyLoaded()) done(); else item.addOnceHandler("fully-loaded-change", done);
  if ($("grid-toggle").checked) await loadTiles();
  if (focus) {
    const [ex, ey] = info.extent;
    viewer.viewport.fitBounds(viewer.viewport.imageToViewportRectangle(focus.x - ex, focus.y - ey, 3 * ex, 3 * ey), true);
    await selectTile(focus.x + ex / 2, focus.y + ey / 2);
  }
  redraw();
}

function fillOverlayChoices(info, want) {
  const sel = $("overlay-select");
  sel.replaceChildren(el("option", "none", { value: "" }));
  for (const s of info.score_sets) {
    if (s.kind === "clusters") {
      sel.append(el("option", `${s.set}: clusters (${s.model})`, { value: JSON.stringify({ model: s.model, set: s.set, kind: s.kind }) }));
    } else {
      for (const c of s.classes) {
        sel.append(el("option", `${s.set}: P(${c}) (${s.model})`, { value: JSON.stringify({ model: s.model, set: s.set, kind: s.kind, cls: c }) }));
      }
    }
  }
  if (want) {
    const opt = Array.from(sel.options).find((o) => o.value && JSON.parse(o.value).set === want);
    if (opt) sel.value = opt.value;
  }
  return showOverlay();
}

async function showOverlay() {
  const v = $("overlay-select").value;
  $("legend").replaceChildren();
  $("colorbar-box").hidden = true;
  if (!v || !state.slide) { state.overlay = null; redraw(); return; }
  const o = JSON.parse(v);
  const slideId = state.slide.slide_id;
  let url = `api/slide/overlay.png?slide=${enc(slideId)}&model=${enc(o.model)}&set=${enc(o.set)}`;
  if (o.cls !== undefined) url += `&class=${enc(o.cls)}`;
  url += `&t=${Date.now()}`;
  const img = new Image();
  const loaded = new Promise((resolve, reject) => { img.onload = resolve; img.onerror = () => reject(new Error("overlay failed to load")); });
  img.src = url;
  await loaded;
  if (!state.slide || state.slide.slide_id !== slideId) return;
  state.overlay = { key: v, img, kind: o.kind, set: o.set, cls: o.cls };
  if (o.kind === "clusters") {
    const lg = await api(`api/slide/legend?slide=${enc(slideId)}&model=${enc(o.model)}&set=${enc(o.set)}`);
    for (const item of lg.legend) {
      const sw = el("span", null, { class: "swatch" });
      sw.style.background = item.colour;
      $("legend").append(sw, el("span", item.name));
    }
  } else {
    $("colorbar-box").hidden = false;
  }
  redraw();
}

async function loadTiles() {
  if (!state.slide || state.tiles) return;
  const sid = state.slide.slide_id;
  const t = await api(`api/slide/tiles?slide=${enc(sid)}`);
  if (state.slide && state.slide.slide_id === sid) state.tiles = t.coords;
}

// ---------------------------------------------------------------- drawing over the slide
function redraw() {
  const canvas = $("marks");
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
    canvas.width = Math.round(w * ratio); canvas.height = Math.round(h * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  if (!state.slide || !viewer.world.getItemCount()) return;
  const vp = viewer.viewport;
  const toScreen = (x, y) => vp.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
  if (state.overlay) {   // one small image per score set: a pixel per grid cell, drawn unsmoothed
    const o = state.slide.overlay;
    const a = toScreen(0, 0), b = toScreen(o.width, o.height);
    ctx.imageSmoothingEnabled = false;
    ctx.globalAlpha = parseFloat($("opacity").value);
    ctx.drawImage(state.overlay.img, a.x, a.y, b.x - a.x, b.y - a.y);
    ctx.globalAlpha = 1;
  }
  const [ex, ey] = state.slide.extent;
  const a0 = toScreen(0, 0), a1 = toScreen(ex, ey);
  const tw = a1.x - a0.x, th = a1.y - a0.y;
  if ($("grid-toggle").checked && state.tiles && tw >= 3) {
    ctx.strokeStyle = "rgba(255,255,255,0.8)"; ctx.lineWidth = 1;
    ctx.beginPath();
    for (const [x, y] of state.tiles) {
      const p = toScreen(x, y);
      if (p.x > w || p.y > h || p.x + tw < 0 || p.y + th < 0) continue;
      ctx.rect(p.x + 0.5, p.y + 0.5, tw - 1, th - 1);
    }
    ctx.stroke();
  }
  ctx.lineWidth = Math.max(2, Math.min(4, tw / 20));
  for (const r of state.labels) {
    if (r.slide_id !== state.slide.slide_id) continue;
    const p = toScreen(r.x, r.y);
    ctx.strokeStyle = state.labelColours[r.label] || "#ff0";
    ctx.strokeRect(p.x + 2, p.y + 2, tw - 4, th - 4);
  }
  if (state.selected && state.selected.row !== null) {
    const p = toScreen(state.selected.x, state.selected.y);
    ctx.lineWidth = 2; ctx.setLineDash([6, 4]); ctx.strokeStyle = "#fff";
    ctx.strokeRect(p.x, p.y, tw, th);
    ctx.setLineDash([]);
  }
}
window.redrawMarks = redraw;
viewer.addHandler("update-viewport", redraw);
viewer.addHandler("resize", redraw);
$("opacity").addEventListener("input", redraw);
$("overlay-select").addEventListener("change", () => showOverlay().catch(fail));
$("grid-toggle").addEventListener("change", () => loadTiles().then(redraw).catch(fail));

// ---------------------------------------------------------------- tiles: details, neighbours
function clearTile() {
  $("tile-info").replaceChildren(el("span", "Click a tile in the slide."));
  $("tile-img").hidden = true;
  $("neighbours").replaceChildren();
  $("more-like").disabled = true;
}

async function selectTile(x, y) {
  const sid = state.slide.slide_id;
  const d = await api(`api/slide/tile?slide=${enc(sid)}&x=${x}&y=${y}`);
  state.selected = d;
  redraw();
  if (d.row === null) { clearTile(); $("tile-info").textContent = "No stored tile here (no tissue)."; return d; }
  const t = el("table");
  const row = (k, v) => { const tr = el("tr"); tr.append(el("td", k), el("td", v)); t.append(tr); };
  row("slide", d.slide_id);
  row("tile", `row ${d.row}, grid (${d.grid[0]}, ${d.grid[1]})`);
  row("level-0 px", `x ${d.x}, y ${d.y} (${Math.round(d.extent[0])} × ${Math.round(d.extent[1])} px)`);
  if (d.um) row("µm", `x ${d.um.x.toFixed(1)}, y ${d.um.y.toFixed(1)} (${d.um.width.toFixed(1)} × ${d.um.height.toFixed(1)} µm)`);
  row("tissue", `${(100 * d.tissue_fraction).toFixed(0)} %`);
  for (const s of d.scores) {
    const parts = Object.entries(s.probs).map(([c, p]) => `${c} ${p.toFixed(3)}`);
    row(`${s.set}`, s.kind === "clusters" ? Object.entries(s.probs).find(([, p]) => p === 1)?.[0] ?? "" : parts.join(", "));
  }
  $("tile-info").replaceChildren(t);
  const img = $("tile-img");
  img.src = `api/slide/tile.png?slide=${enc(sid)}&row=${d.row}`;
  img.hidden = false;
  $("more-like").disabled = false;
  const near = await api(`api/search?slide=${enc(sid)}&x=${d.x}&y=${d.y}&top=7`);
  if (state.selected !== d) return d;
  const others = near.hits.filter((h) => !(h.slide_id === sid && h.tile === d.row)).slice(0, 6);
  fillHits($("neighbours"), others);
  return d;
}

function fillHits(list, hits) {
  list.replaceChildren();
  for (const h of hits) {
    const b = el("button", `${h.slide_id} (${h.x}, ${h.y})  ${h.score.toFixed(3)}`, { type: "button" });
    b.addEventListener("click", () => openSlide(h.slide_id, { x: h.x, y: h.y }).catch(fail));
    const li = el("li"); li.append(b); list.append(li);
  }
}

viewer.addHandler("canvas-click", (e) => {
  if (!e.quick || !state.slide) return;
  const p = viewer.viewport.viewerElementToImageCoordinates(e.position);
  const labelling = $("label-mode").checked;
  selectTile(p.x, p.y).then((d) => { if (labelling && d && d.row !== null) return toggleLabel(d); }).catch(fail);
});

$("more-like").addEventListener("click", () => {
  const d = state.selected;
  if (!d || d.row === null) return;
  runSearch(`api/search?slide=${enc(d.slide_id)}&x=${d.x}&y=${d.y}&top=20`, `tiles like ${d.slide_id} (${d.x}, ${d.y})`).catch(fail);
});

// ---------------------------------------------------------------- search
async function runSearch(url, what) {
  $("search-status").textContent = `searching ${what} …`;
  const r = await api(url);
  fillHits($("hits"), r.hits);
  $("search-status").textContent = `${r.hits.length} tiles most like ${what} (cosine)`;
}
$("search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("search-text").value.trim();
  if (text) runSearch(`api/search?text=${enc(text)}&top=20`, `“${text}”`).catch((err) => { $("search-status").textContent = ""; fail(err); });
});

// ---------------------------------------------------------------- labels
function labelSet() { return $("label-set").value.trim(); }

function setLabels(rows) {
  state.labels = rows;
  const names = Array.from(new Set(rows.map((r) => r.label))).sort();
  const palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  state.labelColours = Object.fromEntries(names.map((n, i) => [n, palette[i % palette.length]]));
  const list = $("label-list");
  list.replaceChildren();
  for (const r of rows) {
    const li = el("li", `${r.label} — ${r.slide_id} (${r.x}, ${r.y})`);
    li.style.borderLeft = `6px solid ${state.labelColours[r.label]}`;
    li.style.paddingLeft = "4px";
    const rm = el("button", "×", { type: "button", title: "remove" });
    rm.addEventListener("click", () => saveLabels(state.labels.filter((q) => q !== r)).catch(fail));
    li.append(rm);
    list.append(li);
  }
  const sid = state.slide ? state.slide.slide_id : null;
  $("export-geojson").href = sid ? `api/labels/${enc(labelSet())}/geojson?slide=${enc(sid)}` : "#";
  redraw();
}

async function loadLabels() {
  const r = await api(`api/labels/${enc(labelSet())}`);
  setLabels(r.rows);
}

async function saveLabels(rows) {
  const r = await sendJson(`api/labels/${enc(labelSet())}`, "PUT", { rows });
  setLabels(r.rows);
  $("label-status").textContent = `${r.rows.length} labelled tiles saved in labels/${labelSet()}.csv`;
}

function toggleLabel(d) {
  const label = $("label-name").value.trim();
  const same = (r) => r.slide_id === d.slide_id && r.x === d.x && r.y === d.y;
  const had = state.labels.find(same);
  const rest = state.labels.filter((r) => !same(r));
  const rows = had && had.label === label ? rest : [...rest, { slide_id: d.slide_id, x: d.x, y: d.y, label }];
  return saveLabels(rows);
}

$("rescore").addEventListener("click", async () => {
  $("label-status").textContent = "re-scoring the cohort from the stored embeddings …";
  try {
    const r = await sendJson(`api/labels/${enc(labelSet())}/rescore`, "POST", {});
    const ok = r.slides.filter((s) => s.status === "ok").length;
    $("label-status").textContent = `re-scored ${ok} of ${r.slides.length} slides into ${r.set}`;
    await loadCohort();
    if (state.slide) {
      const info = await api(`api/slide?slide=${enc(state.slide.slide_id)}`);
      state.slide = { ...state.slide, score_sets: info.score_sets };
      await fillOverlayChoices(info, r.set);
    }
    window.viewerTiming.rescored = r.set;
  } catch (e) { $("label-status").textContent = ""; fail(e); }
});

$("label-set").addEventListener("change", () => loadLabels().catch(fail));

$("import-geojson").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  if (!file || !state.slide) return;
  try {
    const doc = JSON.parse(await file.text());
    const r = await sendJson(`api/labels/${enc(labelSet())}/import?slide=${enc(state.slide.slide_id)}`, "POST", doc);
    setLabels(r.rows);
    $("label-status").textContent = `imported ${r.imported} tiles (${r.skipped_features} features without a class or polygon skipped)`;
  } catch (err) { fail(err); }
  e.target.value = "";
});

$("table-select").addEventListener("change", (e) => { state.tableKey = e.target.value; renderCohort(); });

// ---------------------------------------------------------------- start
// A link may open a view: #slide=ID&x=X&y=Y&set=SET&class=CLASS&opacity=0.6&grid=1&fit=slide (x, y: a tile's level-0 top-left).
async function openFromHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  if (!h.get("slide")) return;
  if (h.get("opacity")) $("opacity").value = h.get("opacity");
  if (h.get("grid") === "1") $("grid-toggle").checked = true;
  const x = parseFloat(h.get("x")), y = parseFloat(h.get("y"));
  const tile = Number.isFinite(x) && Number.isFinite(y) ? { x, y } : null;
  await openSlide(h.get("slide"), h.get("fit") === "slide" ? null : tile);   // fit=slide: whole slide, tile selected
  if (tile && h.get("fit") === "slide") await selectTile(x + state.slide.extent[0] / 2, y + state.slide.extent[1] / 2);
  if (h.get("set")) {
    const opt = Array.from($("overlay-select").options).find((o) => {
      if (!o.value) return false;
      const v = JSON.parse(o.value);
      return v.set === h.get("set") && (!h.get("class") || v.cls === h.get("class"));
    });
    if (opt) { $("overlay-select").value = opt.value; await showOverlay(); }
  }
}

loadCohort().then(loadLabels).then(openFromHash).then(() => { window.viewerReady = true; }).catch(fail);
