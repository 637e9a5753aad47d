"use strict";
// The chat page: conversations kept in this browser, images and a video sent as data: URLs, answers streamed from
// /v1/chat/completions, reasoning shown live then folded, grounding boxes drawn over the image they refer to.
(() => {
  const $ = (id) => document.getElementById(id);
  const BOX = /<\|begin_of_box\|>([\s\S]*?)(<\|end_of_box\|>|$)/g;
  const COLORS = ["#ff3030", "#28c8ff", "#ffc800", "#50e650", "#ff50dc", "#ff8c00"];
  const MAX_FILE_MB = 32;
  const KEY = "glm45v.key", STORE = "glm45v.conversations";
  let key = localStorage.getItem(KEY) || "";
  let settings = null, pending = [], controller = null;
  let store = load();

  function load() {
    try {
      const s = JSON.parse(localStorage.getItem(STORE));
      if (s && Array.isArray(s.conversations)) return s;
    } catch (e) { /* a damaged store starts afresh */ }
    return { conversations: [], active: null };
  }

  function save() {
    const plain = (k, v) => (k === "view" ? undefined : v);  // the DOM nodes of a message stay out
    const trySave = (s) => { localStorage.setItem(STORE, JSON.stringify(s, plain)); return true; };
    try { return trySave(store); } catch (e) { /* over the browser's quota: keep text, drop older media */ }
    const slim = JSON.parse(JSON.stringify(store, plain));
    for (const c of slim.conversations) {
      if (c.id === store.active) continue;
      for (const m of c.messages) if (m.media) m.media = m.media.map((x) => ({ ...x, url: null }));
    }
    try { return trySave(slim); } catch (e) {
      showError("this browser's storage is full: the conversation is not kept after a reload");
      return false;
    }
  }

  function active() {
    let c = store.conversations.find((x) => x.id === store.active);
    if (!c) {
      c = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6), title: "New chat", messages: [] };
      store.conversations.unshift(c);
      store.active = c.id;
    }
    return c;
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  // --- the API key and the server's defaults ---------------------------------------------------------------
  async function connect() {
    setReady(false);
    let r;
    try {
      r = await fetch("/ui/settings", { headers: headers() });
    } catch (e) {
      showError("cannot reach the server: " + e.message);
      return;
    }
    if (r.status === 401) return askKey(key ? "that key was refused" : "");
    if (!r.ok) return showError(await errorText(r));
    settings = await r.json();
    $("model-name").textContent = settings.model;
    $("temperature").placeholder = settings.temperature ?? "";
    if ($("temperature").value === "" && settings.temperature != null) $("temperature").value = settings.temperature;
    $("max-tokens").placeholder = settings.max_tokens ?? "as the context allows";
    $("forget-key").hidden = !settings.api_key;
    setReady(true);
  }

  function askKey(message) {
    $("key-error").hidden = !message;
    $("key-error").textContent = message || "";
    $("key-input").value = "";
    if (!$("key-dialog").open) $("key-dialog").showModal();
  }

  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    key = $("key-input").value.trim();
    localStorage.setItem(KEY, key);
    $("key-dialog").close();
    connect();
  });
  $("key-dialog").addEventListener("cancel", (e) => e.preventDefault());
  $("forget-key").addEventListener("click", () => { key = ""; localStorage.removeItem(KEY); connect(); });

  function setReady(ready) {
    $("send").disabled = !ready;
    document.body.dataset.ready = ready ? "yes" : "no";
  }

  async function errorText(r) {
    try {
      const body = await r.json();
      return `${r.status}: ${body.error?.message ?? JSON.stringify(body)}`;
    } catch (e) {
      return `${r.status} ${r.statusText}`;
    }
  }

  // --- attachments -----------------------------------------------------------------------------------------
  function addFiles(files) {
    for (const file of files) {
      const kind = file.type.startsWith("image/") ? "image" : file.type.startsWith("video/") ? "video" : null;
      if (!kind) { showError(`${file.name}: not an image or a video`); continue; }
      if (file.size > MAX_FILE_MB * 2 ** 20) { showError(`${file.name}: over ${MAX_FILE_MB} MiB`); continue; }
      const reader = new FileReader();
      reader.onload = () => { pending.push({ kind, url: reader.result, name: file.name }); renderPreviews(); };
      reader.onerror = () => showError(`${file.name}: cannot be read`);
      reader.readAsDataURL(file);
    }
  }

  function mediaNode(m) {
    if (!m.url) return el("span", "error", `(${m.name}: not kept in this browser)`);
    const node = el(m.kind === "image" ? "img" : "video");
    node.src = m.url;
    if (m.kind === "video") node.controls = true;
    else node.alt = m.name;
    return node;
  }

  function renderPreviews() {
    const box = $("previews");
    box.replaceChildren();
    pending.forEach((m, k) => {
      const p = el("div", "preview");
      p.appendChild(mediaNode(m));
      const x = el("button", "", "\u00d7");
      x.type = "button";
      x.title = "remove " + m.name;
      x.addEventListener("click", () => { pending.splice(k, 1); renderPreviews(); });
      p.appendChild(x);
      box.appendChild(p);
    });
  }

  $("files").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
  $("prompt").addEventListener("paste", (e) => {
    if (e.clipboardData.files.length) { e.preventDefault(); addFiles(e.clipboardData.files); }
  });
  const composer = $("composer");
  for (const name of ["dragenter", "dragover"]) {
    $("main").addEventListener(name, (e) => { e.preventDefault(); composer.classList.add("dragging"); });
  }
  $("main").addEventListener("dragleave", () => composer.classList.remove("dragging"));
  $("main").addEventListener("drop", (e) => {
    e.preventDefault();
    composer.classList.remove("dragging");
    addFiles(e.dataTransfer.files);
  });

  // --- rendering -------------------------------------------------------------------------------------------
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function showError(text) {
    const c = active();
    c.messages.push({ role: "error", text });
    renderConversation();
  }

  function renderSidebar() {
    const list = $("conversations");
    list.replaceChildren();
    for (const c of store.conversations) {
      const li = el("li", c.id === store.active ? "active" : "");
      const open = el("button", "open", c.title);
      open.type = "button";
      open.addEventListener("click", () => { if (!controller) { store.active = c.id; refresh(); } });
      const del = el("button", "delete", "\u00d7");
      del.type = "button";
      del.title = "delete " + c.title;
      del.addEventListener("click", () => {
        if (controller && c.id === store.active) return;
        store.conversations = store.conversations.filter((x) => x !== c);
        if (store.active === c.id) store.active = store.conversations[0]?.id ?? null;
        refresh();
      });
      li.append(open, del);
      list.appendChild(li);
    }
  }

  function renderMessage(m) {
    const node = el("div", "message " + m.role);
    if (m.role === "user") {
      if (m.media?.length) {
        const row = node.appendChild(el("div", "attachments"));
        m.media.forEach((x) => row.appendChild(mediaNode(x)));
      }
      node.appendChild(el("div", "text", m.text)).style.whiteSpace = "pre-wrap";
    } else if (m.role === "error") {
      node.textContent = m.text;
    } else {
      m.view = { node };
      updateAssistant(m);
    }
    return node;
  }

  function updateAssistant(m) {
    const v = m.view;
    if (m.reasoning && !v.details) {
      v.details = el("details", "reasoning");
      v.details.open = !m.content;
      v.summary = v.details.appendChild(el("summary"));
      v.rtext = v.details.appendChild(el("div", "text"));
      v.node.prepend(v.details);
    }
    if (v.details) {
      v.summary.textContent = m.content || !m.streaming ? "reasoning" : "thinking\u2026";
      v.rtext.textContent = m.reasoning;
      if (m.content && !m.folded) { v.details.open = false; m.folded = true; }
    }
    v.answer = v.answer || v.node.appendChild(el("div", "answer"));
    const { text, refs } = boxMarkers(m.content || "", m.boxes || []);
    v.answer.replaceChildren(Markdown.render(text, refs));
    v.figures?.remove();
    v.figures = v.node.appendChild(el("div", "figures"));
    if (m.boxes?.length) drawBoxes(v.figures, m.boxes, m.images || []);
    v.note?.remove();
    const note = m.error ? el("p", "error", m.error) : m.stopped ? el("p", "error", "(stopped)") : null;
    if (note) v.note = v.node.appendChild(note);
  }

  // The content's box markers -> \uE000..\uE001 for the renderer, and per marker pair the boxes inside it.
  function boxMarkers(content, boxes) {
    const refs = [];
    const text = content.replace(BOX, (whole, inner, close, offset) => {
      const start = offset, end = offset + whole.length;
      refs.push(boxes.map((b, k) => [b, k]).filter(([b]) => b.span[0] >= start && b.span[1] <= end).map(([, k]) => k));
      return Markdown.BOX_OPEN + inner + (close ? Markdown.BOX_CLOSE : "");
    });
    return { text, refs };
  }

  // Boxes over the image they refer to, in percentages of its displayed size (right at any size).
  function drawBoxes(parent, boxes, images) {
    const byImage = new Map();
    boxes.forEach((b, k) => {
      if (b.image == null || !images[b.image]) return;
      if (!byImage.has(b.image)) byImage.set(b.image, []);
      byImage.get(b.image).push([b, k]);
    });
    for (const [index, list] of byImage) {
      const fig = parent.appendChild(el("div", "grounded"));
      const img = fig.appendChild(el("img"));
      img.src = images[index];
      img.alt = `image ${index + 1} with its boxes`;
      for (const [b, k] of list) {
        const color = COLORS[k % COLORS.length];
        const mark = fig.appendChild(el("div", b.type === "box" ? "box" : "point"));
        mark.dataset.index = k + 1;
        mark.style.left = b.norm[0] * 100 + "%";
        mark.style.top = b.norm[1] * 100 + "%";
        if (b.type === "box") {
          mark.style.width = (b.norm[2] - b.norm[0]) * 100 + "%";
          mark.style.height = (b.norm[3] - b.norm[1]) * 100 + "%";
        }
        mark.style.borderColor = color;
        const label = mark.appendChild(el("span", "label", String(k + 1)));
        label.style.background = color;
      }
    }
  }

  function renderConversation() {
    const box = $("messages");
    box.replaceChildren(...active().messages.map(renderMessage));
    box.scrollTop = box.scrollHeight;
  }

  function refresh() {
    renderSidebar();
    renderConversation();
    save();
  }

  // --- sending ---------------------------------------------------------------------------------------------
  function apiMessages(messages) {
    const out = [];
    for (const m of messages) {
      if (m.role === "user") {
        const parts = (m.media || []).filter((x) => x.url).map((x) => x.kind === "image"
          ? { type: "image_url", image_url: { url: x.url } } : { type: "video_url", video_url: { url: x.url } });
        out.push({ role: "user", content: [...parts, { type: "text", text: m.text }] });
      } else if (m.role === "assistant" && !m.error) {
        out.push({ role: "assistant", content: m.content || "" });
      }
    }
    return out;
  }

  function imagesOf(messages) {
    return messages.filter((m) => m.role === "user")
      .flatMap((m) => (m.media || []).filter((x) => x.kind === "image" && x.url).map((x) => x.url));
  }

  async function send(e) {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (controller || $("send").disabled || (!text && !pending.length)) return;
    const c = active();
    const user = { role: "user", text, media: pending };
    c.messages.push(user);
    if (c.title === "New chat") c.title = (text || user.media[0].name).slice(0, 48);
    pending = [];
    renderPreviews();
    $("prompt").value = "";
    const history = c.messages.filter((m) => m.role !== "error");
    const reply = { role: "assistant", reasoning: "", content: "", boxes: null, images: imagesOf(history),
                    streaming: true };
    const body = { model: settings.model, messages: apiMessages(history), stream: true,
                   chat_template_kwargs: { enable_thinking: $("thinking").checked } };
    if ($("temperature").value !== "") body.temperature = Number($("temperature").value);
    if ($("max-tokens").value !== "") body.max_tokens = Number($("max-tokens").value);
    c.messages.push(reply);
    refresh();
    controller = new AbortController();
    busy(true);
    let frame = 0;
    const redraw = () => {
      if (!frame) frame = requestAnimationFrame(() => { frame = 0; updateAssistant(reply); follow(); });
    };
    try {
      const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                     signal: controller.signal });
      if (!r.ok) {
        reply.error = await errorText(r);
        if (r.status === 401) askKey("the server refused the key");
      } else {
        await readStream(r, reply, redraw);
      }
    } catch (err) {
      if (err.name === "AbortError") reply.stopped = true;
      else reply.error = "the connection failed: " + err.message;
    } finally {
      controller = null;
      reply.streaming = false;
      cancelAnimationFrame(frame);
      busy(false);
      updateAssistant(reply);
      follow();
      save();
    }
  }

  async function readStream(r, reply, redraw) {
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) !== -1) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) { reply.error = chunk.error.message; continue; }
          for (const choice of chunk.choices || []) {
            const d = choice.delta || {};
            reply.reasoning += d.reasoning_content ?? d.reasoning ?? "";
            reply.content += d.content ?? "";
            if (d.boxes) reply.boxes = d.boxes;
            if (choice.finish_reason === "length") reply.error = "(cut at max tokens)";
          }
        }
        redraw();
      }
    }
  }

  function follow() {
    const box = $("messages");
    box.scrollTop = box.scrollHeight;
  }

  function busy(on) {
    $("send").hidden = on;
    $("stop").hidden = !on;
    document.body.dataset.busy = on ? "yes" : "no";
  }

  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) send(e);
  });
  $("stop").addEventListener("click", () => controller?.abort());
  $("new-chat").addEventListener("click", () => {
    if (controller) return;
    store.active = null;
    active();
    refresh();
    document.body.classList.remove("show-sidebar");
  });
  $("toggle-sidebar").addEventListener("click", () => document.body.classList.toggle("show-sidebar"));

  for (const c of store.conversations) for (const m of c.messages) delete m.streaming;
  active();
  refresh();
  connect();
})();
