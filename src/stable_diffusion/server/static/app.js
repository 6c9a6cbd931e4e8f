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

let scriptInfo = [];

async function loadLists() {
  const [models, samplers, schedulers, options, current, styles, latent, upscalers, scripts] = await Promise.all([
    api("sd-models"), api("samplers"), api("schedulers"), api("options"), fetch("/ui/model").then((r) => r.json()),
    api("prompt-styles"), api("latent-upscale-modes"), api("upscalers"), api("script-info"),
  ]);
  models.forEach((m) => { option($("model"), m.title); option($("refiner_checkpoint"), m.title); });
  styles.forEach((s) => option($("styles"), s.name));
  latent.forEach((m) => option($("hr_upscaler"), m.name));
  upscalers.filter((u) => u.name !== "None").forEach((u) => {
    option($("hr_upscaler"), u.name); option($("upscaler_1"), u.name);
  });
  scriptInfo = scripts;
  showScripts();
  const [cnModels, cnModules] = await Promise.all([fetch("/controlnet/model_list").then((r) => r.json()),
    fetch("/controlnet/module_list").then((r) => r.json())]);
  cnModels.model_list.forEach((m) => option($("cn_model"), m));
  cnModules.module_list.forEach((m) => option($("cn_module"), m));
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
  $("hires").hidden = name !== "txt2img";
  showScripts();
}

// --- A1111's scripts: the ones /script-info offers for this tab; the X/Y/Z plot's axes in A1111's order ---
function showScripts() {
  const img2img = tab !== "txt2img";
  // poor man's outpainting makes its own mask: offered on the img2img tab only
  const offered = scriptInfo.filter((s) => s.is_img2img === img2img &&
    !(tab === "inpaint" && s.name === "poor man's outpainting"));
  const select = $("script_name");
  const keep = select.value;
  select.innerHTML = "";
  option(select, "", "None");
  offered.forEach((s) => option(select, s.name));
  select.value = offered.some((s) => s.name === keep) ? keep : "";
  const xyz = offered.find((s) => s.name === "x/y/z plot");
  if (xyz) {
    for (const axis of ["x", "y", "z"]) {
      const el = $(axis + "_type"), was = el.value;
      el.innerHTML = "";
      xyz.args[0].choices.forEach((label, i) => option(el, String(i), label));
      el.value = was && Number(was) < el.options.length ? was : (axis === "x" ? "1" : "0");
    }
  }
  showScriptFields();
}
function showScriptFields() {
  $("xyz").hidden = $("script_name").value !== "x/y/z plot";
  $("outpaint").hidden = $("script_name").value !== "poor man's outpainting";
}
$("script_name").addEventListener("change", showScriptFields);

function scriptFields() {
  const name = $("script_name").value;
  if (name === "x/y/z plot") {
    const axis = (a) => [Number($(a + "_type").value), $(a + "_values").value, []];
    return {script_name: name, script_args: [...axis("x"), ...axis("y"), ...axis("z"), $("draw_legend").checked,
      $("include_lone_images").checked, false, false, false, false, false, 0, true]};
  }
  if (name === "poor man's outpainting") {
    const directions = [...document.querySelectorAll("#outpaint_directions input:checked")].map((c) => c.value);
    return {script_name: name, script_args: [Number($("outpaint_pixels").value), Number($("outpaint_blur").value),
      Number($("inpainting_fill").value), directions]};
  }
  return {};
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
    styles: [...$("styles").selectedOptions].map((o) => o.value),
    subseed: num("subseed"), subseed_strength: num("subseed_strength"),
    ...scriptFields(),
  };
  if ($("cn_enabled").checked) {
    if (!$("cn_image").src) throw new Error("choose a ControlNet control image first");
    body.alwayson_scripts = {controlnet: {args: [{image: $("cn_image").src, module: $("cn_module").value,
      model: $("cn_model").value, weight: num("cn_weight"), guidance_start: num("cn_start"),
      guidance_end: num("cn_end"), control_mode: num("cn_mode"), resize_mode: num("cn_resize"),
      processor_res: Math.min(num("width"), num("height")), enabled: true}]}};
  }
  if ($("refiner_checkpoint").value) {
    Object.assign(body, {refiner_checkpoint: $("refiner_checkpoint").value, refiner_switch_at: num("refiner_switch_at")});
  }
  if (tab === "txt2img" && $("enable_hr").checked) {
    Object.assign(body, {enable_hr: true, hr_upscaler: $("hr_upscaler").value, hr_scale: num("hr_scale"),
      hr_second_pass_steps: num("hr_second_pass_steps"), denoising_strength: num("hr_denoising")});
  }
  if (tab !== "txt2img") {
    if (!$("init").src) throw new Error("choose an init image first");
    body.init_images = [$("init").src];
    body.denoising_strength = num("denoising_strength");
    body.resize_mode = num("resize_mode");
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
    results = r.images.map((b64, i) => ({src: "data:image/png;base64," + b64,
      params: info.infotexts[i] || "ControlNet's detected map"}));
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

// --- ControlNet: the control image and its detected map ---
$("cn_file").addEventListener("change", (e) => e.target.files[0] && readFile(e.target.files[0], (url) => {
  $("cn_image").src = url; $("cn_image").hidden = false;
}));
$("cn_preview").addEventListener("click", async () => {
  if (!$("cn_image").src) { status("choose a ControlNet control image first"); return; }
  try {
    const r = await fetch("/controlnet/detect", {method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({controlnet_module: $("cn_module").value, controlnet_input_images: [$("cn_image").src],
        controlnet_processor_res: Math.min(Number($("width").value), Number($("height").value)),
        controlnet_threshold_a: -1, controlnet_threshold_b: -1})}).then((x) => x.json());
    if (!r.images) throw new Error(r.detail || "detect failed");
    $("cn_map").src = "data:image/png;base64," + r.images[0]; $("cn_map").hidden = false;
  } catch (e) { status("error: " + e.message); }
});

// --- A1111's Extras: upscale the chosen image ---
$("upscale").addEventListener("click", async () => {
  if (chosen < 0) return;
  status("upscaling ...");
  try {
    const r = await api("extra-single-image", {image: results[chosen].src, upscaler_1: $("upscaler_1").value,
      upscaling_resize: Number($("upscaling_resize").value)});
    results.push({src: "data:image/png;base64," + r.image, params: r.html_info || "upscaled"});
    showResults();
    choose(results.length - 1);
    status("upscaled");
  } catch (e) { status("error: " + e.message); }
});

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
