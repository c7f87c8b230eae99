// pocketdiff's in-browser demo: text → image with an exported few-step generator, on this device.
// onnxruntime-web runs the ONNX export (text encoder, UNet, VAE decoder) with WebGPU where the
// browser has it, else WebAssembly. The tokenizer, LCM step and guidance embedding are the ones
// pocketdiff's torch-free Python runtime uses (export/clip_bpe.py, export/lcm.py, export/runtime.py).
import * as ort from "./ort/ort.all.min.mjs";

const MODEL = "./model/";
ort.env.wasm.wasmPaths = new URL("./ort/", import.meta.url).href;
ort.env.logLevel = "error";
ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;

async function fetchModelFile(path, as = "json") {
  const response = await fetch(MODEL + path);
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return as === "json" ? response.json() : response.text();
}

// --- CLIP's byte-level BPE ------------------------------------------------------------------------
const PATTERN = /<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+/giu;

function byteSymbols() {
  const printable = new Set();
  for (const [a, b] of [["!", "~"], ["¡", "¬"], ["®", "ÿ"]])
    for (let c = a.charCodeAt(0); c <= b.charCodeAt(0); c++) printable.add(c);
  const symbols = [];
  let extra = 0;
  for (let b = 0; b < 256; b++) symbols.push(String.fromCharCode(printable.has(b) ? b : 256 + extra++));
  return symbols;
}

class ClipBPE {
  constructor(vocab, mergesText, config) {
    this.vocab = vocab;
    this.ranks = new Map();
    mergesText.split("\n").filter((l) => l && !l.startsWith("#version")).forEach((l, i) => this.ranks.set(l, i));
    const token = (key, fallback) => {
      const value = config[key] ?? fallback;
      return vocab[typeof value === "object" ? value.content : value];
    };
    this.bos = token("bos_token", "<|startoftext|>");
    this.eos = token("eos_token", "<|endoftext|>");
    this.pad = token("pad_token", "<|endoftext|>");
    this.unk = token("unk_token", "<|endoftext|>");
    this.maxLength = config.model_max_length && config.model_max_length < 1e6 ? config.model_max_length : 77;
    this.bytes = byteSymbols();
  }

  bpe(word) {
    const chars = Array.from(word);
    const parts = [...chars.slice(0, -1), chars[chars.length - 1] + "</w>"];
    while (parts.length > 1) {
      let best = Infinity, at = -1;
      for (let i = 0; i < parts.length - 1; i++) {
        const rank = this.ranks.get(parts[i] + " " + parts[i + 1]);
        if (rank !== undefined && rank < best) [best, at] = [rank, i];
      }
      if (at < 0) break;
      parts.splice(at, 2, parts[at] + parts[at + 1]);
    }
    return parts;
  }

  encode(text) {
    const ids = [];
    for (const word of text.split(/\s+/).filter(Boolean).join(" ").toLowerCase().match(PATTERN) || []) {
      const mapped = [...new TextEncoder().encode(word)].map((b) => this.bytes[b]).join("");
      for (const part of this.bpe(mapped)) ids.push(this.vocab[part] ?? this.unk);
    }
    const row = [this.bos, ...ids.slice(0, this.maxLength - 2), this.eos];
    while (row.length < this.maxLength) row.push(this.pad);
    return BigInt64Array.from(row, BigInt);
  }
}

// --- noise, LCM, guidance -------------------------------------------------------------------------
// Seeded starting noise: mulberry32 and Box–Muller, which apps/demo.py's `demo_noise` repeats in numpy.
export function demoNoise(seed, count) {
  let state = seed >>> 0;
  const uniform = () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = Math.imul(state ^ (state >>> 15), 1 | state);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const out = new Float32Array(count);
  for (let i = 0; i < count; i += 2) {
    const radius = Math.sqrt(-2 * Math.log(1 - uniform())), angle = 2 * Math.PI * uniform();
    out[i] = radius * Math.cos(angle);
    if (i + 1 < count) out[i + 1] = radius * Math.sin(angle);
  }
  return out;
}

function alphasCumprod(config) {
  const n = config.num_train_timesteps ?? 1000, start = config.beta_start ?? 0.00085, end = config.beta_end ?? 0.012;
  const schedule = config.beta_schedule ?? "scaled_linear";
  if (!["scaled_linear", "linear"].includes(schedule) || config.trained_betas || config.rescale_betas_zero_snr)
    throw new Error(`the demo's sampler takes linear or scaled_linear betas, not this scheduler's (${schedule})`);
  const alphas = new Float32Array(n);
  let product = 1;
  for (let i = 0; i < n; i++) {
    const beta = schedule === "linear" ? start + ((end - start) * i) / (n - 1)
      : Math.fround(Math.sqrt(start) + ((Math.sqrt(end) - Math.sqrt(start)) * i) / (n - 1)) ** 2;
    product = Math.fround(product * Math.fround(1 - Math.fround(beta)));
    alphas[i] = product;
  }
  return alphas;
}

class LCM {
  constructor(config) {
    if (config._class_name !== "LCMScheduler")
      throw new Error(`the demo runs few-step students (LCMScheduler); this export's scheduler is ${config._class_name}: ` +
        "distil it first (pocketdiff distill steps --method lcm) and export the student");
    this.config = config;
    this.alphas = alphasCumprod(config);
    this.original = config.original_inference_steps ?? 50;
    this.scaling = config.timestep_scaling ?? 10;
  }

  timesteps(steps) {
    const k = Math.floor(this.alphas.length / this.original);
    const origin = Array.from({ length: this.original }, (_, i) => (this.original - i) * k - 1);
    return Array.from({ length: steps }, (_, i) => origin[Math.floor((i * origin.length) / steps)]);
  }

  step(output, t, sample, next, rng) {
    const alpha = this.alphas[t], scaled = t * this.scaling;
    const cSkip = 0.25 / (scaled ** 2 + 0.25), cOut = scaled / Math.sqrt(scaled ** 2 + 0.25);
    const kind = this.config.prediction_type ?? "epsilon";
    const result = new Float32Array(sample.length);
    const alphaNext = next === undefined ? null : this.alphas[next];
    const noise = alphaNext === null ? null : rng(sample.length);
    for (let i = 0; i < sample.length; i++) {
      const x = sample[i], o = output[i];
      const x0 = kind === "epsilon" ? (x - Math.sqrt(1 - alpha) * o) / Math.sqrt(alpha)
        : kind === "v_prediction" ? Math.sqrt(alpha) * x - Math.sqrt(1 - alpha) * o : o;
      const denoised = cOut * x0 + cSkip * x;
      result[i] = alphaNext === null ? denoised : Math.sqrt(alphaNext) * denoised + Math.sqrt(1 - alphaNext) * noise[i];
    }
    return result;
  }
}

function guidanceEmbedding(guidance, dim) {
  const half = Math.floor(dim / 2), out = new Float32Array(dim);
  for (let i = 0; i < half; i++) {
    const angle = Math.fround(Math.fround((guidance - 1) * 1000) * Math.fround(Math.exp(-i * Math.log(10000) / (half - 1))));
    out[i] = Math.sin(angle);
    out[half + i] = Math.cos(angle);
  }
  return out;
}

// --- the pipeline ---------------------------------------------------------------------------------
async function pickProvider() {
  const asked = new URLSearchParams(location.search).get("ep");
  if (asked) return asked;
  if (navigator.gpu && (await navigator.gpu.requestAdapter().catch(() => null))) return "webgpu";
  return "wasm";
}

export async function loadPipeline(status) {
  const provider = await pickProvider();
  const [unet, vae, scheduler, vocab, merges, tokenizerConfig] = await Promise.all([
    fetchModelFile("unet/config.json"), fetchModelFile("vae_decoder/config.json"),
    fetchModelFile("scheduler/scheduler_config.json"), fetchModelFile("tokenizer/vocab.json"),
    fetchModelFile("tokenizer/merges.txt", "text"), fetchModelFile("tokenizer/tokenizer_config.json").catch(() => ({})),
  ]);
  const lcm = new LCM(scheduler);
  const sessions = {};
  for (const name of ["text_encoder", "unet", "vae_decoder"]) {
    status(`loading ${name} (${provider}) …`);
    sessions[name] = await ort.InferenceSession.create(`${MODEL}${name}/model.onnx`, { executionProviders: [provider] });
  }
  return { provider, unet, scaling: vae.scaling_factor ?? 0.18215, lcm, tokenizer: new ClipBPE(vocab, merges, tokenizerConfig), sessions };
}

async function encode(pipe, prompt) {
  const ids = pipe.tokenizer.encode(prompt);
  const out = await pipe.sessions.text_encoder.run({ input_ids: new ort.Tensor("int64", ids, [1, ids.length]) });
  return out.last_hidden_state;
}

function concat(a, b) {
  const data = new Float32Array(a.data.length + b.data.length);
  data.set(a.data);
  data.set(b.data, a.data.length);
  return new ort.Tensor("float32", data, [a.dims[0] + b.dims[0], ...a.dims.slice(1)]);
}

export async function generate(pipe, prompt, seed, steps, guidance) {
  const timings = {};
  const timed = async (name, work) => {
    const began = performance.now();
    const result = await work();
    timings[name] = (timings[name] ?? 0) + performance.now() - began;
    return result;
  };
  const { in_channels: channels, sample_size: size, time_cond_proj_dim: guidanceDim } = pipe.unet;
  const cond = await timed("text_encoder", () => encode(pipe, prompt));
  const embedded = guidanceDim ? new ort.Tensor("float32", guidanceEmbedding(guidance, guidanceDim), [1, guidanceDim]) : null;
  const guided = guidance > 1 && !embedded;
  const context = guided ? concat(await timed("text_encoder", () => encode(pipe, "")), cond) : cond;
  const shape = [1, channels, size, size];
  let x = demoNoise(seed, channels * size * size);
  let noiseSeed = seed + 1;
  const schedule = pipe.lcm.timesteps(steps);
  for (let i = 0; i < schedule.length; i++) {
    const t = schedule[i];
    const latent = new ort.Tensor("float32", x, shape);
    const feeds = { sample: guided ? concat(latent, latent) : latent, timestep: new ort.Tensor("float32", Float32Array.of(t), []),
                    encoder_hidden_states: context };
    if (embedded) feeds.timestep_cond = embedded;
    const out = (await timed("unet", () => pipe.sessions.unet.run(feeds))).out_sample.data;
    const n = x.length;
    const eps = guided ? Float32Array.from({ length: n }, (_, j) => out[j] + guidance * (out[n + j] - out[j])) : out;
    x = pipe.lcm.step(eps, t, x, schedule[i + 1], (count) => demoNoise(noiseSeed++, count));
  }
  const scaled = Float32Array.from(x, (v) => v / pipe.scaling);
  const decoded = await timed("vae_decoder", () => pipe.sessions.vae_decoder.run({ latent_sample: new ort.Tensor("float32", scaled, shape) }));
  const { data, dims } = decoded.sample;
  const [height, width] = dims.slice(2), plane = height * width;
  const rgba = new Uint8ClampedArray(plane * 4);
  for (let p = 0; p < plane; p++) {
    for (let c = 0; c < 3; c++) rgba[p * 4 + c] = Math.round(Math.min(1, Math.max(0, data[c * plane + p] / 2 + 0.5)) * 255);
    rgba[p * 4 + 3] = 255;
  }
  return { image: new ImageData(rgba, width, height), timings };
}
