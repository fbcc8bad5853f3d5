// Runs a GGUF in llama.cpp (node-llama-cpp's prebuilt CPU binaries) and
// prints what tests/gguf/test_gguf.py compares with gemmaforge.
//   node llama_eval.mjs MODEL.gguf [LORA.gguf] < {"rows": [[ids]...], "greedy": [{"prompt": [ids], "n": N}]}
// -> {"rows": [[[log p of every token] per position] per row], "greedy": [[ids]...]}
// The KV cache is f32 (llama.cpp's default f16 would round K and V).
import fs from 'node:fs';
import {getLlama, LlamaLogLevel} from 'node-llama-cpp';

const req = JSON.parse(fs.readFileSync(0, 'utf8'));
const llama = await getLlama({gpu: false, build: 'never', logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath: process.argv[2]});
const longest = Math.max(8, ...req.rows.map(r => r.length), ...req.greedy.map(g => g.prompt.length + g.n));
const ctx = await model.createContext({contextSize: longest + 16, batchSize: longest + 16, flashAttention: false, threads: 1,
                                       experimentalKvCacheKeyType: 'F32', experimentalKvCacheValueType: 'F32',
                                       ...(process.argv[3] ? {lora: {adapters: [{filePath: process.argv[3]}]}} : {})});

function logProbs(probabilities) {
  const out = new Array(nVocab).fill(-Infinity);
  for (const [token, p] of probabilities) out[token] = Math.log(p);
  return out;
}

const seq = ctx.getSequence();
const nVocab = model.fileInfo.metadata.tokenizer.ggml.tokens.length;
// log-probabilities after every token of ids (or after the last only)
async function evaluate(ids, every = true) {
  await seq.clearHistory();
  const want = {generateNext: {probabilities: true}};
  const res = await seq.controlledEvaluate(ids.map((t, i) => (every || i === ids.length - 1 ? [t, want] : t)));
  return res.filter(r => r !== undefined).map(r => logProbs(r.next.probabilities));
}

const argmax = a => a.reduce((best, v, i) => (v > a[best] ? i : best), 0);
const out = {rows: [], greedy: []};
for (const ids of req.rows) out.rows.push(await evaluate(ids));
for (const g of req.greedy) {
  // the prompt once, then one token at a time on top of the cache
  let lp = await evaluate(g.prompt, false);
  const gen = [];
  for (let i = 0; i < g.n; i++) {
    const t = argmax(lp[lp.length - 1]);
    gen.push(t);
    if (i + 1 < g.n) lp = (await seq.controlledEvaluate([[t, {generateNext: {probabilities: true}}]])).map(r => logProbs(r.next.probabilities));
  }
  out.greedy.push(gen);
}
// exit only once the pipe has taken everything
process.stdout.write(JSON.stringify(out, (k, v) => (v === -Infinity ? -1e30 : v)), () => process.exit(0));
