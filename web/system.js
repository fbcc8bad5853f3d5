// system.js - the System page: what /metrics knows (model, queues, running
// sequences, throughput, latencies, memory), as a person wants to see it.
import { text } from './api.js';
import { h, clear, card, errorBox, fmtBytes, fmtDuration } from './ui.js';

// Prometheus text -> Map(name -> [{labels, value}]).
export function parseMetrics(body) {
  const out = new Map();
  for (const line of body.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][\w:]*)(\{([^}]*)\})?\s+(\S+)$/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const kv of (m[3] || '').match(/\w+="[^"]*"/g) || []) {
      const i = kv.indexOf('=');
      labels[kv.slice(0, i)] = kv.slice(i + 2, -1);
    }
    if (!out.has(m[1])) out.set(m[1], []);
    out.get(m[1]).push({ labels, value: Number(m[4]) });
  }
  return out;
}

const one = (m, name, labels) => {
  const rows = m.get(name) || [];
  const r = rows.find((x) => Object.entries(labels || {}).every(([k, v]) => x.labels[k] === v));
  return r ? r.value : null;
};

// Mean of a histogram (sum / count), in seconds.
const mean = (m, name) => {
  const s = one(m, name + '_sum'), c = one(m, name + '_count');
  return c ? s / c : null;
};

function tile(label, value, note) {
  return h('div', { class: 'tile' }, h('div', { class: 'tile-label' }, label), h('div', { class: 'tile-value' }, value),
    note ? h('div', { class: 'muted' }, note) : null);
}

// The device's time between serving steps and a training job, when the
// server has them take turns (--device-sched; on by default on a GPU): none
// of these metrics otherwise, and no card.
function deviceSharing(m, ms) {
  const steps = (w) => one(m, 'gf_device_serving_steps_total', { waited: w });
  if (steps('no') === null) return [];
  const busy = (u) => one(m, 'gf_device_busy_seconds_total', { user: u }) || 0;
  const held = busy('serving') + busy('training');
  const share = (u) => {
    const pct = held > 0 ? (100 * busy(u)) / held : null;
    return pct === null ? '—' : pct > 0 && pct < 1 ? '<1%' : `${Math.round(pct)}%`;
  };
  return [card('Device sharing', h('div', { class: 'tiles' },
    tile('Serving steps', String(steps('no') + steps('yes')), `${steps('yes')} waited for training`),
    tile('Longest serving wait', ms(one(m, 'gf_device_serving_wait_max_seconds')),
      `bound ${ms(one(m, 'gf_device_serving_wait_bound_seconds'))} + a layer of training`),
    tile('Training gave way', String(one(m, 'gf_device_training_yields_total') ?? 0), 'times, at layer boundaries'),
    tile('Longest training stretch', ms(one(m, 'gf_device_training_span_max_seconds')), 'between layer boundaries'),
    tile('Device time', `${share('serving')} serving`, `${fmtDuration(busy('serving'))} serving, ` +
      `${fmtDuration(busy('training'))} training`)))];
}

export function systemPage(view) {
  const box = h('div', { id: 'system', 'aria-live': 'polite' });
  view.append(h('h1', {}, 'System'), box);
  const render = async () => {
    let m;
    try { m = parseMetrics(await text('/metrics')); } catch (e) { clear(box).append(errorBox(e)); return; }
    const ms = (v) => (v === null ? '—' : `${(v * 1000).toFixed(1)} ms`);
    const jobs = (s) => one(m, 'gf_jobs', { status: s }) ?? 0;
    const devices = (m.get('gf_device_memory_total_bytes') || []).map((d) => tile(`Memory ${d.labels.device}`,
      fmtBytes(d.value), `${fmtBytes(one(m, 'gf_device_memory_free_bytes', d.labels) || 0)} free`));
    clear(box).append(
      card('Model', h('div', { class: 'tiles' }, tile('Base model', one(m, 'gf_model_loaded') ? 'loaded' : 'not loaded'),
        tile('Up for', fmtDuration(one(m, 'gf_uptime_seconds'))), ...devices)),
      card('Inference', h('div', { class: 'tiles' },
        tile('Waiting requests', String(one(m, 'gf_inference_queue_depth') ?? '—')),
        tile('Running sequences', String(one(m, 'gf_inference_running') ?? '—')),
        tile('Tokens/s', (one(m, 'gf_inference_tokens_per_second') ?? 0).toFixed(1)),
        tile('Time to first token', ms(mean(m, 'gf_time_to_first_token_seconds')), 'mean'),
        tile('Time per token', ms(mean(m, 'gf_time_per_output_token_seconds')), 'mean'),
        tile('Adapters in memory', String(one(m, 'gf_adapters_resident') ?? '—'),
          `${one(m, 'gf_adapter_loads_total') ?? 0} loads, ${one(m, 'gf_adapter_evictions_total') ?? 0} evictions`),
        tile('KV cache', `${one(m, 'gf_kv_blocks_used') ?? 0} / ${one(m, 'gf_kv_blocks_total') ?? 0}`, 'blocks in use'))),
      card('Fine-tuning', h('div', { class: 'tiles' }, tile('Queued jobs', String(jobs('queued'))), tile('Running', String(jobs('running'))),
        tile('Succeeded', String(jobs('succeeded'))), tile('Failed', String(jobs('failed'))), tile('Cancelled', String(jobs('cancelled'))),
        tile('Datasets', String(one(m, 'gf_datasets') ?? 0)), tile('Adapters', String(one(m, 'gf_adapters') ?? 0)))),
      ...deviceSharing(m, ms));
  };
  render();
  const timer = setInterval(() => (document.body.contains(box) ? render() : clearInterval(timer)), 3000);
}
