// test_dashboard.mjs - the dashboard in a real browser (Debian's chromium,
// driven by playwright-core): enter the key, upload a bad dataset and read
// its validation report, upload a good one whose name is an HTML payload
// (shown as text, never run), preview it, start a fine-tune on the tiny
// model, watch it reach `succeeded` with the loss chart drawn, ask the
// trained adapter about a picture in the playground and read the streamed
// answer, compare two models, and look at the system page. Screenshots of
// every page at desktop and phone width, light and dark, go to
// tests/browser/artifacts/ (not committed).
//
// usage: node tests/browser/test_dashboard.mjs PATH/TO/gemmaforge
// Exit 77 (skipped) only when /usr/bin/chromium is missing.
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '..', '..');
const BIN = process.argv[2];
const KEY = 'browser-test-key-0123456789';

// Waits for the job page's success badge as long as the job makes progress
// (its step or status changes within any 5 minutes): a slow or busy
// machine (ASan on two cores beside other suites) trains slower, never wrongly.
async function untilDone(page, job) {
  let seen = null, since = Date.now();
  for (;;) {
    try {
      await page.locator('.job-head .badge-succeeded').waitFor({ timeout: 30000 });
      return;
    } catch (e) {
      if (!String(e).includes('Timeout')) throw e;
    }
    const j = await page.evaluate(async ([id, key]) => {
      const r = await fetch('/v1/fine_tuning/jobs/' + id, { headers: { Authorization: 'Bearer ' + key } });
      return r.json();
    }, [job, KEY]);
    if (['failed', 'cancelled'].includes(j.status)) throw new Error(`the job ended ${j.status}: ${JSON.stringify(j.error)}`);
    const now = `${j.status} ${j.progress && j.progress.step}`;
    if (now !== seen) { seen = now; since = Date.now(); }
    else if (Date.now() - since > 300000) throw new Error(`the job made no progress for 5 minutes (${now})`);
  }
}
const XSS = '<img src=x onerror=alert(1)>';
const ART = path.join(HERE, 'artifacts');

if (!BIN) { console.error('usage: test_dashboard.mjs PATH/TO/gemmaforge'); process.exit(2); }
if (!fs.existsSync('/usr/bin/chromium')) { console.log('SKIP: /usr/bin/chromium is not installed'); process.exit(77); }
const { chromium } = await import('playwright-core');

function check(cond, what) {
  if (!cond) throw new Error('check failed: ' + what);
  console.log('ok   ' + what);
}

// ---- data and server ----------------------------------------------------------

function makeData(dir) {
  const py = `
import sys, json
sys.path.insert(0, ${JSON.stringify(path.join(ROOT, 'tests', 'data'))})
import shapes
j, t, items = shapes.dataset(12, 5)
open(sys.argv[1] + '/good.jsonl', 'wb').write(j)
open(sys.argv[1] + '/good.tar', 'wb').write(t)
open(sys.argv[1] + '/held.png', 'wb').write(shapes.dataset(1, 99, prefix='held')[2][0][1])
ok = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
open(sys.argv[1] + '/bad.jsonl', 'w').write(ok + '\\n{"messages": "not a list"}\\n' + ok + '\\n[1, 2]\\n')
`;
  execFileSync('python3', ['-c', py, dir]);
}

function startServer(dataDir) {
  return new Promise((resolve, reject) => {
    const proc = spawn(BIN, ['serve', '--model', path.join(ROOT, 'tests', 'fixtures', 'dense'), '--data', dataDir, '--port', '0',
      '--api-key', KEY, '--max-seqs', '4', '--device-sched', 'on'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    proc.stderr.on('data', (d) => fs.appendFileSync(path.join(ART, 'server.log'), d));
    proc.stdout.on('data', (d) => {
      out += d;
      const m = /listening on [\d.]+:(\d+)/.exec(out);
      if (m) resolve({ proc, base: `http://127.0.0.1:${m[1]}` });
    });
    proc.on('exit', (code) => reject(new Error('the server exited: ' + code)));
  });
}

// ---- helpers ------------------------------------------------------------------------

async function shot(page, name) {
  await page.screenshot({ path: path.join(ART, name + '.png'), fullPage: true });
}

function watch(page, problems) {
  page.on('dialog', async (d) => { problems.push('a dialog opened: ' + d.message()); await d.dismiss(); });
  page.on('pageerror', (e) => problems.push('page error: ' + e.message));
  page.on('console', (m) => {
    if (m.type() === 'error' && !/Failed to load resource/.test(m.text())) problems.push('console error: ' + m.text());
  });
}

async function noXss(page) {
  const fired = await page.evaluate(() => window.__xss === true || document.querySelectorAll('img[src="x"]').length > 0);
  check(!fired, 'the HTML payload in a name is inert');
}

// ---- the walk-through ----------------------------------------------------------------

async function desktop(browser, base, dir) {
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  const page = await ctx.newPage();
  const problems = [];
  watch(page, problems);
  await page.addInitScript(() => {
    window.alert = () => { window.__xss = true; };
  });
  const icon = await page.request.get(base + '/favicon.svg');
  check(icon.status() === 200 && icon.headers()['content-type'] === 'image/svg+xml', 'the dashboard has a favicon');
  await page.goto(base + '/');
  await page.locator('#key-dialog').waitFor({ state: 'visible' });
  check(true, 'the key dialog opens on the first visit');
  await page.fill('#key-input', 'wrong-key');
  await page.click('#key-save');
  await page.locator('#key-error').filter({ hasText: 'refused' }).waitFor();
  check(true, 'a wrong key is refused in words');
  await page.fill('#key-input', KEY);
  await page.click('#key-save');
  await page.locator('h1', { hasText: 'Datasets' }).waitFor();

  // a bad dataset: its report, every bad line named
  await page.setInputFiles('#ds-file', path.join(dir, 'bad.jsonl'));
  await page.click('#ds-form button[type=submit]');
  const report = page.locator('#ds-result .report');
  await report.waitFor();
  const lines = await report.locator('tbody tr td:first-child').allTextContents();
  check(lines.join(',') === '2,4', `the validation report names lines 2 and 4 (got ${lines})`);
  await shot(page, 'datasets-report-desktop');

  // a good one named with an HTML payload; the preview first
  await page.fill('#ds-name', XSS);
  await page.setInputFiles('#ds-images', path.join(dir, 'good.tar'));
  await page.setInputFiles('#ds-file', path.join(dir, 'good.jsonl'));
  // the preview renders example by example: wait for the third of each
  await page.locator('#ds-preview img.thumb').nth(2).waitFor();
  await page.locator('#ds-preview mark.trained').nth(2).waitFor();
  check(await page.locator('#ds-preview img.thumb').count() === 3, 'the preview shows the conversations\u2019 images');
  check(await page.locator('#ds-preview mark.trained').count() === 3, 'the preview marks the trained assistant text');
  await page.click('#ds-form button[type=submit]');
  await page.locator('#ds-result .ok').waitFor();
  await page.locator('#datasets-table td.name', { hasText: XSS }).first().waitFor();
  check(await page.locator('#datasets-table td.name', { hasText: XSS }).first().textContent() === XSS,
    'the dataset named with markup is listed as text');
  await noXss(page);
  await shot(page, 'datasets-desktop');

  // fine-tune: inline validation, the estimate, then a small job
  await page.goto(base + '/#/train');
  await page.locator('#estimate').waitFor();
  check((await page.locator('#estimate').textContent()).includes('Total'), 'the memory estimate shows before queueing');
  await page.fill('#hp-lora_rank', '0');
  await page.locator('#hp-lora_rank-hint.bad').waitFor();
  check(await page.getAttribute('#hp-lora_rank', 'aria-invalid') === 'true', 'an out-of-range field is marked as typed');
  const set = { epochs: '10', learning_rate: '0.005', warmup_ratio: '0.1', batch_size: '4', gradient_accumulation_steps: '1',
    lora_rank: '8', lora_alpha: '16', save_every: '3', max_seq_len: '512' };
  for (const [k, v] of Object.entries(set)) await page.fill('#hp-' + k, v);
  await page.selectOption('#hp-quantization', 'none');
  await page.fill('#ft-suffix', 'shapes');
  await page.locator('#estimate', { hasText: 'Total' }).waitFor();
  await shot(page, 'train-desktop');
  await page.click('#ft-form button[type=submit]');
  await page.waitForURL(/#\/jobs\/job_/);
  check(true, 'starting a job opens its page');

  // the job page: live until it succeeds, the chart drawn
  await untilDone(page, page.url().split('/').pop());
  await page.locator('#loss-chart polyline.series-train').waitFor();
  const points = (await page.getAttribute('#loss-chart polyline.series-train', 'points')).trim().split(' ').length;
  check(points === 30, `the loss chart has a point per step (${points} of 30)`);
  await page.locator('#job-log li', { hasText: 'Job succeeded' }).waitFor();
  check(await page.locator('#job-log li').count() >= 30, 'the event log lists the steps, then the success');
  const end = await page.evaluate(() => {
    const l = document.getElementById('job-log');
    return { overflows: l.scrollHeight > l.clientHeight, atEnd: l.scrollTop + l.clientHeight >= l.scrollHeight - 8 };
  });
  check(end.atEnd, `the event log shows its newest event, the success (overflowing: ${end.overflows})`);
  check(await page.evaluate(() => document.getElementById('view').dataset.mode) === 'stream',
    'progress arrived over the server-sent event stream');
  const adapter = (await page.locator('.job-head a.name').textContent()).trim();
  check(adapter.startsWith('shapes-'), 'the job names its adapter');
  await shot(page, 'job-desktop');
  await page.emulateMedia({ colorScheme: 'dark' });
  await shot(page, 'job-desktop-dark');
  await page.emulateMedia({ colorScheme: 'light' });

  await page.goto(base + '/#/jobs');
  await page.locator('#jobs-table .badge-succeeded').waitFor();
  await shot(page, 'jobs-desktop');
  await page.goto(base + '/#/adapters');
  await page.locator('#adapters-table td.name', { hasText: adapter }).waitFor();
  await shot(page, 'adapters-desktop');

  // the playground: the trained adapter, a picture, a streamed answer
  let streamed = false;
  page.on('response', (r) => {
    if (r.url().endsWith('/v1/chat/completions') && (r.headers()['content-type'] || '').startsWith('text/event-stream')) streamed = true;
  });
  await page.click(`#adapters-table tr:has(td.name:text-is("${adapter}")) a.button`);
  await page.locator('#pg-form').waitFor();
  check(await page.inputValue('#pg-model') === adapter, 'Try opens the playground on that adapter');
  await page.setInputFiles('#pg-image', path.join(dir, 'held.png'));
  await page.fill('#pg-prompt', 'What colour is the shape?');
  await page.fill('#pg-max', '8');
  await page.click('#pg-ask');
  await page.locator('#pg-answer[data-done=true]').waitFor({ timeout: 60000 });
  const answer = (await page.locator('#pg-answer .answer').textContent()).trim();
  const finish = await page.locator('#pg-answer').textContent();
  check(answer.length > 0 && streamed, `the adapter's answer streamed in: "${answer}" (${finish})`);
  await page.check('#pg-compare');
  await page.click('#pg-ask');
  await page.locator('#pg-answer-b[data-done=true]').waitFor({ timeout: 60000 });
  await page.locator('#pg-answer[data-done=true]').waitFor({ timeout: 60000 });
  check(true, 'two models answer side by side');
  await shot(page, 'playground-desktop');

  await page.goto(base + '/#/system');
  await page.locator('#system .tile').first().waitFor();
  check((await page.locator('#system').textContent()).includes('loaded'), 'the system page says the model is loaded');
  // the server runs with --device-sched on: the job trained and the playground answered through the scheduler
  const sharing = page.locator('#system .card', { hasText: 'Device sharing' });
  await sharing.waitFor();
  const steps = Number((await sharing.locator('.tile', { hasText: 'Serving steps' }).locator('.tile-value').textContent()).trim());
  const stretch = (await sharing.locator('.tile', { hasText: 'Longest training stretch' }).locator('.tile-value').textContent()).trim();
  check(steps > 0 && /^\d+\.\d ms$/.test(stretch) && stretch !== '0.0 ms',
    `the system page shows the device shared: ${steps} serving steps, training's longest stretch ${stretch}`);
  await shot(page, 'system-desktop');
  await noXss(page);
  check(problems.length === 0, 'no page errors, dialogs or CSP violations: ' + problems.join('; '));
  await ctx.close();
}

async function phone(browser, base) {
  const ctx = await browser.newContext({ viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, hasTouch: true });
  await ctx.addInitScript((key) => sessionStorage.setItem('gemmaforge.apiKey', key), KEY);
  const page = await ctx.newPage();
  const problems = [];
  watch(page, problems);
  for (const [route, ready] of [['datasets', '#datasets-table'], ['train', '#estimate'], ['jobs', '#jobs-table'],
    ['adapters', '#adapters-table'], ['playground', '#pg-form'], ['system', '#system .tile']]) {
    await page.goto(`${base}/#/${route}`);
    await page.locator(ready).first().waitFor();
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    check(overflow <= 1, `${route} fits a phone's width (overflow ${overflow}px)`);
    await shot(page, route + '-phone');
  }
  check(!(await page.evaluate(() => document.getElementById('key-dialog').open)), 'the key kept in the session is used');
  check(problems.length === 0, 'no page errors at phone width: ' + problems.join('; '));
  await ctx.close();
}

// ---- main -------------------------------------------------------------------------------

fs.mkdirSync(ART, { recursive: true });
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'gf-browser-'));
let server = null, browser = null, rc = 0;
try {
  makeData(tmp);
  server = await startServer(path.join(tmp, 'data'));
  browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--no-sandbox', '--disable-dev-shm-usage'] });
  await desktop(browser, server.base, tmp);
  await phone(browser, server.base);
  console.log(`\nall checks passed; screenshots in ${ART}`);
} catch (e) {
  console.error('FAIL', e.stack || e);
  rc = 1;
} finally {
  if (browser) await browser.close();
  if (server) server.proc.kill('SIGTERM');
  fs.rmSync(tmp, { recursive: true, force: true });
}
process.exit(rc);
