// train.js - the Fine-tune page: the hyperparameters of PRODUCT.md with
// their defaults and ranges, checked as they are typed, and the memory
// estimate of the server's preflight before the job is queued.
import { api } from './api.js';
import { h, clear, card, errorBox, field, fmtBytes } from './ui.js';

// name, label, default, kind, min, max, hint
const PARAMS = [
  ['epochs', 'Epochs', 3, 'int', 1, 1000, 'Passes over the dataset.'],
  ['learning_rate', 'Learning rate', 5e-5, 'num', 1e-8, 1, 'AdamW step size at the top of the schedule.'],
  ['lr_scheduler', 'Schedule', 'cosine', ['cosine', 'linear', 'constant'], null, null, 'After the warmup.'],
  ['warmup_ratio', 'Warmup ratio', 0.03, 'num', 0, 1, 'Share of the steps spent warming up.'],
  ['batch_size', 'Batch size', 2, 'int', 1, 1024, 'Conversations per micro-batch.'],
  ['gradient_accumulation_steps', 'Gradient accumulation', 4, 'int', 1, 1024, 'Micro-batches per optimizer step.'],
  ['lora_rank', 'LoRA rank', 64, 'int', 1, 256, 'Rank of every adapter pair.'],
  ['lora_alpha', 'LoRA alpha', 64, 'num', 0.001, 100000, 'Scale = alpha / rank.'],
  ['lora_dropout', 'LoRA dropout', 0.05, 'num', 0, 0.9, 'Dropout on the adapters\u2019 input while training.'],
  ['target_modules', 'Target modules', 'all-linear', ['all-linear', 'q_proj,k_proj,v_proj,o_proj', 'q_proj,v_proj',
    'q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj'], null, null, 'all-linear includes the vision tower.'],
  ['quantization', 'Base weights', 'nf4', ['nf4', 'none'], null, null, 'nf4 = QLoRA (4-bit base, double quantization).'],
  ['max_seq_len', 'Max sequence length', 2048, 'int', 16, 131072, 'Tokens; at least the longest example of the dataset (the Datasets page shows it), or the job is refused naming the line.'],
  ['eval_every', 'Evaluate every', 0, 'int', 0, 1000000, 'Steps; 0 = at the end (with a validation set).'],
  ['save_every', 'Checkpoint every', 100, 'int', 1, 1000000, 'Steps.'],
  ['seed', 'Seed', 42, 'int', 0, 2147483647, 'Shuffling, initialization and dropout.'],
];

function input(p) {
  const [name, , def, kind, min, max] = p;
  if (Array.isArray(kind)) {
    return h('select', { name }, kind.map((c) => h('option', { value: c, selected: c === def }, c)));
  }
  return h('input', { name, type: 'number', value: def, min, max, step: kind === 'int' ? 1 : 'any', required: true,
    inputmode: kind === 'int' ? 'numeric' : 'decimal' });
}

// The hyperparameters of the form, or null with the bad fields marked.
function collect(form) {
  const out = {};
  let ok = true;
  for (const [name, label, , kind, min, max, hint] of PARAMS) {
    const el = form.elements[name], hintEl = el.parentElement.querySelector('.hint');
    let bad = '';
    if (Array.isArray(kind)) {
      out[name] = name === 'target_modules' && el.value !== 'all-linear' ? el.value.split(',') : el.value;
    } else {
      const v = Number(el.value);
      if (el.value === '' || !isFinite(v)) bad = `${label} must be a number`;
      else if (kind === 'int' && !Number.isInteger(v)) bad = `${label} must be a whole number`;
      else if (v < min || v > max) bad = `${label} must be between ${min} and ${max}`;
      out[name] = v;
    }
    el.setAttribute('aria-invalid', bad ? 'true' : 'false');
    hintEl.textContent = bad || hint;
    hintEl.classList.toggle('bad', !!bad);
    ok = ok && !bad;
  }
  return ok ? out : null;
}

function estimateView(e) {
  const m = e.memory_bytes;
  const row = (k, v) => h('tr', {}, h('th', { scope: 'row' }, k), h('td', {}, fmtBytes(v)));
  return h('div', { id: 'estimate' },
    h('table', { class: 'table compact' }, h('tbody', {},
      row('Base weights', m.base_weights), row('Adapter training state', m.adapter_training_state),
      row('Activations', m.activations), row('Vision tower', m.vision_tower),
      row('Backend scratch', m.backend_scratch),
      h('tr', { class: 'total' }, h('th', { scope: 'row' }, 'Total'), h('td', {}, fmtBytes(m.total))))),
    h('p', { class: 'muted' }, `${e.modules.length} adapted modules, ${e.trainable_parameters.toLocaleString()} trainable parameters.`),
    h('details', {}, h('summary', {}, 'Adapted modules'), h('ul', { class: 'modules' }, e.modules.map((n) => h('li', {}, h('code', {}, n))))));
}

export async function trainPage(view, go) {
  const ds = h('select', { name: 'dataset', required: true, id: 'ft-dataset' });
  const val = h('select', { name: 'validation', id: 'ft-validation' }, h('option', { value: '' }, '(none)'));
  const suffix = h('input', { name: 'suffix', type: 'text', maxlength: 40, pattern: '[a-z0-9][a-z0-9-]*', placeholder: 'pets',
    id: 'ft-suffix' });
  const est = h('div', { 'aria-live': 'polite' }, h('p', { class: 'muted' }, 'Estimating…'));
  const result = h('div', { 'aria-live': 'polite' });
  const params = PARAMS.map((p) => {
    const el = input(p);
    el.id = 'hp-' + p[0];
    return field(p[1], el, p[6]);
  });
  const form = h('form', { class: 'form grid', id: 'ft-form', novalidate: true },
    field('Dataset', ds, 'The conversations to learn from.'), field('Validation dataset', val, 'Optional; its loss is charted.'),
    field('Adapter name prefix', suffix, 'Lowercase letters, digits, dashes.'), params,
    h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary' }, 'Start fine-tuning')));
  view.append(h('h1', {}, 'Fine-tune'), h('div', { class: 'two' }, card('Job', form, result), card('Memory estimate', est)));
  try {
    const page = await api('GET', '/v1/datasets?limit=100');
    for (const d of page.data.filter((x) => x.status === 'ready')) {
      const label = `${d.name || d.id} (${d.examples} examples)`;
      ds.append(h('option', { value: d.id }, label));
      val.append(h('option', { value: d.id }, label));
    }
    if (!page.data.length) result.append(h('p', { class: 'muted' }, 'Upload a dataset first.'));
  } catch (e) { result.append(errorBox(e)); }
  let timer = null;
  const estimate = () => {
    clearTimeout(timer);
    timer = setTimeout(async () => {
      if (!document.body.contains(form)) return; // the page was left
      const hp = collect(form);
      if (!hp) return;
      try { const e = await api('POST', '/v1/fine_tuning/preflight', { hyperparameters: hp }); clear(est).append(estimateView(e)); }
      catch (e) { clear(est).append(errorBox(e)); }
    }, 250);
  };
  form.addEventListener('input', estimate);
  form.addEventListener('change', estimate);
  estimate();
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    clear(result);
    const hp = collect(form);
    if (!hp) { result.append(errorBox({ code: 'invalid_hyperparameter', message: 'fix the marked fields' })); return; }
    if (!ds.value) { result.append(errorBox({ code: 'missing_parameter', message: 'choose a dataset' })); return; }
    const body = { dataset: ds.value, hyperparameters: hp };
    if (val.value) body.validation_dataset = val.value;
    if (suffix.value) body.suffix = suffix.value;
    try {
      const job = await api('POST', '/v1/fine_tuning/jobs', body);
      go('#/jobs/' + job.id);
    } catch (e) {
      result.append(errorBox(e));
      const bad = e.param && form.elements[e.param.replace('hyperparameters.', '')];
      if (bad) { bad.setAttribute('aria-invalid', 'true'); bad.focus(); }
    }
  });
}
