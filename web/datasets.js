// datasets.js - the Datasets page: upload (JSONL + optional tar of images)
// with progress, the validation report of a refused upload, a preview of
// the first conversations with their images and the trained (assistant)
// text marked, the list, delete.
import { api, upload } from './api.js';
import { h, clear, card, errorBox, field, fmtBytes, fmtTime, statusBadge } from './ui.js';

// ---- preview: the chosen files, read in the browser ------------------------

// Regular files of a ustar/pax tar: name -> Uint8Array.
function untar(buf) {
  const bytes = new Uint8Array(buf), out = new Map(), dec = new TextDecoder();
  let pos = 0, paxName = null;
  while (pos + 512 <= bytes.length) {
    const hdr = bytes.subarray(pos, pos + 512);
    if (hdr.every((b) => b === 0)) break;
    const str = (a, n) => dec.decode(hdr.subarray(a, a + n)).replace(/\0.*$/s, '');
    const size = parseInt(str(124, 12).trim() || '0', 8), type = String.fromCharCode(hdr[156] || 48);
    const prefix = str(345, 155), name = paxName || (prefix ? prefix + '/' : '') + str(0, 100);
    const data = bytes.subarray(pos + 512, pos + 512 + size);
    paxName = null;
    if (type === 'x') {
      const m = /\d+ path=([^\n]*)\n/.exec(dec.decode(data));
      if (m) paxName = m[1];
    } else if (type === '0' || type === '\0') {
      out.set(name, data);
    }
    pos += 512 + Math.ceil(size / 512) * 512;
  }
  return out;
}

function imageUrl(part, images) {
  const ref = part.type === 'image' ? part.image : part.image_url && (part.image_url.url || part.image_url);
  if (typeof ref !== 'string') return null;
  if (ref.startsWith('data:image/png;base64,') || ref.startsWith('data:image/jpeg;base64,')) return ref;
  const bytes = images.get(ref);
  if (!bytes) return null;
  const png = bytes[0] === 0x89 && bytes[1] === 0x50;
  return URL.createObjectURL(new Blob([bytes], { type: png ? 'image/png' : 'image/jpeg' }));
}

function turn(msg, images) {
  const parts = typeof msg.content === 'string' ? [{ type: 'text', text: msg.content }] : msg.content || [];
  const trained = msg.role === 'assistant';
  return h('div', { class: `turn turn-${msg.role}` },
    h('div', { class: 'role' }, msg.role, trained ? h('span', { class: 'trained-tag' }, ' trained') : null),
    parts.map((p) => {
      if (p.type === 'text') return trained ? h('mark', { class: 'trained' }, p.text) : h('p', {}, p.text);
      const url = imageUrl(p, images);
      return url ? h('img', { src: url, alt: 'image of this turn', class: 'thumb' })
                 : h('p', { class: 'muted' }, '[image not found in the tar]');
    }));
}

// Previews run as the files are picked and read them asynchronously: only
// the latest pick renders (an earlier one still reading, e.g. the tar picked
// while the previous JSONL was still chosen, is dropped, never appended).
async function preview(fileInput, tarInput, out) {
  const gen = (out.previewGen = (out.previewGen || 0) + 1);
  const file = fileInput.files[0], tarFile = tarInput.files[0];
  let images = new Map(), text = '';
  if (file) {
    if (tarFile) images = untar(await tarFile.arrayBuffer());
    text = await file.slice(0, 4 << 20).text();
  }
  if (out.previewGen !== gen) return;
  clear(out);
  if (!file) return;
  const lines = text.split('\n').filter((l) => l.trim()).slice(0, 3);
  out.append(h('h3', {}, 'Preview of the first conversations'),
    h('p', { class: 'muted' }, 'Highlighted text is what the model is trained to write.'));
  lines.forEach((line, i) => {
    try {
      const ex = JSON.parse(line);
      out.append(h('div', { class: 'example' }, h('div', { class: 'muted' }, `example ${i + 1}`),
        (ex.messages || []).map((m) => turn(m, images))));
    } catch (_) {
      out.append(h('p', { class: 'muted' }, `line ${i + 1} is not JSON (the server will report it)`));
    }
  });
}

// ---- the report of a refused upload -----------------------------------------

function report(err) {
  const rows = (err.details || []).map((d) => h('tr', {}, h('td', {}, String(d.line)), h('td', {}, h('code', {}, d.code)),
    h('td', {}, d.message)));
  return h('div', { class: 'report', role: 'alert' }, errorBox(err),
    rows.length ? h('table', { class: 'table' }, h('caption', {}, `${rows.length} bad line(s); nothing was stored`),
      h('thead', {}, h('tr', {}, h('th', {}, 'line'), h('th', {}, 'code'), h('th', {}, 'reason'))), h('tbody', {}, rows))
      : null);
}

// ---- page -------------------------------------------------------------------

async function listInto(el) {
  clear(el);
  let page;
  try { page = await api('GET', '/v1/datasets?limit=100'); } catch (e) { el.append(errorBox(e)); return; }
  if (!page.data.length) { el.append(h('p', { class: 'muted' }, 'No datasets yet.')); return; }
  const rows = page.data.map((d) => h('tr', {},
    h('td', { class: 'name' }, d.name || d.id), h('td', {}, String(d.examples ?? '—')), h('td', {}, String(d.images ?? 0)),
    h('td', { title: d.tokens ? `measured for ${d.tokens.model}; ${d.tokens.total} tokens in all` : 'not measured (no model was loaded at upload)' },
      d.tokens ? `${d.tokens.longest} (line ${d.tokens.longest_line})` : '—'),
    h('td', {}, statusBadge(d.status)), h('td', {}, fmtBytes(d.bytes || 0)), h('td', {}, fmtTime(d.created_at)),
    h('td', {}, h('button', { class: 'danger small', 'aria-label': `Delete dataset ${d.name || d.id}`,
      onclick: async () => {
        if (!confirm(`Delete dataset ${d.name || d.id}?`)) return;
        try { await api('DELETE', '/v1/datasets/' + d.id); listInto(el); } catch (e) { el.prepend(errorBox(e)); }
      } }, 'Delete'))));
  el.append(h('div', { class: 'scroll' }, h('table', { class: 'table', id: 'datasets-table' },
    h('thead', {}, h('tr', {}, ['name', 'examples', 'images', 'longest (tokens)', 'status', 'size', 'created', ''].map((c) => h('th', {}, c)))),
    h('tbody', {}, rows))));
}

export function datasetsPage(view) {
  const name = h('input', { type: 'text', maxlength: 200, placeholder: 'pets-v1', id: 'ds-name' });
  const file = h('input', { type: 'file', accept: '.jsonl,application/jsonl,application/json', required: true, id: 'ds-file' });
  const tar = h('input', { type: 'file', accept: '.tar,application/x-tar', id: 'ds-images' });
  const bar = h('progress', { max: 1, value: 0, hidden: true, 'aria-label': 'Upload progress' });
  const result = h('div', { id: 'ds-result', 'aria-live': 'polite' });
  const prev = h('div', { id: 'ds-preview' });
  const list = h('div', {});
  const form = h('form', { class: 'form', id: 'ds-form' },
    field('Name', name, 'Shown in lists; any text.'),
    field('Conversations (JSONL)', file, 'One {"messages": [...]} per line.'),
    field('Images (tar, optional)', tar, 'The files the conversations name.'),
    h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary' }, 'Upload and validate')), bar);
  const onPick = () => preview(file, tar, prev);
  file.addEventListener('change', onPick);
  tar.addEventListener('change', onPick);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    clear(result);
    if (!file.files[0]) { result.append(errorBox({ code: 'missing_parameter', message: 'choose a JSONL file' })); return; }
    const fd = new FormData();
    fd.append('file', file.files[0]);
    if (tar.files[0]) fd.append('images', tar.files[0]);
    if (name.value) fd.append('name', name.value);
    bar.hidden = false;
    bar.value = 0;
    try {
      const d = await upload('/v1/datasets', fd, (f) => { bar.value = f; });
      result.append(h('p', { class: 'ok' }, `Stored: ${d.examples} examples, ${d.images || 0} images — `, h('span', { class: 'name' }, d.name || d.id)));
      listInto(list);
    } catch (e) {
      result.append(report(e));
    } finally {
      bar.hidden = true;
    }
  });
  view.append(h('h1', {}, 'Datasets'), card('Upload a dataset', form, result, prev), card('Stored datasets', list));
  listInto(list);
}
