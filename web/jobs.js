// jobs.js - the Jobs pages: the list (status, progress, ETA) and one job:
// live loss chart fed by the job's event stream (server-sent events, falling
// back to polling ?after= when the stream cannot be held), tokens/s, the
// event log, checkpoints, cancel, and a failed job's error in words.
import { api, sse } from './api.js';
import { lossChart } from './chart.js';
import { h, append, clear, card, errorBox, fmtDuration, fmtNumber, fmtTime, statusBadge } from './ui.js';

const OVER = new Set(['succeeded', 'failed', 'cancelled']);

function progressBar(j) {
  const p = j.progress || {}, total = p.total_steps || 0, step = p.step || 0;
  return h('progress', { max: total || 1, value: total ? step : 0, 'aria-label': `Progress of ${j.id}: step ${step} of ${total || '?'}` });
}

export async function jobsPage(view, go) {
  const list = h('div', { 'aria-live': 'polite' });
  view.append(h('h1', {}, 'Jobs'), card(null, list));
  const render = async () => {
    let page;
    try { page = await api('GET', '/v1/fine_tuning/jobs?limit=100'); } catch (e) { clear(list).append(errorBox(e)); return; }
    clear(list);
    if (!page.data.length) { list.append(h('p', { class: 'muted' }, 'No jobs yet. Start one from Fine-tune.')); return; }
    list.append(h('div', { class: 'scroll' }, h('table', { class: 'table', id: 'jobs-table' },
      h('thead', {}, h('tr', {}, ['job', 'status', 'progress', 'loss', 'ETA', 'adapter', 'created'].map((c) => h('th', {}, c)))),
      h('tbody', {}, page.data.map((j) => h('tr', {},
        h('td', {}, h('a', { href: '#/jobs/' + j.id }, j.id)), h('td', {}, statusBadge(j.status)),
        h('td', {}, progressBar(j), ' ', `${j.progress.step ?? 0}/${j.progress.total_steps ?? '?'}`),
        h('td', {}, fmtNumber(j.progress.loss)), h('td', {}, OVER.has(j.status) ? '—' : fmtDuration(j.progress.eta_s)),
        h('td', { class: 'name' }, j.adapter || '—'), h('td', {}, fmtTime(j.created_at))))))));
  };
  await render();
  const timer = setInterval(() => (document.body.contains(list) ? render() : clearInterval(timer)), 2000);
}

// ---- one job ------------------------------------------------------------------

function logLine(e) {
  return h('li', { class: `log-${e.level}` }, h('time', {}, new Date(e.created_at * 1000).toLocaleTimeString()), ' ',
    h('span', { class: 'muted' }, e.type), ' ', e.message);
}

export async function jobPage(view, id) {
  const head = h('div', { class: 'job-head' }), chartBox = h('div', { class: 'chart-box', id: 'loss-chart' });
  const stats = h('dl', { class: 'stats' }), log = h('ol', { class: 'log', id: 'job-log', 'aria-live': 'polite' });
  const ckpts = h('div', {}), errBox = h('div', {});
  view.append(h('p', {}, h('a', { href: '#/jobs' }, '← all jobs')), head, errBox,
    h('div', { class: 'two' }, card('Loss', chartBox), card('Progress', stats)), card('Checkpoints', ckpts), card('Events', log));
  const train = [], evals = [];
  let job = null, after = 0, stopped = false;
  const ctrl = new AbortController();

  const drawChart = () => clear(chartBox).append(train.length || evals.length ? lossChart(train, evals, job && job.progress.total_steps)
    : h('p', { class: 'muted' }, 'The chart fills in as steps complete.'));
  const drawJob = () => {
    const p = job.progress;
    append(clear(head), [h('h1', {}, 'Job ', h('span', { class: 'name' }, job.id), ' ', statusBadge(job.status)),
      !OVER.has(job.status) ? h('button', { class: 'danger', id: 'cancel-job', onclick: async () => {
        try { job = await api('POST', `/v1/fine_tuning/jobs/${id}/cancel`); drawJob(); } catch (e) { errBox.append(errorBox(e)); }
      } }, 'Cancel') : null,
      job.adapter ? h('p', {}, 'Adapter: ', h('a', { href: '#/playground/' + encodeURIComponent(job.adapter), class: 'name' }, job.adapter),
        ' — try it in the playground') : null]);
    clear(errBox);
    if (job.error) errBox.append(h('div', { class: 'error', role: 'alert' }, h('strong', {}, 'The job failed: '), job.error.message,
      h('span', { class: 'muted' }, ` (${job.error.code})`)));
    else if (job.status_reason) errBox.append(h('div', { class: 'notice', role: 'status', id: 'status-reason' }, job.status_reason));
    const item = (k, v) => [h('dt', {}, k), h('dd', {}, v)];
    clear(stats).append(...item('Step', `${p.step ?? 0} of ${p.total_steps ?? '?'}`), ...item('Epoch', fmtNumber(p.epoch, 3)),
      ...item('Loss', fmtNumber(p.loss)), ...item('Validation loss', fmtNumber(p.eval_loss)),
      ...item('Tokens/s', p.tokens_per_s ? p.tokens_per_s.toFixed(1) : '—'),
      ...item('ETA', OVER.has(job.status) ? '—' : fmtDuration(p.eta_s)), ...item('Started', fmtTime(job.started_at)),
      ...item('Finished', fmtTime(job.finished_at)));
    stats.prepend(h('div', { class: 'wide' }, progressBar(job)));
  };
  const onEvent = (e) => {
    after = Math.max(after, e.seq);
    // the log follows the newest event unless the reader scrolled up
    const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
    log.append(logLine(e));
    if (atEnd) log.scrollTop = log.scrollHeight;
    const d = e.data || {};
    if (e.type === 'metrics' && d.loss !== undefined) train.push({ step: d.step, loss: d.loss });
    if (e.type === 'metrics' && d.eval_loss !== undefined) evals.push({ step: d.step, eval_loss: d.eval_loss });
  };
  const refresh = async () => {
    job = await api('GET', '/v1/fine_tuning/jobs/' + id);
    drawJob();
    drawChart();
    const c = await api('GET', `/v1/fine_tuning/jobs/${id}/checkpoints`);
    clear(ckpts).append(c.data.length ? h('ul', {}, c.data.map((k) => h('li', {}, `step ${k.step_number} — ${fmtTime(k.created_at)}`,
      (k.metrics.train_loss ?? k.metrics.loss) !== undefined ? ` — loss ${fmtNumber(k.metrics.train_loss ?? k.metrics.loss)}` : '')))
      : h('p', { class: 'muted' }, 'None yet.'));
  };
  const poll = async () => {
    while (!stopped && document.body.contains(log)) {
      const page = await api('GET', `/v1/fine_tuning/jobs/${id}/events?after=${after}&limit=100`);
      page.data.forEach(onEvent);
      await refresh();
      if (OVER.has(job.status) && !page.has_more) return;
      await new Promise((r) => setTimeout(r, 1500));
    }
  };
  const follow = async () => {
    let last = 0;
    for await (const ev of sse(`/v1/fine_tuning/jobs/${id}/events?after=${after}`, {}, ctrl.signal)) {
      if (!document.body.contains(log)) { ctrl.abort(); return; }
      if (ev.event === 'end') break;
      onEvent(ev.data);
      if (Date.now() - last > 500) { last = Date.now(); await refresh(); }
    }
    await refresh();
  };
  try {
    await refresh();
    view.dataset.mode = 'stream';
    await follow();
  } catch (e) {
    if (e.name === 'AbortError') return;
    view.dataset.mode = 'poll'; // the stream could not be held: poll instead
    try { await poll(); } catch (e2) { errBox.append(errorBox(e2)); }
  } finally {
    stopped = true;
  }
}
