// adapters.js - the Adapters page (trained and uploaded, download, delete)
// and the Playground: pick the base model or an adapter, attach an image,
// ask, read the answer as it streams; or ask two models side by side.
import { api, download, sse } from './api.js';
import { h, clear, card, errorBox, field, fmtBytes, fmtTime } from './ui.js';

export async function adaptersPage(view) {
  const list = h('div', {});
  view.append(h('h1', {}, 'Adapters'), card(null, list));
  const render = async () => {
    let page;
    try { page = await api('GET', '/v1/adapters?limit=100'); } catch (e) { clear(list).append(errorBox(e)); return; }
    clear(list);
    if (!page.data.length) { list.append(h('p', { class: 'muted' }, 'No adapters yet: fine-tune one, or upload a PEFT adapter with the API.')); return; }
    list.append(h('div', { class: 'scroll' }, h('table', { class: 'table', id: 'adapters-table' },
      h('thead', {}, h('tr', {}, ['name', 'source', 'rank', 'alpha', 'modules', 'vision', 'size', 'created', ''].map((c) => h('th', {}, c)))),
      h('tbody', {}, page.data.map((a) => h('tr', {},
        h('td', { class: 'name' }, a.id), h('td', {}, a.job ? h('a', { href: '#/jobs/' + a.job }, a.source) : a.source),
        h('td', {}, String(a.rank)), h('td', {}, String(a.alpha)), h('td', {}, String(a.modules)), h('td', {}, a.vision ? 'yes' : 'no'),
        h('td', {}, fmtBytes(a.bytes)), h('td', {}, fmtTime(a.created_at)),
        h('td', { class: 'row-actions' },
          h('a', { href: '#/playground/' + encodeURIComponent(a.id), class: 'button small' }, 'Try'),
          h('button', { class: 'small', 'aria-label': `Download adapter ${a.id}`,
            onclick: () => download(`/v1/adapters/${encodeURIComponent(a.id)}/download`, `${a.id}.tar`).catch((e) => list.prepend(errorBox(e))) }, 'Download'),
          h('button', { class: 'small danger', 'aria-label': `Delete adapter ${a.id}`, onclick: async () => {
            if (!confirm(`Delete adapter ${a.id}?`)) return;
            try { await api('DELETE', '/v1/adapters/' + encodeURIComponent(a.id)); render(); } catch (e) { list.prepend(errorBox(e)); }
          } }, 'Delete'))))))));
  };
  render();
}

// ---- playground -------------------------------------------------------------------

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

// Streams one chat completion into out; resolves to the text.
async function ask(model, content, settings, out, signal) {
  clear(out).append(h('p', { class: 'muted' }, 'waiting for the first token…'));
  let text = '', chunks = 0, finish = null, usage = null;
  const body = { model, messages: [{ role: 'user', content }], stream: true, stream_options: { include_usage: true },
    max_tokens: settings.max_tokens, temperature: settings.temperature };
  const answer = h('p', { class: 'answer', 'aria-live': 'polite' });
  for await (const ev of sse('/v1/chat/completions', { method: 'POST', body: JSON.stringify(body),
    headers: { 'Content-Type': 'application/json' } }, signal)) {
    if (ev.data === '[DONE]') break;
    if (ev.data.error) throw Object.assign(new Error(ev.data.error.message), { code: ev.data.error.code });
    if (ev.data.usage) usage = ev.data.usage;
    const c = ev.data.choices && ev.data.choices[0];
    if (!c) continue;
    if (c.delta && c.delta.content) {
      if (!chunks) clear(out).append(answer);
      text += c.delta.content;
      chunks++;
      answer.textContent = text;
      out.dataset.chunks = String(chunks);
    }
    if (c.finish_reason) finish = c.finish_reason;
  }
  if (!chunks) clear(out).append(answer);
  out.dataset.done = 'true';
  out.append(h('p', { class: 'muted' }, `finish: ${finish || '—'}` + (usage ? ` — ${usage.prompt_tokens} prompt + ${usage.completion_tokens} generated tokens` : '')));
  return text;
}

export async function playgroundPage(view, preset) {
  const models = (await api('GET', '/v1/models')).data;
  const pick = (id, selected) => h('select', { id }, models.map((m) => h('option', { value: m.id, selected: m.id === selected },
    m.parent ? `${m.id} (adapter)` : `${m.id} (base)`)));
  const base = models.find((m) => !m.parent);
  const modelA = pick('pg-model', preset || (base && base.id));
  const modelB = pick('pg-model-b', base && base.id);
  const compare = h('input', { type: 'checkbox', id: 'pg-compare' });
  const image = h('input', { type: 'file', accept: 'image/png,image/jpeg', id: 'pg-image' });
  const shown = h('div', { class: 'thumb-box' });
  const prompt = h('textarea', { id: 'pg-prompt', rows: 3, required: true, placeholder: 'What is in this picture?' });
  const maxTokens = h('input', { type: 'number', id: 'pg-max', min: 1, max: 4096, value: 64 });
  const temp = h('input', { type: 'number', id: 'pg-temp', min: 0, max: 2, step: 0.1, value: 0 });
  const outA = h('div', { class: 'out', id: 'pg-answer' }), outB = h('div', { class: 'out', id: 'pg-answer-b' });
  const colB = card('Second model', outB);
  colB.hidden = true;
  const bField = field('Second model', modelB, 'Asked the same question at the same time.');
  bField.hidden = true;
  compare.addEventListener('change', () => { colB.hidden = bField.hidden = !compare.checked; });
  image.addEventListener('change', () => {
    clear(shown);
    if (image.files[0]) shown.append(h('img', { src: URL.createObjectURL(image.files[0]), alt: 'the attached image', class: 'thumb' }));
  });
  const errs = h('div', {});
  let ctrl = null;
  const form = h('form', { class: 'form', id: 'pg-form' },
    field('Model', modelA, 'The base model or one of its adapters.'),
    h('div', { class: 'field inline' }, compare, h('label', { for: 'pg-compare' }, 'Compare with a second model')), bField,
    field('Image (optional)', image, 'PNG or JPEG, sent inside the request.'), shown,
    field('Question', prompt), h('div', { class: 'two tight' }, field('Max tokens', maxTokens), field('Temperature', temp, '0 = greedy')),
    h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary', id: 'pg-ask' }, 'Ask'),
      h('button', { type: 'button', onclick: () => ctrl && ctrl.abort() }, 'Stop')));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    clear(errs);
    if (!prompt.value.trim()) { errs.append(errorBox({ code: 'missing_parameter', message: 'write a question' })); return; }
    const content = [];
    if (image.files[0]) content.push({ type: 'image_url', image_url: { url: await readAsDataUrl(image.files[0]) } });
    content.push({ type: 'text', text: prompt.value });
    const settings = { max_tokens: Number(maxTokens.value) || 64, temperature: Number(temp.value) || 0 };
    ctrl = new AbortController();
    delete outA.dataset.done;
    delete outB.dataset.done;
    const runs = [ask(modelA.value, content, settings, outA, ctrl.signal)];
    if (compare.checked) runs.push(ask(modelB.value, content, settings, outB, ctrl.signal));
    const results = await Promise.allSettled(runs);
    for (const r of results) if (r.status === 'rejected' && r.reason.name !== 'AbortError') errs.append(errorBox(r.reason));
  });
  view.append(h('h1', {}, 'Playground'), h('div', { class: 'two' }, card('Ask', form, errs),
    h('div', {}, card('Answer', outA), colB)));
}
