// The web UI: plain JavaScript over the same /sdapi/v1 API the clients use. No build step, no CDN.
"use strict";
const $ = (id) => document.getElementById(id);
const api = (path, body) => fetch("/sdapi/v1/" + path, body === undefined ? {} : {
  method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
}).then(async (r) => {
  const data = await r.json();
  if (!r.ok) throw new Error(data.detail || r.statusText);
  return data;
});

let tab = "txt2img";
let results = [];
let chosen = -1;
let polling = null;

function option(select, value, label) {
  const o = document.createElement("option");
  o.value = value; o.textContent = label || value;
  select.appendChild(o);
}

async function loadLists() {
  const [models, samplers, schedulers, options, current] = await Promise.all([
    api("sd-models"), api("samplers"), api("schedulers"), api("options"), fetch("/ui/model").then((r) => r.json()),
  ]);
  models.forEach((m) => option($("model"), m.title));
  $("model").value = options.sd_model_checkpoint;
  samplers.forEach((s) => option($("sampler_name"), s.name));
  $("sampler_name").value = "Euler a";
  schedulers.forEach((s) => option($("scheduler"), s.name, s.label));
  $("width").value = $("height").value = current.native_size;
  // the server-wide NGMS (POST /sdapi/v1/options) is the form's starting value, so the form does not undo it
  $("s_min_uncond").value = options.s_min_uncond || 0;
  $("s_min_uncond_all").checked = Boolean(options.s_min_uncond_all);
}

$("model").addEventListener("change", async () => {
  status("loading " + $("model").value + " ...");
  await api("options", {sd_model_checkpoint: $("model").value}).catch((e) => status(e.message));
  const current = await fetch("/ui/model").then((r) => r.json());
  $("width").value = $("height").value = current.native_size;
  status("");
});

function status(text) { $("status").textContent = text; }

function showTab(name) {
  tab = name;
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  $("source").hidden = name === "txt2img";
  $("brush").hidden = name !== "inpaint";
  $("mask").style.display = name === "inpaint" ? "block" : "none";
}
document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));

// --- the init image and the mask painted over it ---
function setInit(dataUrl) {
  const img = $("init");
  img.onload = () => {
    const canvas = $("mask");
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    $("width").value = Math.round(img.naturalWidth / 8) * 8;
    $("height").value = Math.round(img.naturalHeight / 8) * 8;
  };
  img.src = dataUrl;
}

function readFile(file, then) {
  const reader = new FileReader();
  reader.onload = () => then(reader.result);
  reader.readAsDataURL(file);
}

$("file").addEventListener("change", (e) => e.target.files[0] && readFile(e.target.files[0], setInit));
for (const [zone, handler] of [["drop", (f) => readFile(f, setInit)], ["pnginfo", readParameters]]) {
  const el = $(zone);
  el.addEventListener("dragover", (e) => { e.preventDefault(); el.classList.add("over"); });
  el.addEventListener("dragleave", () => el.classList.remove("over"));
  el.addEventListener("drop", (e) => {
    e.preventDefault(); el.classList.remove("over");
    if (e.dataTransfer.files[0]) handler(e.dataTransfer.files[0]);
  });
}

let painting = false;
function paint(e) {
  if (!painting) return;
  const canvas = $("mask");
  const box = canvas.getBoundingClientRect();
  const scale = canvas.width / box.width;
  const ctx = canvas.getContext("2d");
  ctx.globalCompositeOperation = $("erase").checked ? "destination-out" : "source-over";
  ctx.fillStyle = "#ffffff";
  ctx.beginPath();
  ctx.arc((e.clientX - box.left) * scale, (e.clientY - box.top) * scale, ($("brush_size").value / 2) * scale, 0, 2 * Math.PI);
  ctx.fill();
}
$("mask").addEventListener("pointerdown", (e) => { painting = true; paint(e); });
$("mask").addEventListener("pointermove", paint);
window.addEventListener("pointerup", () => { painting = false; });
$("clear_mask").addEventListener("click", () => {
  const c = $("mask"); c.getContext("2d").clearRect(0, 0, c.width, c.height);
});

function maskDataUrl() {
  const source = $("mask");
  const out = document.createElement("canvas");
  out.width = source.width; out.height = source.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000000"; ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(source, 0, 0);  // painted strokes are opaque white: white = repaint
  return out.toDataURL("image/png");
}

// --- generate, progress, interrupt ---
function request() {
  const num = (id) => Number($(id).value);
  const body = {
    prompt: $("prompt").value, negative_prompt: $("negative_prompt").value, sampler_name: $("sampler_name").value,
    scheduler: $("scheduler").value, steps: num("steps"), cfg_scale: num("cfg_scale"), seed: num("seed"),
    width: num("width"), height: num("height"), batch_size: num("batch_size"),
    s_min_uncond: num("s_min_uncond"), override_settings: {s_min_uncond_all: $("s_min_uncond_all").checked},
  };
  if (tab !== "txt2img") {
    if (!$("init").src) throw new Error("choose an init image first");
    body.init_images = [$("init").src];
    body.denoising_strength = num("denoising_strength");
  }
  if (tab === "inpaint") {
    Object.assign(body, {mask: maskDataUrl(), mask_blur: num("mask_blur"), inpainting_fill: num("inpainting_fill"),
      inpainting_mask_invert: $("invert").checked ? 1 : 0, inpaint_full_res: false});
  }
  return body;
}

async function poll() {
  const p = await api("progress").catch(() => null);
  if (!p || !p.state.job) return;
  $("bar").style.width = Math.round(p.progress * 100) + "%";
  status(`${p.state.job}: step ${p.state.sampling_step}/${p.state.sampling_steps}` +
         (p.eta_relative ? `, ${p.eta_relative.toFixed(1)} s left` : ""));
  if (p.current_image) { $("preview").src = "data:image/png;base64," + p.current_image; $("preview").hidden = false; }
}

$("generate").addEventListener("click", async () => {
  let body;
  try { body = request(); } catch (e) { status(e.message); return; }
  $("generate").disabled = true;
  $("bar").style.width = "0";
  polling = setInterval(poll, 400);
  try {
    const r = await api(tab === "txt2img" ? "txt2img" : "img2img", body);
    const info = JSON.parse(r.info);
    results = r.images.map((b64, i) => ({src: "data:image/png;base64," + b64, params: info.infotexts[i]}));
    showResults();
    status(`done: seeds ${info.all_seeds.join(", ")}`);
  } catch (e) {
    status("error: " + e.message);
  } finally {
    clearInterval(polling);
    $("bar").style.width = "100%";
    $("preview").hidden = true;
    $("generate").disabled = false;
  }
});
$("interrupt").addEventListener("click", () => api("interrupt", {}));

function showResults() {
  const gallery = $("gallery");
  gallery.innerHTML = "";
  results.forEach((r, i) => {
    const img = document.createElement("img");
    img.src = r.src; img.alt = "result " + (i + 1); img.className = "result";
    img.addEventListener("click", () => choose(i));
    gallery.appendChild(img);
  });
  if (results.length) choose(0);
}

function choose(i) {
  chosen = i;
  document.querySelectorAll("#gallery img").forEach((img, k) => img.classList.toggle("chosen", k === i));
  $("big").src = results[i].src;
  $("params").textContent = results[i].params;
  $("selected").hidden = false;
}

for (const [button, target] of [["to_img2img", "img2img"], ["to_inpaint", "inpaint"]]) {
  $(button).addEventListener("click", () => {
    if (chosen < 0) return;
    setInit(results[chosen].src);
    showTab(target);
  });
}

// --- PNG parameters back into the form ---
function readParameters(file) {
  readFile(file, async (dataUrl) => {
    try {
      const r = await api("png-info", {image: dataUrl});
      const p = r.parameters;
      if (!r.info) { status("no parameters in that PNG"); return; }
      $("prompt").value = p.Prompt || "";
      $("negative_prompt").value = p["Negative prompt"] || "";
      const set = (id, value) => { if (value !== undefined) $(id).value = value; };
      set("steps", p.Steps); set("cfg_scale", p["CFG scale"]); set("seed", p.Seed); set("sampler_name", p.Sampler);
      const schedule = [...$("scheduler").options].find((o) => o.textContent === p["Schedule type"]);
      if (schedule) $("scheduler").value = schedule.value;
      set("s_min_uncond", p.NGMS || 0); $("s_min_uncond_all").checked = p["NGMS all steps"] === "True";
      set("width", p["Size-1"]); set("height", p["Size-2"]);
      status("parameters read from " + file.name);
    } catch (e) { status("error: " + e.message); }
  });
}

showTab("txt2img");
loadLists().catch((e) => status("error: " + e.message));
