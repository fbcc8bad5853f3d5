// ui.js - building DOM safely: every string becomes a text node or an
// attribute value, never HTML, so names, answers and log lines that hold
// markup show as text.

export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'value') el.value = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

export function fmtBytes(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let u = 0;
  while (n >= 1024 && u < units.length - 1) { n /= 1024; u++; }
  return `${n.toFixed(u ? 1 : 0)} ${units[u]}`;
}

export function fmtTime(unix) {
  return unix ? new Date(unix * 1000).toLocaleString() : '—';
}

export function fmtDuration(s) {
  if (s === null || s === undefined || !isFinite(s)) return '—';
  s = Math.round(s);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function fmtNumber(x, digits = 4) {
  return x === null || x === undefined ? '—' : Number(x).toPrecision(digits);
}

// An error box for an ApiError (with its per-line details when a dataset
// was refused).
export function errorBox(err) {
  const box = h('div', { class: 'error', role: 'alert' },
    h('strong', {}, err.code ? `${err.code}: ` : 'Error: '), err.message || String(err),
    err.param ? h('span', { class: 'muted' }, ` (${err.param})`) : null);
  return box;
}

export function statusBadge(status) {
  return h('span', { class: `badge badge-${status}` }, status.replace('_', ' '));
}

export function field(label, input, hint) {
  const id = input.id || `f-${Math.random().toString(36).slice(2)}`;
  input.id = id;
  const hintEl = h('small', { class: 'hint', id: id + '-hint' }, hint || '');
  input.setAttribute('aria-describedby', id + '-hint');
  return h('div', { class: 'field' }, h('label', { for: id }, label), input, hintEl);
}

export function card(title, ...children) {
  return h('section', { class: 'card' }, title ? h('h2', {}, title) : null, ...children);
}
