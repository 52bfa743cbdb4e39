// visearch console: plain JavaScript, no dependencies, talks to the console's /api (which calls the gateway).
"use strict";

const $ = (sel) => document.querySelector(sel);
const SVG = "http://www.w3.org/2000/svg";
let jobsTimer = null;
let selectedJob = null;
let lastQuery = null;  // the photo last searched: changing a setting searches it again

// ---- the API key: from #key=... once (then removed from the address bar), else the form ----------
function apiKey() {
  const m = location.hash.match(/key=([^&]+)/);
  if (m) {
    sessionStorage.setItem("visearch-key", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);  // ?catalog=... stays
  }
  return sessionStorage.getItem("visearch-key") || "";
}

function status(text, error = false) {
  const el = $("#status");
  el.textContent = text;
  el.className = error ? "error" : "";
}

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + apiKey() }, options.headers || {});
  const res = await fetch(path, Object.assign({}, options, { headers }));
  if (res.status === 401 || res.status === 403) {
    const body = await res.json().catch(() => ({}));
    if (res.status === 401) showKeyForm();
    throw new Error(body.error ? `${body.error.code}: ${body.error.message}` : res.statusText);
  }
  if (!res.ok) {
    const body = await res.json().catch(() => ({}));
    throw new Error(body.error ? `${body.error.code}: ${body.error.message}` : `${res.status} ${res.statusText}`);
  }
  return res;
}

function showKeyForm() {
  $("#key-form").hidden = false;
}

// ---- drawing boxes over an image: an SVG in the image's own pixel coordinates ---------------------
// Verified correspondences as small dots (one colour per correspondence, the same on both images).
function drawPoints(svg, points, cls) {
  svg.querySelectorAll("circle." + cls).forEach((c) => c.remove());
  points.forEach(([x, y], i) => {
    const c = document.createElementNS(SVG, "circle");
    c.setAttribute("class", cls);
    c.setAttribute("cx", x);
    c.setAttribute("cy", y);
    c.setAttribute("r", 3);
    c.setAttribute("style", `fill: hsl(${(i * 47) % 360} 90% 50%)`);
    c.setAttribute("vector-effect", "non-scaling-stroke");
    svg.appendChild(c);
  });
}

function drawBoxes(svg, width, height, boxes) {
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren();
  for (const [cls, b] of boxes) {
    if (!b) continue;
    const r = document.createElementNS(SVG, "rect");
    r.setAttribute("class", cls);
    r.setAttribute("x", b[0]);
    r.setAttribute("y", b[1]);
    r.setAttribute("width", Math.max(1, b[2] - b[0]));
    r.setAttribute("height", Math.max(1, b[3] - b[1]));
    svg.appendChild(r);
  }
}

// ---- search ------------------------------------------------------------------------------------------
async function loadCatalogs(sel = $("#catalog")) {
  const res = await api("/api/catalogs");
  const { catalogs } = await res.json();
  const keep = sel.value || new URLSearchParams(location.search).get("catalog");
  sel.replaceChildren(...catalogs.map((c) => new Option(`${c.name} (${c.objects})`, c.name)));
  if (keep && catalogs.some((c) => c.name === keep)) sel.value = keep;
  return catalogs;
}

async function search(blob) {
  const catalog = $("#catalog").value;
  if (!catalog) return status("No catalog to search: ingest one first.", true);
  lastQuery = blob;
  const url = URL.createObjectURL(blob);
  const img = $("#query-img");
  img.src = url;
  await img.decode().catch(() => {});
  $("#query").hidden = false;
  $("#query-svg").replaceChildren();
  $("#results").replaceChildren();
  $("#results-title").hidden = true;
  status("Searching…");
  const params = new URLSearchParams({ catalog, top_k: $("#top-k").value || "12" });
  if ($("#rerank").value) params.set("rerank", $("#rerank").value);
  if ($("#full-frame").checked) params.set("full_frame", "1");
  const t0 = performance.now();
  let answer;
  try {
    const res = await api("/api/search?" + params, { method: "POST", body: blob,
                                                    headers: { "Content-Type": "application/octet-stream" } });
    answer = await res.json();
  } catch (err) {
    return status(err.message, true);
  }
  const ms = Math.round(performance.now() - t0);
  drawBoxes($("#query-svg"), img.naturalWidth, img.naturalHeight, [["query", answer.query_box]]);
  $("#query-info").textContent = `searched box [${answer.query_box.map(Math.round).join(", ")}], ` +
    `model ${answer.model}, re-rank ${answer.rerank}, ${answer.hits.length} results in ${ms} ms`;
  $("#results-title").hidden = false;
  $("#results").replaceChildren(...answer.hits.map((h, i) => hitCard(catalog, h, i + 1)));
  const matched = answer.hits.filter((h) => h.match).length;
  if (answer.rerank === "verify") $("#query-info").textContent += `, ${matched} verified match${matched === 1 ? "" : "es"}`;
  // The best hit's correspondences on the query until another hit is pointed at.
  const first = answer.hits.find((h) => (h.correspondences || []).length);
  if (first) drawPoints($("#query-svg"), first.correspondences.map((p) => [p[0], p[1]]), "corr");
  status(answer.hits.length ? "" : "No results.");
}

function hitCard(catalog, hit, rank) {
  const card = document.createElement("article");
  card.className = hit.match ? "hit match" : "hit";
  card.dataset.itemId = hit.item_id;
  card.dataset.rank = rank;
  const frame = document.createElement("figure");
  frame.className = "frame";
  const img = document.createElement("img");
  img.alt = hit.item_id;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("preserveAspectRatio", "none");
  frame.append(img, svg);
  const title = document.createElement("div");
  title.innerHTML = `<span class="rank"></span> <span class="id"></span><span class="score"></span>`;
  title.querySelector(".rank").textContent = `${rank}.`;
  title.querySelector(".id").textContent = hit.item_id;
  title.querySelector(".score").textContent = hit.score.toFixed(3);
  if (hit.match) {
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = `match · ${hit.inliers} points`;
    badge.title = "the same object: local features verified under one geometric transform";
    title.append(" ", badge);
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = Object.entries(hit.metadata || {}).map(([k, v]) => `${k}: ${v}`).join(" · ");
  card.append(frame, title, meta);
  // The thumbnail (fetched with the key, shown as a blob: URL); boxes in the original image's pixels.
  api(`/api/image?${new URLSearchParams({ catalog, item: hit.item_id })}`).then(async (res) => {
    const w = +res.headers.get("X-Image-Width"), h = +res.headers.get("X-Image-Height");
    img.src = URL.createObjectURL(await res.blob());
    drawBoxes(svg, w, h, [["object", hit.box], ["region", hit.region]]);
    drawPoints(svg, (hit.correspondences || []).map((p) => [p[2], p[3]]), "corr");
  }).catch((err) => { meta.textContent += ` (no image: ${err.message})`; });
  card.addEventListener("mouseenter", () => {
    if ((hit.correspondences || []).length) drawPoints($("#query-svg"), hit.correspondences.map((p) => [p[0], p[1]]), "corr");
  });
  card.addEventListener("click", async () => {
    status(`Searching with ${hit.item_id}…`);
    try {
      const res = await api(`/api/image?${new URLSearchParams({ catalog, item: hit.item_id, max_side: "1024" })}`);
      await search(await res.blob());
    } catch (err) {
      status(err.message, true);
    }
  });
  return card;
}

function setupSearch() {
  const drop = $("#drop");
  $("#file").addEventListener("change", (e) => {
    const f = e.target.files[0];
    e.target.value = "";  // choosing the same file again searches again
    if (f) search(f);
  });
  for (const id of ["#catalog", "#rerank", "#full-frame", "#top-k"]) {
    $(id).addEventListener("change", () => lastQuery && search(lastQuery));
  }
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const f = e.dataTransfer.files[0];
    if (f) search(f);
  });
  loadCatalogs().then((cats) => status(cats.length ? "" : "No catalogs yet."))
    .catch((err) => status(err.message, true));
}

// ---- the catalog browser: a page of items at a time, delete, add ---------------------------------------
let pageTokens = [""];  // pageTokens[i]: the token that opens page i (from the page before it)
let pageIndex = 0;
let ingestTimer = null;

async function showPage(message = "") {
  const catalog = $("#browse-catalog").value;
  const grid = $("#items");
  if (!catalog) {
    grid.replaceChildren();
    $("#page-info").textContent = "";
    return status(message || "No catalogs yet: add photos below.");
  }
  const params = new URLSearchParams({ catalog, page_size: $("#page-size").value, page_token: pageTokens[pageIndex] });
  let page;
  try {
    page = await api("/api/items?" + params).then((r) => r.json());
  } catch (err) {
    return status(err.message, true);
  }
  grid.replaceChildren(...page.items.map((it) => itemCard(catalog, it)));
  pageTokens.length = pageIndex + 1;
  if (page.next_page_token) pageTokens.push(page.next_page_token);
  $("#prev-page").disabled = pageIndex === 0;
  $("#next-page").disabled = !page.next_page_token;
  const first = pageIndex * +$("#page-size").value + 1;
  $("#page-info").textContent = page.items.length
    ? `page ${pageIndex + 1}: items ${first}–${first + page.items.length - 1} (${page.total_items} objects in the catalog)`
    : "no items";
  grid.dataset.catalog = catalog;
  grid.dataset.page = String(pageIndex + 1);  // which page is shown, once it is
  if (message) status(message);
}

function itemCard(catalog, item) {
  const card = document.createElement("article");
  card.className = "item";
  card.dataset.itemId = item.item_id;
  const frame = document.createElement("figure");
  frame.className = "frame";
  const img = document.createElement("img");
  img.alt = item.item_id;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("preserveAspectRatio", "none");
  frame.append(img, svg);
  const del = document.createElement("button");
  del.type = "button";
  del.className = "delete";
  del.textContent = "Delete";
  del.title = `delete ${item.item_id} from ${catalog}`;
  const title = document.createElement("div");
  title.className = "id";
  title.textContent = item.item_id;
  const meta = document.createElement("div");
  meta.className = "meta";
  const n = item.objects.length;
  meta.textContent = [`${n} object${n === 1 ? "" : "s"}`,
                      ...Object.entries(item.metadata || {}).map(([k, v]) => `${k}: ${v}`)].join(" · ");
  card.append(frame, del, title, meta);
  api(`/api/image?${new URLSearchParams({ catalog, item: item.item_id })}`).then(async (res) => {
    const w = +res.headers.get("X-Image-Width"), h = +res.headers.get("X-Image-Height");
    img.src = URL.createObjectURL(await res.blob());
    drawBoxes(svg, w, h, item.objects.map((o) => ["object", o.box]));
  }).catch((err) => { meta.textContent += ` (no image: ${err.message})`; });
  del.addEventListener("click", async () => {
    if (!confirm(`Delete item ${item.item_id} from catalog ${catalog}? This cannot be undone.`)) return;
    try {
      await api(`/api/delete?${new URLSearchParams({ catalog })}`, {
        method: "POST", body: JSON.stringify({ item_ids: [item.item_id] }), headers: { "Content-Type": "application/json" } });
    } catch (err) {
      return status(`Not deleted: ${err.message}`, true);
    }
    await showPage(`Deleted ${item.item_id}.`);  // this page again: the next item moves up into it
  });
  return card;
}

function ingestCatalog() {
  const catalog = $("#ingest-catalog").value.trim();
  if (!catalog) status("Name the catalog to add to (a new name makes a new catalog).", true);
  return catalog;
}

// Photos go one a request (each within the upload limit), all into the job the first one started.
async function ingestPhotos(files) {
  const catalog = ingestCatalog();
  if (!catalog) return;
  const prefix = $("#ingest-prefix").value.trim();
  let jobId = "";
  for (const [i, f] of files.entries()) {
    const itemId = prefix + f.name.replace(/\.[^.]*$/, "");
    const params = new URLSearchParams({ catalog, item_id: itemId });
    if (jobId) params.set("job_id", jobId);
    status(`Uploading ${i + 1} of ${files.length}: ${f.name}…`);
    try {
      const res = await api("/api/ingest?" + params, { method: "POST", body: f,
                                                       headers: { "Content-Type": "application/octet-stream" } });
      jobId = (await res.json()).job_id;
    } catch (err) {
      status(`Not added: ${itemId}: ${err.message}` + (i ? ` (the ${i} before it are queued)` : ""), true);
      if (jobId) followJob(jobId, false);
      return;
    }
  }
  status(`${files.length} photo${files.length === 1 ? "" : "s"} queued into ${catalog}.`);
  followJob(jobId);
}

async function ingestCsv(file) {
  const catalog = ingestCatalog();
  if (!catalog) return;
  status(`Sending ${file.name}…`);
  try {
    const res = await api("/api/ingest?" + new URLSearchParams({ catalog }), {
      method: "POST", body: await file.text(), headers: { "Content-Type": "text/csv" } });
    const answer = await res.json();
    status(`${answer.accepted} items of ${file.name} queued into ${catalog}.`);
    followJob(answer.job_id);
  } catch (err) {
    status(`Not added: ${file.name}: ${err.message}`, true);
  }
}

function ingestDropped(files) {
  const list = [...files];
  const csvFile = list.find((f) => /\.csv$/i.test(f.name) || f.type === "text/csv");
  if (csvFile) return ingestCsv(csvFile);
  const photos = list.filter((f) => f.type.startsWith("image/") || /\.(jpe?g|png|webp|bmp|gif|tiff?)$/i.test(f.name));
  if (!photos.length) return status("Nothing to add: drop photos, or a CSV of paths.", true);
  return ingestPhotos(photos);
}

// The job's progress (the jobs page's bar), once a second until it is done; then the catalog it filled.
function followJob(jobId, clear = true) {
  const box = $("#ingest-progress");
  box.hidden = false;
  box.dataset.jobId = jobId;
  box.dataset.state = "running";
  $("#ingest-failures").replaceChildren();
  clearTimeout(ingestTimer);
  const tick = async () => {
    let job;
    try {
      job = await api(`/api/jobs/${jobId}`).then((r) => r.json());
    } catch (err) {
      status(err.message, true);
      ingestTimer = setTimeout(tick, 2000);
      return;
    }
    $("#ingest-bar").replaceChildren(...progressBar(job).childNodes);
    $("#ingest-text").textContent = `job ${job.job_id.slice(0, 12)} into ${job.catalog}: ${job.state}, ` +
      `${job.done} done, ${job.failed} failed, ${job.pending} pending`;
    $("#ingest-failures").replaceChildren(...job.failures.map((f) => {
      const li = document.createElement("li");
      li.textContent = `${f.item_id}: ${f.reason}`;
      return li;
    }));
    if (job.state !== "done") {
      ingestTimer = setTimeout(tick, 1000);
      return;
    }
    box.dataset.state = "done";
    // Show the catalog the job filled, from its first page (a new catalog joins the list).
    await loadCatalogs($("#browse-catalog")).catch(() => {});
    $("#browse-catalog").value = job.catalog;
    pageTokens = [""];
    pageIndex = 0;
    await showPage(clear ? `Added ${job.done} item${job.done === 1 ? "" : "s"} to ${job.catalog}` +
                           (job.failed ? `; ${job.failed} failed (listed below).` : ".") : "");
  };
  tick();
}

function setupCatalog() {
  const sel = $("#browse-catalog");
  const restart = () => { pageTokens = [""]; pageIndex = 0; showPage(); };
  sel.addEventListener("change", () => { $("#ingest-catalog").value = sel.value; restart(); });
  $("#page-size").addEventListener("change", restart);
  $("#next-page").addEventListener("click", () => {
    if (pageTokens.length > pageIndex + 1) { pageIndex += 1; showPage(); }
  });
  $("#prev-page").addEventListener("click", () => {
    if (pageIndex > 0) { pageIndex -= 1; showPage(); }
  });
  const drop = $("#ingest-drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    ingestDropped(e.dataTransfer.files);
  });
  $("#ingest-files").addEventListener("change", (e) => {
    const files = [...e.target.files];
    e.target.value = "";
    if (files.length) ingestPhotos(files);
  });
  $("#ingest-csv").addEventListener("change", (e) => {
    const f = e.target.files[0];
    e.target.value = "";
    if (f) ingestCsv(f);
  });
  loadCatalogs(sel).then(() => {
    $("#ingest-catalog").value = sel.value;
    return showPage();
  }).catch((err) => status(err.message, true));
}

// ---- catalogs and jobs ------------------------------------------------------------------------------------
function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function progressBar(job) {
  const bar = document.createElement("span");
  bar.className = "bar";
  const total = Math.max(1, job.submitted);
  const failed = document.createElement("span");
  failed.className = "failed";
  failed.style.width = `${(100 * job.failed) / total}%`;
  const done = document.createElement("span");
  done.style.width = `${(100 * job.done) / total}%`;
  bar.append(failed, done);
  const td = document.createElement("td");
  td.append(bar, ` ${job.done + job.failed}/${job.submitted}`);
  return td;
}

function jobState(job) {
  if (job.kind === "reembed") return job.phase || job.state;
  return job.state;
}

async function refreshJobs() {
  try {
    const [cats, jobs] = await Promise.all([api("/api/catalogs").then((r) => r.json()),
                                            api("/api/jobs?limit=30").then((r) => r.json())]);
    $("#catalogs-table tbody").replaceChildren(...cats.catalogs.map((c) => {
      const tr = document.createElement("tr");
      tr.dataset.catalog = c.name;
      tr.append(cell(c.name), cell(c.objects), cell(c.model), cell(c.generation),
                cell(c.building ? `generation ${c.building.generation}: ${c.building.objects} objects, ${c.building.model}` : "—"));
      return tr;
    }));
    $("#jobs-table tbody").replaceChildren(...jobs.jobs.map((j) => {
      const tr = document.createElement("tr");
      tr.dataset.jobId = j.job_id;
      tr.dataset.state = j.state;
      const st = jobState(j);
      tr.append(cell(j.job_id.slice(0, 12)), cell(j.catalog), cell(j.kind), cell(st, st === "failed" ? "state-failed" : (j.state === "done" ? "state-done" : "")),
                progressBar(j), cell(j.failed, j.failed ? "state-failed" : ""), cell(new Date(j.created_at * 1000).toLocaleTimeString()));
      tr.addEventListener("click", () => { selectedJob = j.job_id; refreshDetail(); });
      return tr;
    }));
    if (selectedJob) await refreshDetail();
    status(`${jobs.jobs.length} recent jobs · updated ${new Date().toLocaleTimeString()}`);
  } catch (err) {
    status(err.message, true);
  }
}

async function refreshDetail() {
  const job = await api(`/api/jobs/${selectedJob}`).then((r) => r.json());
  $("#job-detail").hidden = false;
  $("#job-detail-title").textContent = `Job ${job.job_id} (${job.kind}, ${job.catalog}): ${jobState(job)}, ` +
    `${job.done} done, ${job.failed} failed, ${job.pending} pending`;
  $("#job-detail-message").textContent = job.message || "";
  $("#failures-table tbody").replaceChildren(...job.failures.map((f) => {
    const tr = document.createElement("tr");
    tr.append(cell(f.item_id), cell(f.reason));
    return tr;
  }));
}

// ---- start ------------------------------------------------------------------------------------------------
function start() {
  const onJobs = location.pathname === "/jobs";
  const onCatalog = location.pathname === "/catalog";
  $("#nav-search").classList.toggle("active", !onJobs && !onCatalog);
  $("#nav-catalog").classList.toggle("active", onCatalog);
  $("#nav-jobs").classList.toggle("active", onJobs);
  $("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem("visearch-key", $("#key").value.trim());
    location.reload();
  });
  if (!apiKey()) {
    showKeyForm();
    return;
  }
  if (onCatalog) {
    $("#view-catalog").hidden = false;
    setupCatalog();
  } else if (onJobs) {
    $("#view-jobs").hidden = false;
    // The next refresh a second after the last one finished: never two at once.
    const loop = () => refreshJobs().finally(() => { jobsTimer = setTimeout(loop, 1000); });
    loop();
  } else {
    $("#view-search").hidden = false;
    setupSearch();
  }
}

document.addEventListener("DOMContentLoaded", start);
