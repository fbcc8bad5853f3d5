// app.js - the dashboard: routes (#/datasets, #/train, #/jobs, #/jobs/<id>,
// #/adapters, #/playground[/<model>], #/system), the API key dialog, and the
// navigation. Every page talks only to the public /v1 API.
import { adaptersPage, playgroundPage } from './adapters.js';
import { api, getKey, setKey } from './api.js';
import { datasetsPage } from './datasets.js';
import { jobPage, jobsPage } from './jobs.js';
import { systemPage } from './system.js';
import { trainPage } from './train.js';
import { clear, errorBox } from './ui.js';

const view = document.getElementById('view');
const dialog = document.getElementById('key-dialog');

function go(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

const ROUTES = [
  [/^#\/datasets$/, () => datasetsPage(view)],
  [/^#\/train$/, () => trainPage(view, go)],
  [/^#\/jobs$/, () => jobsPage(view, go)],
  [/^#\/jobs\/([\w-]+)$/, (m) => jobPage(view, m[1])],
  [/^#\/adapters$/, () => adaptersPage(view)],
  [/^#\/playground(?:\/(.+))?$/, (m) => playgroundPage(view, m[1] && decodeURIComponent(m[1]))],
  [/^#\/system$/, () => systemPage(view)],
];

async function route() {
  const hash = location.hash || '#/datasets';
  clear(view);
  for (const a of document.querySelectorAll('nav a'))
    a.toggleAttribute('aria-current', hash.startsWith(a.getAttribute('href')));
  const hit = ROUTES.map(([re, fn]) => [re.exec(hash), fn]).find(([m]) => m);
  if (!hit) { go('#/datasets'); return; }
  try {
    await hit[1](hit[0]);
  } catch (e) {
    if (e.status === 401) askKey('That key was refused; enter the server\u2019s API key.');
    view.append(errorBox(e));
  }
  view.focus({ preventScroll: true });
}

function askKey(message) {
  const err = document.getElementById('key-error');
  err.hidden = !message;
  err.textContent = message || '';
  document.getElementById('key-input').value = getKey();
  if (!dialog.open) dialog.showModal();
}

document.getElementById('key-button').addEventListener('click', () => askKey(''));
document.getElementById('key-form').addEventListener('submit', async () => {
  setKey(document.getElementById('key-input').value.trim());
  try {
    await api('GET', '/v1/models');
  } catch (e) {
    if (e.status === 401) { setTimeout(() => askKey('That key was refused.'), 0); return; }
  }
  route();
});

window.addEventListener('hashchange', route);

// The first visit: check whether the server needs a key we do not have.
(async () => {
  try {
    await api('GET', '/v1/models');
  } catch (e) {
    if (e.status === 401) { askKey(getKey() ? 'That key was refused.' : ''); return; }
  }
  route();
})();
