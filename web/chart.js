// chart.js - the loss chart: training and validation loss against step, as
// SVG (no library: two series and their axes are a few lines of geometry).

const NS = 'http://www.w3.org/2000/svg';

function s(tag, attrs, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function ticks(lo, hi, n) {
  const span = hi - lo || 1, raw = span / n, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((v) => v >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-12; v += step) out.push(+v.toPrecision(6));
  return out;
}

// train: [{step, loss}], evals: [{step, eval_loss}], total: planned steps.
export function lossChart(train, evals, total) {
  const W = 640, H = 280, L = 52, R = 16, T = 16, B = 36;
  const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, class: 'chart', role: 'img',
    'aria-label': `Loss against step: ${train.length} training points, ${evals.length} validation points` });
  const all = train.map((p) => p.loss).concat(evals.map((p) => p.eval_loss)).filter(isFinite);
  const maxStep = Math.max(total || 1, ...train.map((p) => p.step), ...evals.map((p) => p.step), 1);
  const lo = all.length ? Math.min(...all) : 0, hi = all.length ? Math.max(...all) : 1;
  const pad = (hi - lo) * 0.05 || 0.5, y0 = Math.max(0, lo - pad), y1 = hi + pad;
  const x = (v) => L + (v / maxStep) * (W - L - R), y = (v) => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
  for (const v of ticks(y0, y1, 5)) {
    svg.append(s('line', { x1: L, x2: W - R, y1: y(v), y2: y(v), class: 'grid' }));
    svg.append(s('text', { x: L - 6, y: y(v) + 4, 'text-anchor': 'end', class: 'tick' }, String(v)));
  }
  for (const v of ticks(0, maxStep, 6)) {
    if (v !== Math.round(v)) continue;
    svg.append(s('text', { x: x(v), y: H - B + 18, 'text-anchor': 'middle', class: 'tick' }, String(v)));
  }
  svg.append(s('text', { x: (L + W - R) / 2, y: H - 4, 'text-anchor': 'middle', class: 'axis-label' }, 'step'));
  const line = (pts, key, cls) => {
    if (!pts.length) return;
    const d = pts.map((p) => `${x(p.step).toFixed(1)},${y(p[key]).toFixed(1)}`).join(' ');
    svg.append(s('polyline', { points: d, class: cls }));
    if (pts.length < 40) for (const p of pts) svg.append(s('circle', { cx: x(p.step), cy: y(p[key]), r: 2.5, class: cls }));
  };
  line(train, 'loss', 'series-train');
  line(evals, 'eval_loss', 'series-eval');
  const legend = s('g', { class: 'legend' });
  legend.append(s('rect', { x: W - R - 150, y: T, width: 10, height: 10, class: 'series-train-fill' }));
  legend.append(s('text', { x: W - R - 135, y: T + 9 }, 'training loss'));
  legend.append(s('rect', { x: W - R - 150, y: T + 16, width: 10, height: 10, class: 'series-eval-fill' }));
  legend.append(s('text', { x: W - R - 135, y: T + 25 }, 'validation loss'));
  svg.append(legend);
  return svg;
}
