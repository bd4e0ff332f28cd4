// The chat page of `python -m infer serve` (issue 16, "Present"): a client of the agent HTTP API
// (/v1/agent/...). Sessions on the left, the conversation on the right, replies streamed over the SSE
// of POST /v1/agent/sessions/{id}/messages. Model output is never parsed as HTML: every piece of text
// reaches the page through textContent (fenced code included, shown in <pre>), so an answer holding
// "<script>" shows as those characters. No dependencies, no build step.
"use strict";

const API = "/v1/agent";
const KEY_STORAGE = "jaxlm.apiKey";

const $ = (id) => document.getElementById(id);
const els = {
  sessions: $("sessions"), newSession: $("new-session"), title: $("session-title"), backend: $("backend"),
  maxTokens: $("max-tokens"), temperature: $("temperature"), error: $("error"), messages: $("messages"), composer: $("composer"), input: $("input"), send: $("send"),
  stop: $("stop"), keyForm: $("key-form"), key: $("api-key"), forgetKey: $("forget-key"),
};

const state = {
  sessions: [],
  current: null,        // the open session's id (also in location.hash, so a reload reopens it)
  streaming: null,      // {controller, bubble} while a reply streams
  retry: null,          // what to run again once an API key is given
};

// ---- HTTP ----------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = localStorage.getItem(KEY_STORAGE);
  if (key) h["Authorization"] = "Bearer " + key;  // sent only once the server has asked for a key
  return h;
}

async function errorOf(response) {
  let message = response.status + " " + response.statusText;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status line */ }
  if (response.status === 503) message = "The server is not ready: " + message;
  return new ApiError(response.status, message);
}

async function api(method, path, body, init) {
  const opts = Object.assign({method, headers: headers(body === undefined ? {} : {"Content-Type": "application/json"})},
                             init || {});
  if (body !== undefined) opts.body = JSON.stringify(body);
  const response = await fetch(API + path, opts);
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function apiJson(method, path, body) {
  return (await api(method, path, body)).json();
}

// ---- errors and the API key ---------------------------------------------------------------------

function showError(message) {
  els.error.textContent = message;
  els.error.hidden = false;
}

function clearError() {
  els.error.hidden = true;
  els.error.textContent = "";
}

// Run `action`; a 401 opens the key form (and `action` runs again once a key is given), any other
// failure is shown in the page.
async function guarded(action) {
  try {
    clearError();
    return await action();
  } catch (e) {
    if (e.name === "AbortError") return undefined;
    if (e instanceof ApiError && e.status === 401) {
      state.retry = action;
      els.keyForm.hidden = false;
      showError("This server needs an API key: " + e.message);
      els.key.focus();
    } else {
      showError(e instanceof ApiError ? e.message : "Cannot reach the server: " + e.message);
    }
    return undefined;
  }
}

els.keyForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const key = els.key.value.trim();
  if (!key) return;
  localStorage.setItem(KEY_STORAGE, key);
  els.key.value = "";
  els.keyForm.hidden = true;
  const retry = state.retry || loadSessions;
  state.retry = null;
  guarded(retry).then(() => loadBackends());
});

els.forgetKey.addEventListener("click", () => {
  localStorage.removeItem(KEY_STORAGE);
  els.key.value = "";
});

// ---- rendering (textContent only) ---------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Message text as paragraphs and fenced code blocks. A fence still open (mid-stream) shows as code so far.
function renderContent(container, text) {
  const parts = [];
  const lines = text.split("\n");
  let prose = [], code = null;
  for (const line of lines) {
    const fence = /^\s*```\s*([\w+#.-]*)\s*$/.exec(line);
    if (code === null && fence) {
      if (prose.length) parts.push({kind: "text", text: prose.join("\n")});
      prose = [];
      code = {kind: "code", lang: fence[1], lines: []};
    } else if (code !== null && /^\s*```\s*$/.test(line)) {
      parts.push({kind: "code", lang: code.lang, text: code.lines.join("\n")});
      code = null;
    } else if (code !== null) {
      code.lines.push(line);
    } else {
      prose.push(line);
    }
  }
  if (code !== null) parts.push({kind: "code", lang: code.lang, text: code.lines.join("\n"), open: true});
  if (prose.length) parts.push({kind: "text", text: prose.join("\n")});

  const nodes = parts.map((p) => {
    if (p.kind === "text") return el("div", "text", p.text);
    const wrap = el("div", "code");
    const bar = el("div", "code-bar");
    bar.append(el("span", "code-lang", p.lang || "code"));
    const copy = el("button", "copy", "Copy");
    copy.type = "button";
    copy.setAttribute("aria-label", "Copy code");
    copy.addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText(p.text));
    bar.append(copy);
    const pre = el("pre");
    pre.append(el("code", null, p.text));
    wrap.append(bar, pre);
    return wrap;
  });
  container.replaceChildren(...nodes);
}

function describeRemoved(removed) {
  const entries = Object.entries(removed || {}).filter(([, n]) => n > 0);
  if (!entries.length) return "";
  return "removed from the message: " + entries.map(([k, n]) => n + " " + k.replace("_", "-")).join(", ");
}

// One message bubble; returns the parts a stream updates.
function addMessage(role, text, meta) {
  const item = el("li", "message " + role);
  item.dataset.role = role;
  const label = el("div", "role", {user: "You", assistant: "Assistant", system: "System prompt"}[role] || role);
  const body = el("div", "content");
  const info = el("div", "meta");
  item.append(label, body, info);
  renderContent(body, text || "");
  setMeta(item, meta || {});
  els.messages.append(item);
  els.messages.scrollTop = els.messages.scrollHeight;
  return item;
}

// Keep the newest text in view while it streams, unless the reader scrolled up to read something else.
function followStream(update) {
  const box = els.messages;
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  update();
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function setMeta(item, meta) {
  const info = item.querySelector(".meta");
  const bits = [];
  if (item.dataset.role === "assistant") {
    if (meta.backend) bits.push(["model", meta.backend]);
    if (meta.reason) bits.push(["route", meta.reason]);
    if (meta.finish_reason && meta.finish_reason !== "stop") bits.push(["finished", meta.finish_reason]);
  }
  const removed = describeRemoved(meta.removed);
  if (removed && item.dataset.role === "user") bits.push(["note", removed]);
  info.replaceChildren(...bits.map(([k, v]) => {
    const span = el("span", "meta-" + k);
    span.append(el("span", "meta-key", k + ": "), el("span", "meta-value", v));
    return span;
  }));
  info.hidden = bits.length === 0;
}

function renderMessages(messages, system) {
  els.messages.replaceChildren();
  if (system) addMessage("system", system);
  for (const m of messages) {
    if (m.role === "system") continue;
    addMessage(m.role, m.content, m.meta || {});
  }
}

function renderSessions() {
  const items = state.sessions.map((s) => {
    const li = el("li", "session");
    li.dataset.id = s.id;
    if (s.id === state.current) li.classList.add("active");
    const open = el("button", "session-open", s.title || "Untitled");
    open.type = "button";
    open.title = s.title || "Untitled";
    if (s.id === state.current) open.setAttribute("aria-current", "true");
    open.addEventListener("click", () => guarded(() => openSession(s.id)));
    const rename = el("button", "session-rename", "Rename");
    rename.type = "button";
    rename.setAttribute("aria-label", "Rename " + (s.title || "Untitled"));
    rename.addEventListener("click", () => startRename(li, s));
    const del = el("button", "session-delete", "Delete");
    del.type = "button";
    del.setAttribute("aria-label", "Delete " + (s.title || "Untitled"));
    del.addEventListener("click", () => deleteClicked(del, s));
    const actions = el("div", "session-actions");
    actions.append(rename, del);
    li.append(open, actions);
    return li;
  });
  els.sessions.replaceChildren(...items);
}

function startRename(li, session) {
  const form = el("form", "rename-form");
  const label = el("label", "visually-hidden", "New title");
  const input = el("input");
  input.id = "rename-" + session.id;
  label.htmlFor = input.id;
  input.value = session.title || "";
  input.maxLength = 200;
  const save = el("button", "primary", "Save");
  save.type = "submit";
  form.append(label, input, save);
  li.replaceChildren(form);
  input.focus();
  input.select();
  const cancel = () => renderSessions();
  input.addEventListener("keydown", (ev) => { if (ev.key === "Escape") cancel(); });
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const title = input.value.trim();
    if (!title) return cancel();
    guarded(async () => {
      const renamed = await apiJson("PATCH", "/sessions/" + encodeURIComponent(session.id), {title});
      if (state.current === renamed.id) els.title.textContent = renamed.title || "Untitled";
      await loadSessions();
    }).then(() => renderSessions());
  });
}

// Delete takes two clicks: the first turns the button into "Confirm delete" for a few seconds.
function deleteClicked(button, session) {
  if (button.dataset.armed !== "1") {
    button.dataset.armed = "1";
    button.textContent = "Confirm delete";
    button.classList.add("danger");
    setTimeout(() => {
      if (button.isConnected) {
        button.dataset.armed = "";
        button.textContent = "Delete";
        button.classList.remove("danger");
      }
    }, 4000);
    return;
  }
  guarded(async () => {
    await apiJson("DELETE", "/sessions/" + encodeURIComponent(session.id));
    if (state.current === session.id) newChat();
    await loadSessions();
  });
}

// ---- sessions -----------------------------------------------------------------------------------

async function loadSessions() {
  const body = await apiJson("GET", "/sessions");
  state.sessions = body.data || [];
  renderSessions();
}

async function loadBackends() {
  try {
    const body = await apiJson("GET", "/backends");
    const keep = els.backend.value;
    const options = [el("option", null, "auto (routed)")];
    options[0].value = "";
    for (const b of body.data || []) {
      const o = el("option", null, b.name + (b.local ? " (local)" : " (remote)") + (b.healthy === false ? " - down" : ""));
      o.value = b.name;
      options.push(o);
    }
    els.backend.replaceChildren(...options);
    els.backend.value = keep;
  } catch (_) { /* the list is a convenience: "auto" always works */ }
}

async function openSession(id) {
  stopStreaming();
  const session = await apiJson("GET", "/sessions/" + encodeURIComponent(id));
  state.current = session.id;
  history.replaceState(null, "", "#session=" + encodeURIComponent(session.id));
  els.title.textContent = session.title || "Untitled";
  renderMessages(session.messages || [], session.system);
  renderSessions();
  els.input.focus();
}

function newChat() {
  stopStreaming();
  state.current = null;
  history.replaceState(null, "", location.pathname);
  els.title.textContent = "New chat";
  els.messages.replaceChildren();
  renderSessions();
  els.input.focus();
}

els.newSession.addEventListener("click", () => { clearError(); newChat(); });

// ---- sending and streaming ----------------------------------------------------------------------

// A new session's title: the first non-blank line of its first message, without invisible characters (controls,
// zero-width, bidi, tags: the server refuses a title of nothing else), or none (the server names it).
function titleFrom(text) {
  const line = text.split("\n").map((l) => l.replace(/[\p{Cc}\p{Cf}]/gu, "").trim()).find((l) => l) || "";
  if (!line) return undefined;
  return line.length > 48 ? line.slice(0, 47) + "\u2026" : line;
}

function setStreaming(on) {
  els.send.hidden = on;
  els.stop.hidden = !on;
  els.send.disabled = on;
}

function stopStreaming() {
  if (state.streaming) state.streaming.controller.abort();
}

els.stop.addEventListener("click", () => {
  stopStreaming();
  els.input.focus();
});

// The SSE events of one reply: `data: <json>` blocks separated by a blank line, ending with [DONE].
async function* sseEvents(response, signal) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    while (true) {
      const {done, value} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true}).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  } finally {
    if (signal.aborted) reader.cancel().catch(() => {});
  }
}

async function send(text) {
  if (!state.current) {
    const title = titleFrom(text);
    const session = await apiJson("POST", "/sessions", title ? {title} : {});
    state.current = session.id;
    history.replaceState(null, "", "#session=" + encodeURIComponent(session.id));
    els.title.textContent = session.title || "Untitled";
    await loadSessions();
  }
  const sessionId = state.current;
  const body = {content: text, stream: true};
  if (els.backend.value) body.model = els.backend.value;
  const maxTokens = els.maxTokens.valueAsNumber;
  if (Number.isInteger(maxTokens) && maxTokens > 0) body.max_tokens = maxTokens;
  const temperature = els.temperature.valueAsNumber;
  if (Number.isFinite(temperature)) body.temperature = temperature;  // out of [0, 2]: the server's 400 says so

  const controller = new AbortController();
  const user = addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  bubble.setAttribute("aria-busy", "true");
  state.streaming = {controller, bubble};
  setStreaming(true);
  let reply = "", meta = {};
  try {
    let response;
    try {
      response = await api("POST", "/sessions/" + encodeURIComponent(sessionId) + "/messages", body,
                           {signal: controller.signal});
    } catch (e) {
      user.remove();
      bubble.remove();
      if (!(e instanceof ApiError && e.status === 401)) els.input.value = text;  // a 401 re-sends once a key is given
      throw e;
    }
    meta = {backend: response.headers.get("X-Jaxlm-Backend") || undefined,
            reason: response.headers.get("X-Jaxlm-Route-Reason") || undefined};
    setMeta(bubble, meta);
    for await (const event of sseEvents(response, controller.signal)) {
      if (event.type === "meta") {
        meta = Object.assign(meta, {backend: event.backend, reason: event.reason});
        setMeta(bubble, meta);
        setMeta(user, {removed: event.removed});
      } else if (event.type === "delta") {
        reply += event.text;
        followStream(() => renderContent(bubble.querySelector(".content"), reply));
      } else if (event.type === "done") {
        meta.finish_reason = event.finish_reason;
        setMeta(bubble, meta);
      } else if (event.type === "error" || event.error) {
        throw new ApiError(0, event.message || (event.error && event.error.message) || "the reply failed");
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      meta.finish_reason = "stopped";
      setMeta(bubble, meta);
    } else {
      throw e;
    }
  } finally {
    bubble.classList.remove("streaming");
    bubble.removeAttribute("aria-busy");
    if (bubble.isConnected && !reply && meta.finish_reason !== "stopped") bubble.classList.add("empty");
    if (state.streaming && state.streaming.bubble === bubble) state.streaming = null;
    setStreaming(false);
    if (sessionId === state.current) loadSessions().catch(() => {});
  }
}

els.composer.addEventListener("submit", (ev) => {
  ev.preventDefault();
  if (state.streaming) return;
  const text = els.input.value;
  if (!text.trim()) return;
  els.input.value = "";
  guarded(() => send(text));
});

els.input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    els.composer.requestSubmit();
  }
});

// ---- start --------------------------------------------------------------------------------------

function sessionFromHash() {
  const m = /^#session=(.+)$/.exec(location.hash);
  return m ? decodeURIComponent(m[1]) : null;
}

async function start() {
  await loadSessions();
  loadBackends();
  const id = sessionFromHash();
  if (id && state.sessions.some((s) => s.id === id)) await openSession(id);
  else newChat();
}

guarded(start);
