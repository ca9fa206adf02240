// llama.cpp peer of devpipe bench's `llm` workload, through node-llama-cpp 3.21.1 (prebuilt
// linux-x64 binaries, cpu only). Token ids go in directly: no tokenizer, no text round-trip.
//
//   node bench/llama_cpp/peer.mjs generate --model M.gguf --prompts "1,17,42;5,6" --max-new-tokens 32
//       greedy generation (temperature 0: argmax); each prompt in its own context sequence, all
//       sequences stepped together. Prints {"generated": [[ids], ...], ...}. Does not stop at eos.
//   node bench/llama_cpp/peer.mjs bench --model M.gguf --prompts "ids;ids;..." [--decode-tokens 64]
//       [--batches 1,8] [--iters 3] [--warmup 1]
//       prefill: one sequence evaluates prompt 0 (one llama_decode, batch size >= prompt, no
//       sampling); decode at batch B: B sequences with prompts 0..B-1 (prefilled untimed), then
//       --decode-tokens greedy steps in which all B sequences' tokens are
//       queued together, so node-llama-cpp evaluates them in one llama_decode batch per step.
//       Prints {"prefill_ms": [...], "prefill_tokens_per_s", "decode": {"1": {"step_ms": [...],
//       "tokens_per_s", "generated_seq0"}, "8": ...}, ...}; tokens_per_s from the median sample.
//   Common: [--threads N] (default: all cores) [--kv-type F32|F16] (default F32: float32 cache)
//
// Run with the packages install.sh put in build/llama_cpp (or DEVPIPE_LLAMA_CPP_DIR): the script
// resolves node-llama-cpp from there.
import os from "node:os";
import path from "node:path";
import {createRequire} from "node:module";
import {pathToFileURL, fileURLToPath} from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const pkgDir = process.env.DEVPIPE_LLAMA_CPP_DIR || path.join(here, "..", "..", "build", "llama_cpp");

function fail(msg) {
  process.stderr.write(`peer.mjs: ${msg}\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const cmd = argv[0];
  const a = {};
  for (let i = 1; i < argv.length; i++) {
    const k = argv[i];
    if (!k.startsWith("--")) fail(`unexpected argument ${JSON.stringify(k)}`);
    if (i + 1 >= argv.length) fail(`${k} needs a value`);
    a[k.slice(2)] = argv[++i];
  }
  return [cmd, a];
}

function intArg(a, k, def) {
  if (a[k] === undefined) {
    if (def === undefined) fail(`--${k} is required`);
    return def;
  }
  const v = Number(a[k]);
  if (!Number.isInteger(v)) fail(`--${k} must be an integer, got ${JSON.stringify(a[k])}`);
  return v;
}

function parsePrompts(s) {
  return s.split(";").map((p, i) => {
    const ids = p.split(",").map((x) => Number(x.trim()));
    if (!p.trim() || ids.some((x) => !Number.isInteger(x) || x < 0)) {
      fail(`--prompts: sequence ${i} (${JSON.stringify(p)}) is not comma-separated token ids`);
    }
    return ids;
  });
}

function median(xs) {
  const s = [...xs].sort((x, y) => x - y);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

// Splits ids into the evaluated prefix and a last token that asks for a greedy next token.
function withGreedyLast(ids) {
  const items = ids.slice(0, -1);
  items.push([ids[ids.length - 1], {generateNext: {token: true, options: {temperature: 0}}}]);
  return items;
}

async function greedyNext(seq, ids) {
  const res = await seq.controlledEvaluate(withGreedyLast(ids));
  const t = res[ids.length - 1]?.next?.token;
  if (t === undefined || t === null) fail("controlledEvaluate returned no next token");
  return t;
}

// One generation over a set of sequences: prompts[i] on seqs[i]; returns ids and per-step times.
async function generate(seqs, prompts, maxNew) {
  const t0 = performance.now();
  let cur = await Promise.all(seqs.map((s, i) => greedyNext(s, prompts[i])));
  const prefillMs = performance.now() - t0;
  const out = cur.map((t) => [t]);
  const stepMs = [];
  for (let step = 1; step < maxNew; step++) {
    const ts = performance.now();
    cur = await Promise.all(seqs.map((s, i) => greedyNext(s, [cur[i]])));
    stepMs.push(performance.now() - ts);
    cur.forEach((t, i) => out[i].push(t));
  }
  return {out, prefillMs, stepMs};
}

async function main() {
  const [cmd, a] = parseArgs(process.argv.slice(2));
  if (cmd !== "generate" && cmd !== "bench") fail(`first argument must be generate or bench, got ${JSON.stringify(cmd)}`);
  if (!a.model) fail("--model is required");
  const threads = intArg(a, "threads", os.cpus().length);
  const kvType = a["kv-type"] || "F32";
  if (kvType !== "F32" && kvType !== "F16") fail(`--kv-type must be F32 or F16, got ${kvType}`);

  const require = createRequire(path.join(pkgDir, "package.json"));
  let entry;
  try {
    entry = require.resolve("node-llama-cpp");
  } catch {
    fail(`node-llama-cpp not found under ${pkgDir}: run bash bench/llama_cpp/install.sh`);
  }
  const {getLlama, LlamaLogLevel} = await import(pathToFileURL(entry).href);
  const llama = await getLlama({gpu: false, build: "never", usePrebuiltBinaries: true, skipDownload: true,
                                maxThreads: threads, logLevel: LlamaLogLevel.error, progressLogs: false});
  const model = await llama.loadModel({modelPath: a.model, gpuLayers: 0});

  const common = {threads: {ideal: threads, min: threads}, experimentalKvCacheKeyType: kvType,
                  experimentalKvCacheValueType: kvType, flashAttention: false};
  const info = {peer: "llama.cpp", node_llama_cpp: "3.21.1", threads, kv_cache_type: kvType,
                cpu: os.cpus()[0]?.model, gpu: llama.gpu};

  if (cmd === "generate") {
    const prompts = parsePrompts(a.prompts || fail("--prompts is required"));
    const maxNew = intArg(a, "max-new-tokens");
    const longest = Math.max(...prompts.map((p) => p.length));
    const ctx = await model.createContext({...common, sequences: prompts.length, contextSize: longest + maxNew + 8,
                                           batchSize: Math.max(512, longest * prompts.length)});
    const seqs = prompts.map(() => ctx.getSequence());
    const r = await generate(seqs, prompts, maxNew);
    console.log(JSON.stringify({...info, generated: r.out}));
    await ctx.dispose();
  } else {
    const prompts = parsePrompts(a.prompts || fail("--prompts is required"));
    const promptLen = prompts[0].length;
    const decodeTokens = intArg(a, "decode-tokens", 64);
    const iters = intArg(a, "iters", 3);
    const warmup = intArg(a, "warmup", 1);
    const batches = (a.batches || "1,8").split(",").map(Number);
    if (batches.some((b) => !Number.isInteger(b) || b < 1 || b > prompts.length)) {
      fail(`--batches ${a.batches}: each must be an integer in [1, ${prompts.length}] (the number of --prompts)`);
    }
    if (decodeTokens < 2 || iters < 1 || warmup < 0) fail("--decode-tokens >= 2, --iters >= 1, --warmup >= 0");
    const maxB = Math.max(...batches);
    const longest = Math.max(...prompts.map((p) => p.length));
    const ctx = await model.createContext({...common, sequences: maxB, contextSize: longest + decodeTokens + 8,
                                           batchSize: Math.max(512, longest * maxB)});
    const seqs = Array.from({length: maxB}, () => ctx.getSequence());
    const result = {...info, prompt_len: promptLen, decode_tokens: decodeTokens, iters, warmup,
                    prefill_ms: [], decode: {}};
    // prefill at batch 1: the whole prompt in one evaluation (no sampling)
    for (let it = 0; it < warmup + iters; it++) {
      await seqs[0].clearHistory();
      const ids = prompts[0];
      const t0 = performance.now();
      await seqs[0].evaluateWithoutGeneratingNewTokens(ids);
      const ms = performance.now() - t0;
      if (it >= warmup) result.prefill_ms.push(ms);
    }
    result.prefill_tokens_per_s = promptLen / (median(result.prefill_ms) / 1e3);
    for (const b of batches) {
      const steps = [];
      let generated = null;
      for (let it = 0; it < warmup + iters; it++) {
        const use = seqs.slice(0, b);
        await Promise.all(use.map((s) => s.clearHistory()));
        const r = await generate(use, prompts.slice(0, b), decodeTokens);
        if (it >= warmup) steps.push(...r.stepMs);
        generated = r.out[0];
      }
      result.decode[String(b)] = {step_ms: steps, step_ms_median: median(steps),
                                  tokens_per_s: b / (median(steps) / 1e3), generated_seq0: generated};
    }
    console.log(JSON.stringify(result));
    await ctx.dispose();
  }
  await model.dispose();
  await llama.dispose();
}

main().catch((e) => fail(e?.stack || String(e)));
