// The dask-rs dashboard: draws the updates the scheduler pushes on /status/events (one every
// half second). Nothing is fetched from anywhere else.
'use strict';

// Seconds of task stream shown, and records kept for it at most.
const WINDOW_S = 30;
const KEEP = 20000;

const view = {
  tasks: [],     // {w, th, start, stop, prefix, err, key}
  transfers: [], // {w, th, start, stop}
  now: 0,
  sampling: 1,   // the last update showed 1 task in `sampling`
  lanes: [],     // [{w, th, label}] as last drawn
  t0: 0,
  span: 1,
};

const $ = (id) => document.getElementById(id);

// A colour per task prefix: FNV-1a over its UTF-8 bytes, as in performance_report's pages.
const colours = new Map();
function colour(prefix) {
  let c = colours.get(prefix);
  if (c === undefined) {
    let h = 2166136261;
    for (const b of new TextEncoder().encode(prefix)) h = Math.imul(h ^ b, 16777619) >>> 0;
    c = `hsl(${h % 360}, 65%, 55%)`;
    colours.set(prefix, c);
  }
  return c;
}

function esc(s) {
  return String(s).replace(/[&<>"']/g, (ch) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[ch]));
}

function bytes(n) {
  if (!n) return '0 B';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  const i = Math.min(units.length - 1, Math.floor(Math.log(n) / Math.log(1024)));
  return `${(n / 1024 ** i).toFixed(i ? 1 : 0)} ${units[i]}`;
}

function pct(x) {
  return x === null || x === undefined ? '–' : `${(100 * x).toFixed(1)}%`;
}

function apply(u) {
  // A first message (also after a reconnection) carries the recent past: start over.
  if (u.hello) {
    view.tasks = [];
    view.transfers = [];
  }
  view.now = u.now;
  const s = u.stream;
  for (const t of s.tasks) {
    view.tasks.push({ w: s.workers[t[0]], th: t[1], start: t[2], stop: t[3], prefix: s.prefixes[t[4]], err: t[5] === 1, key: t[6] });
  }
  for (const x of s.transfers) view.transfers.push({ w: s.workers[x[0]], th: x[1], start: x[2], stop: x[3] });
  const cut = u.now - WINDOW_S;
  view.tasks = view.tasks.filter((t) => t.stop >= cut).slice(-KEEP);
  view.transfers = view.transfers.filter((t) => t.stop >= cut).slice(-KEEP);
  view.sampling = s.shown > 0 && s.added > s.shown ? s.added / s.shown : 1;
  header(u.scheduler);
  stream(u.workers);
  progress(u.prefixes);
  workers(u.workers);
}

function header(s) {
  $('address').textContent = s.address;
  $('n-workers').textContent = s.workers;
  $('n-threads').textContent = s.threads;
  $('n-tasks').textContent = s.tasks;
  $('n-clients').textContent = s.clients;
  $('load-busy').textContent = pct(s.busy);
  $('load-cpu').textContent = pct(s.cpu);
  $('load-wakeups').textContent = s.wakeups === null ? '–' : Math.round(s.wakeups);
  $('load-tick').textContent = `${(s.tick_max || 0).toFixed(2)} s`;
}

// One lane per worker thread: every thread of the workers there now, and any other that ran
// something still in the window; by worker, then thread.
function lanes(ws) {
  const names = new Map(ws.map((w) => [w.address, w.name]));
  const seen = new Map();
  const add = (w, th) => seen.set(`${w}\u0000${th}`, { w, th });
  for (const w of ws) for (let th = 0; th < w.nthreads; th++) add(w.address, th);
  for (const t of view.tasks) add(t.w, t.th);
  return [...seen.values()]
    .sort((a, b) => (a.w < b.w ? -1 : a.w > b.w ? 1 : a.th - b.th))
    .map((l) => ({ ...l, label: `${names.get(l.w) ?? l.w} · ${l.th}` }));
}

function stream(ws) {
  const canvas = $('stream');
  const dpr = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
  }
  const g = canvas.getContext('2d');
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, width, height);
  view.lanes = lanes(ws);
  const axis = 18, left = 120;
  const laneH = view.lanes.length ? Math.max(1, Math.min(22, (height - axis) / view.lanes.length)) : 0;
  const first = view.tasks.length ? Math.min(...view.tasks.map((t) => t.start)) : view.now;
  view.span = Math.max(2, Math.min(WINDOW_S, view.now - first));
  view.t0 = view.now - view.span;
  const x = (t) => left + ((t - view.t0) / view.span) * (width - left);
  const laneOf = new Map(view.lanes.map((l, i) => [`${l.w}\u0000${l.th}`, i]));

  g.font = '11px system-ui, sans-serif';
  g.textBaseline = 'middle';
  view.lanes.forEach((l, i) => {
    if (i % 2) { g.fillStyle = '#f9fafb'; g.fillRect(left, i * laneH, width - left, laneH); }
    if (laneH >= 10) { g.fillStyle = '#6b7280'; g.fillText(l.label, 2, i * laneH + laneH / 2, left - 6); }
  });
  const bar = (t, fill) => {
    const i = laneOf.get(`${t.w}\u0000${t.th}`);
    if (i === undefined) return;
    const x0 = Math.max(left, x(t.start)), x1 = x(t.stop);
    g.fillStyle = fill;
    g.fillRect(x0, i * laneH + 1, Math.max(1, x1 - x0), Math.max(1, laneH - 2));
  };
  for (const t of view.tasks) bar(t, t.err ? '#111827' : colour(t.prefix));
  for (const t of view.transfers) bar(t, 'rgba(220, 38, 38, 0.75)');

  // The time axis: seconds before now.
  g.fillStyle = '#6b7280';
  g.strokeStyle = '#e5e7eb';
  const step = view.span > 20 ? 5 : view.span > 8 ? 2 : 1;
  for (let s = 0; s <= view.span; s += step) {
    const px = x(view.now - s);
    g.beginPath(); g.moveTo(px, 0); g.lineTo(px, height - axis); g.stroke();
    g.fillText(s === 0 ? 'now' : `-${s}s`, Math.min(px - 8, width - 24), height - axis / 2);
  }
  canvas.dataset.tasks = String(view.tasks.length);
  canvas.dataset.lanes = String(view.lanes.length);

  const counts = new Map();
  for (const t of view.tasks) counts.set(t.prefix, (counts.get(t.prefix) || 0) + 1);
  $('stream-legend').innerHTML = [...counts.entries()]
    .sort((a, b) => b[1] - a[1])
    .map(([p, n]) => `<li style="--c:${colour(p)}" data-prefix="${esc(p)}" data-count="${n}">${esc(p)} <span class="dim">${n}</span></li>`)
    .join('') + (view.transfers.length ? `<li style="--c:rgba(220,38,38,0.75)" data-transfers="${view.transfers.length}">transfers <span class="dim">${view.transfers.length}</span></li>` : '');
  $('stream-note').textContent = view.sampling > 1.05
    ? `last ${Math.round(view.span)} s · busy: 1 task in ${view.sampling.toFixed(1)} shown`
    : `last ${Math.round(view.span)} s`;
}

function progress(prefixes) {
  const rows = prefixes.map((p) => {
    const waiting = p.waiting + p.queued + p.no_worker;
    const total = p.memory + p.processing + waiting + p.erred + p.released;
    const w = (n) => (total ? (100 * n) / total : 0).toFixed(2);
    const c = colour(p.name);
    return `<tr data-prefix="${esc(p.name)}" data-memory="${p.memory}" data-processing="${p.processing}" data-waiting="${waiting}" data-erred="${p.erred}" data-total="${total}">`
      + `<td><span style="color:${c}">&#9632;</span> ${esc(p.name)}</td>`
      + `<td><div class="bar"><span style="width:${w(p.memory)}%;background:${c}"></span><span class="processing" style="width:${w(p.processing)}%;background:${c}"></span><span class="waiting" style="width:${w(waiting)}%"></span><span class="erred" style="width:${w(p.erred)}%"></span></div></td>`
      + `<td>${p.memory} / ${total}</td><td>${p.processing}</td><td>${waiting}</td><td>${p.erred}</td></tr>`;
  });
  $('progress').querySelector('tbody').innerHTML = rows.join('');
  $('progress-empty').hidden = rows.length > 0;
}

function workers(ws) {
  // Bars on one scale: a worker's limit, or the largest worker when there is none.
  const largest = Math.max(1, ...ws.map((w) => w.managed + w.unmanaged + w.spilled));
  const rows = ws.map((w) => {
    const process = w.managed + w.unmanaged;
    const scale = Math.max(w.limit || largest, process + w.spilled, 1);
    const part = (n) => ((100 * n) / scale).toFixed(2);
    const name = w.dashboard ? `<a href="${esc(w.dashboard)}metrics">${esc(w.name)}</a>` : esc(w.name);
    const limit = w.limit ? ` / ${bytes(w.limit)}` : ' (no limit)';
    const spilled = w.spilled ? ` + ${bytes(w.spilled)} spilled` : '';
    return `<tr data-worker="${esc(w.address)}" data-status="${esc(w.status)}"><td>${name}</td><td>${esc(w.address)}</td><td>${w.nthreads}</td><td>${w.processing}</td><td>${w.in_memory}</td>`
      + `<td><div class="bar" title="managed ${bytes(w.managed)}, unmanaged ${bytes(w.unmanaged)}, spilled ${bytes(w.spilled)}"><span class="managed" style="width:${part(w.managed)}%"></span><span class="unmanaged" style="width:${part(w.unmanaged)}%"></span><span class="spilled" style="width:${part(w.spilled)}%"></span></div></td>`
      + `<td>${bytes(process)}${limit}${spilled}</td><td class="status-${esc(w.status)}">${esc(w.status)}</td></tr>`;
  });
  $('workers').querySelector('tbody').innerHTML = rows.join('');
  $('workers-empty').hidden = rows.length > 0;
}

// The task under the pointer, named in a tooltip.
$('stream').addEventListener('mousemove', (e) => {
  const tip = $('tooltip');
  const canvas = e.currentTarget;
  const r = canvas.getBoundingClientRect();
  const px = e.clientX - r.left, py = e.clientY - r.top;
  const left = 120, laneH = view.lanes.length ? Math.max(1, Math.min(22, (canvas.clientHeight - 18) / view.lanes.length)) : 0;
  const lane = view.lanes[Math.floor(py / laneH)];
  const t = lane && view.t0 + ((px - left) / (canvas.clientWidth - left)) * view.span;
  const hit = lane && view.tasks.find((k) => k.w === lane.w && k.th === lane.th && k.start <= t && t <= k.stop);
  if (!hit) { tip.hidden = true; return; }
  tip.textContent = `${hit.key} · ${((hit.stop - hit.start) * 1000).toFixed(1)} ms · ${lane.label}${hit.err ? ' · erred' : ''}`;
  tip.style.left = `${Math.min(px + 12, canvas.clientWidth - 200)}px`;
  tip.style.top = `${py + 12}px`;
  tip.hidden = false;
});
$('stream').addEventListener('mouseleave', () => { $('tooltip').hidden = true; });

function connect() {
  const source = new EventSource('/status/events');
  const pill = $('connection');
  source.onopen = () => { pill.textContent = 'live'; pill.className = 'pill on'; };
  source.onerror = () => { pill.textContent = 'disconnected: retrying'; pill.className = 'pill off'; };
  source.onmessage = (e) => apply(JSON.parse(e.data));
}
connect();
