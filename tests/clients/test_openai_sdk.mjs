// The official OpenAI Node SDK (openai, pinned in package.json) against the
// real server on the bundled tiny model, as a team moving its fine-tuning
// code here would run it: upload a vision JSONL file, fine-tune, follow the
// job and page through all its events, list checkpoints, chat with the
// fine-tuned model (with an image, streaming and not), retrieve and delete
// it; and every error arrives as the SDK's typed API error with our status
// and code, never as a connection error.
//
// usage: node test_openai_sdk.mjs PATH/TO/gemmaforge   (exit 77 without the
// npm package: `npm ci` in tests/clients, which scripts/setup.sh does)
import {spawn, spawnSync} from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import {fileURLToPath} from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const ROOT = path.resolve(HERE, '..', '..');
const BIN = process.argv[2];
const KEY = 'sdk-test-key-0123456789abcdef';
if (!BIN) { console.error('usage: test_openai_sdk.mjs PATH/TO/gemmaforge'); process.exit(2); }
let OpenAI, toFile;
try {
  ({default: OpenAI, toFile} = await import('openai'));
} catch {
  console.log('SKIP: the openai npm package is not installed (cd tests/clients && npm ci)');
  process.exit(77);
}

let passed = 0, failed = 0;
async function step(name, fn) {
  const t = Date.now();
  try {
    await fn();
    passed++;
    console.log(`ok   ${name.padEnd(60)} ${((Date.now() - t) / 1000).toFixed(2)}s`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}\n${e.stack || e}`);
  }
}
function check(cond, what) { if (!cond) throw new Error('check failed: ' + what); }

/* an API error of the SDK's class for status, with our code */
async function refused(promise, status, code) {
  try {
    await promise;
  } catch (e) {
    check(e instanceof OpenAI.APIError && !(e instanceof OpenAI.APIConnectionError),
          `a typed API error, got ${e.constructor.name}: ${e.message}`);
    check(e.status === status, `status ${e.status}, want ${status} (${e.message})`);
    check(!code || e.code === code, `code ${e.code}, want ${code}`);
    return e;
  }
  throw new Error(`expected ${status} ${code}, the call succeeded`);
}

// ---- the server ---------------------------------------------------------------

const data = fs.mkdtempSync(path.join(os.tmpdir(), 'gf-sdk-'));
const server = spawn(BIN, ['serve', '--model', path.join(ROOT, 'tests', 'fixtures', 'dense'), '--data', data, '--port', '0',
                           '--api-key', KEY, '--min-examples', '4', '--train-threads', '1'],
                     {stdio: ['ignore', 'pipe', fs.openSync(path.join(os.tmpdir(), `gf-sdk-${process.pid}.log`), 'a')]});
const port = await new Promise((resolve, reject) => {
  const rl = readline.createInterface({input: server.stdout});
  rl.once('line', line => { const m = /listening on .*:(\d+)$/.exec(line); m ? resolve(Number(m[1])) : reject(new Error(line)); });
  server.once('exit', code => reject(new Error(`the server exited (${code})`)));
});
const client = new OpenAI({apiKey: KEY, baseURL: `http://127.0.0.1:${port}/v1`, maxRetries: 0, timeout: 600_000});

function jsonl(n, seed) {
  const r = spawnSync('python3', [path.join(HERE, 'openai_dataset.py'), String(n), String(seed)]);
  if (r.status !== 0) throw new Error(r.stderr.toString());
  return r.stdout;
}

/* polls a job until it ends: a hang guard, not a deadline */
async function finished(id, boundMs = 3_600_000) {
  const t = Date.now();
  for (;;) {
    const job = await client.fineTuning.jobs.retrieve(id);
    if (!['validating_files', 'queued', 'running'].includes(job.status)) return job;
    if (Date.now() - t > boundMs) throw new Error(`job ${id} still ${job.status}`);
    await new Promise(r => setTimeout(r, 200));
  }
}

let file, job, model;
const image = spawnSync('python3', ['-c', `
import base64, random, sys
sys.path.insert(0, ${JSON.stringify(path.join(ROOT, 'tests', 'data'))})
import shapes
print(base64.b64encode(shapes.picture("red", "disc", random.Random(5))).decode())`]).stdout.toString().trim();

try {
  await step('files.create uploads a vision JSONL for fine-tuning', async () => {
    const bytes = jsonl(8, 11);
    file = await client.files.create({file: await toFile(bytes, 'colours.jsonl'), purpose: 'fine-tune'});
    check(file.object === 'file' && file.purpose === 'fine-tune' && file.filename === 'colours.jsonl', JSON.stringify(file));
    check(file.bytes === bytes.length && file.status === 'processed', JSON.stringify(file));
    const again = await client.files.retrieve(file.id);
    check(again.id === file.id && again.filename === 'colours.jsonl', 'retrieve');
    const listed = [];
    for await (const f of client.files.list()) listed.push(f.id);
    check(listed.includes(file.id), 'listed');
    const content = Buffer.from(await (await client.files.content(file.id)).arrayBuffer());
    check(content.equals(bytes), 'content is the upload');
  });

  await step('a refused file arrives as the SDK\'s errors', async () => {
    const bad = Buffer.from('{"messages": [{"role": "user", "content": "no answer"}]}\n'.repeat(4));
    const e = await refused(client.files.create({file: await toFile(bad, 'bad.jsonl'), purpose: 'fine-tune'}), 422,
                            'invalid_dataset');
    check(e.error?.details?.[0]?.line === 1, JSON.stringify(e.error));
    await refused(client.files.create({file: await toFile(bad, 'bad.jsonl'), purpose: 'assistants'}), 400, 'invalid_value');
    const stranger = new OpenAI({apiKey: 'not-the-key-0123456789', baseURL: client.baseURL, maxRetries: 0});
    await refused(stranger.files.create({file: await toFile(jsonl(8, 12), 'x.jsonl'), purpose: 'fine-tune'}), 401);
    await refused(client.files.retrieve('file-nope'), 404, 'dataset_not_found');
  });

  await step('fineTuning.jobs.create takes OpenAI\'s parameters', async () => {
    job = await client.fineTuning.jobs.create({model: 'dense', training_file: file.id, suffix: 'sdk', seed: 7,
                                               metadata: {team: 'vision', run: 'first'},
                                               hyperparameters: {n_epochs: 3, batch_size: 2, learning_rate_multiplier: 40,
                                                                 gradient_accumulation_steps: 1, save_every: 4 /* ours */}});
    check(JSON.stringify(job.metadata) === '{"team":"vision","run":"first"}', JSON.stringify(job.metadata));
    check(job.object === 'fine_tuning.job' && job.training_file === file.id && job.model === 'dense', JSON.stringify(job));
    check(job.hyperparameters.n_epochs === 3 && job.hyperparameters.batch_size === 2, JSON.stringify(job.hyperparameters));
    check(Math.abs(job.hyperparameters.learning_rate_multiplier - 40) < 1e-9 && job.seed === 7, JSON.stringify(job));
    check(job.method?.type === 'supervised' && job.fine_tuned_model === null && job.trained_tokens === null, JSON.stringify(job));
    await refused(client.fineTuning.jobs.create({model: 'dense', training_file: 'file-nope'}), 404);
    await refused(client.fineTuning.jobs.create({model: 'gpt-4o', training_file: file.id}), 404, 'model_not_found');
    await refused(client.fineTuning.jobs.create({model: 'dense', training_file: file.id, method: {type: 'dpo'}}), 400,
                  'unsupported_method');
    await refused(client.fineTuning.jobs.create({model: 'dense', training_file: file.id,
                                                 hyperparameters: {n_epochs: 0}}), 400, 'invalid_hyperparameter');
    await refused(client.fineTuning.jobs.create({model: 'dense', training_file: file.id, metadata: {n: 1}}), 400,
                  'invalid_value');
  });

  let second;
  await step('a queued job pauses and stays paused', async () => {
    // the worker runs one job at a time: while the first runs, this one waits
    second = await client.fineTuning.jobs.create({model: 'dense', training_file: file.id, suffix: 'sdk2', seed: 7,
                                                  hyperparameters: {n_epochs: 3, batch_size: 2, learning_rate_multiplier: 40,
                                                                    gradient_accumulation_steps: 1, save_every: 4}});
    const p = await client.fineTuning.jobs.pause(second.id);
    check(p.status === 'paused', `paused: ${p.status}`);
    await refused(client.fineTuning.jobs.resume(job.id), 409, 'job_not_paused');
  });

  await step('the job succeeds and names its fine-tuned model', async () => {
    job = await finished(job.id);
    check(job.status === 'succeeded' && job.finished_at >= job.created_at, JSON.stringify(job));
    check(Number.isInteger(job.trained_tokens) && job.trained_tokens > 0 && job.trained_tokens % 3 === 0,
          `trained_tokens ${job.trained_tokens}: the set's tokens x 3 epochs`);
    check(typeof job.fine_tuned_model === 'string' && job.fine_tuned_model.startsWith('sdk-'), job.fine_tuned_model);
    model = job.fine_tuned_model;
    const listed = [];
    for await (const j of client.fineTuning.jobs.list({limit: 1})) listed.push(j.id);
    check(listed.includes(job.id), 'listed through auto-pagination');
    // metadata filters, one job per page: the SDK still walks past the jobs that do not match
    const byMeta = async (metadata) => {
      const ids = [];
      for await (const j of client.fineTuning.jobs.list({limit: 1, metadata})) ids.push(j.id);
      return ids;
    };
    check(JSON.stringify(await byMeta({team: 'vision'})) === JSON.stringify([job.id]), 'filtered by metadata');
    check((await byMeta({team: 'vision', run: 'second'})).length === 0, 'every pair must match');
    check(JSON.stringify(await byMeta(null)) === JSON.stringify([second.id]), 'metadata=null: the jobs without');
  });

  await step('a paused job resumes; paused again while running, it ends as if never paused', async () => {
    await new Promise(r => setTimeout(r, 1500)); // the worker is idle now: a paused job is not taken
    check((await client.fineTuning.jobs.retrieve(second.id)).status === 'paused', 'still paused after the first job');
    check((await client.fineTuning.jobs.resume(second.id)).status === 'queued', 'resumed: queued');
    for (let t = Date.now(); ; ) {  // running, past its first step (a hang guard, not a deadline)
      const j = await client.fineTuning.jobs.retrieve(second.id);
      if (j.status === 'running' && j.progress?.step >= 1) break;
      check(['queued', 'running'].includes(j.status) && Date.now() - t < 3_600_000, `waiting to run: ${j.status}`);
      await new Promise(r => setTimeout(r, 50));
    }
    const asked = await client.fineTuning.jobs.pause(second.id);
    check(asked.status === 'running' && asked.pause_requested === true, JSON.stringify(asked));
    for (let t = Date.now(); ; ) {
      const j = await client.fineTuning.jobs.retrieve(second.id);
      if (j.status === 'paused') break;
      check(j.status === 'running' && Date.now() - t < 3_600_000, `waiting to pause: ${j.status}`);
      await new Promise(r => setTimeout(r, 50));
    }
    await client.fineTuning.jobs.resume(second.id);
    second = await finished(second.id);
    check(second.status === 'succeeded', JSON.stringify(second));
    // same data, hyperparameters and seed as the first job: the same adapter, bit for bit
    const weights = async name => {
      const tar = Buffer.from(await (await fetch(`${client.baseURL}/adapters/${name}/download`,
                                                 {headers: {Authorization: `Bearer ${KEY}`}})).arrayBuffer());
      for (let at = 0; at + 512 <= tar.length && tar[at]; ) {   // the ustar members
        const member = tar.subarray(at, at + 100).toString().replace(/\0.*$/s, '');
        const size = parseInt(tar.subarray(at + 124, at + 136).toString().replace(/\0.*$/s, '').trim(), 8);
        if (member === 'adapter_model.safetensors') return tar.subarray(at + 512, at + 512 + size);
        at += 512 + Math.ceil(size / 512) * 512;
      }
      throw new Error(`no weights in the download of ${name}`);
    };
    const [a, b] = [await weights(job.fine_tuned_model), await weights(second.fine_tuned_model)];
    check(a.length > 0 && a.equals(b), 'the paused and resumed job trained the same adapter');
  });

  await step('listEvents pages through every event in order', async () => {
    const paged = [];
    for await (const e of client.fineTuning.jobs.listEvents(job.id, {limit: 2})) paged.push(e);
    const all = await (await fetch(`${client.baseURL}/fine_tuning/jobs/${job.id}/events?limit=100`,
                                   {headers: {Authorization: `Bearer ${KEY}`}})).json();
    check(all.has_more === false && all.data.length > 4, `events: ${all.data.length}`);
    check(JSON.stringify(paged.map(e => e.id)) === JSON.stringify(all.data.map(e => e.id)),
          `paged ${paged.length} of ${all.data.length}`);
    check(paged.every(e => e.object === 'fine_tuning.job.event' && /^ftevent-\d+$/.test(e.id)), 'event shape');
    check(/succeeded/i.test(paged.at(-1).message), `the last event is the end: ${paged.at(-1).message}`);
  });

  await step('checkpoints are listed', async () => {
    const cps = [];
    for await (const c of client.fineTuning.jobs.checkpoints.list(job.id)) cps.push(c);
    check(cps.length >= 2 && cps.every(c => c.object === 'fine_tuning.job.checkpoint' && Number.isInteger(c.step_number) &&
                                       c.step_number > 0 && c.step_number % 4 === 0 && c.fine_tuning_job_id === job.id),
          JSON.stringify(cps));
    check(cps.every((c, i) => i === 0 || c.step_number < cps[i - 1].step_number), 'newest first');
    // each checkpoint is a model: the adapter saved at that step answers
    const messages = [{role: 'user', content: 'Which colour?'}];
    for (const c of cps) {
      check(c.fine_tuned_model_checkpoint === `ft:${job.fine_tuned_model}:${job.id}:ckpt-step-${c.step_number}`,
            c.fine_tuned_model_checkpoint);
      const r = await client.chat.completions.create({model: c.fine_tuned_model_checkpoint, messages, max_tokens: 3,
                                                      temperature: 0});
      check(r.model === c.fine_tuned_model_checkpoint && r.usage.completion_tokens > 0, JSON.stringify(r));
    }
    await refused(client.chat.completions.create({model: `ft:${job.fine_tuned_model}:${job.id}:ckpt-step-99999`, messages}),
                  404, 'model_not_found');
    await refused(client.chat.completions.create({model: `ft:someone-else:${job.id}:ckpt-step-${cps[0].step_number}`,
                                                  messages}), 404, 'model_not_found');
  });

  await step('chat with the fine-tuned model and an image', async () => {
    const messages = [{role: 'user', content: [{type: 'image_url', image_url: {url: `data:image/png;base64,${image}`}},
                                                {type: 'text', text: 'What colour is the shape?'}]}];
    const r = await client.chat.completions.create({model, messages, max_tokens: 4, temperature: 0});
    check(r.object === 'chat.completion' && r.model === model && typeof r.choices[0].message.content === 'string', JSON.stringify(r));
    let text = '', chunks = 0;
    const stream = await client.chat.completions.create({model, messages, max_tokens: 4, temperature: 0, stream: true});
    for await (const c of stream) { chunks++; text += c.choices[0]?.delta?.content ?? ''; }
    check(chunks > 1 && text === r.choices[0].message.content, `streamed "${text}" vs "${r.choices[0].message.content}"`);
    await refused(client.chat.completions.create({model: 'nope', messages}), 404, 'model_not_found');
  });

  await step('models.retrieve and models.delete', async () => {
    const m = await client.models.retrieve(model);
    check(m.id === model && m.object === 'model', JSON.stringify(m));
    const d = await client.models.delete(model);
    check(d.deleted === true && d.id === model, JSON.stringify(d));
    await refused(client.models.retrieve(model), 404, 'model_not_found');
    await refused(client.models.delete('dense'), 403, 'model_not_deletable');
  });

  await step('files.delete', async () => {
    const d = await client.files.delete(file.id);
    check(d.deleted === true && d.id === file.id, JSON.stringify(d));
    await refused(client.files.retrieve(file.id), 404);
  });
} finally {
  server.kill('SIGTERM');
  await new Promise(r => server.once('exit', r));
  fs.rmSync(data, {recursive: true, force: true});
}
console.log(`\n${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
