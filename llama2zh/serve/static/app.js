// The page of `llama2zh serve`: story mode (POST /v1/completions) and chat mode (POST /v1/chat/completions),
// replies streamed as server-sent events read from fetch()'s body, a stop button (AbortController: the server
// sees the connection close and frees the slot), and tokens/s. No build step, nothing loaded from elsewhere.
"use strict";

const STRINGS = {
  zh: {
    story: "故事", chat: "对话", settings: "设置", temperature: "温度", temperatureHint: "0 为贪心解码，越高越随机",
    maxTokens: "最大生成长度", auto: "自动", context: "留空则用完剩余的上下文（共 {n} 个 token）",
    system: "系统提示", systemPlaceholder: "例如：你是一个会讲故事的助手。",
    apiKey: "API 密钥", optional: "可选", apiKeyHint: "服务器设了 API 密钥时需要；保存在本浏览器",
    storyEmpty: "写下故事的开头，模型会接着写下去。", chatEmpty: "你好！问我点什么吧。",
    storyPlaceholder: "从前，有一个小女孩……（Enter 续写，Shift+Enter 换行）",
    chatPlaceholder: "输入消息……（Enter 发送，Shift+Enter 换行）",
    storySend: "续写", chatSend: "发送", stop: "停止", clear: "清空", newChat: "新对话",
    you: "你", assistant: "助手", noChat: "这个模型的分词器没有对话模板，只能续写故事",
    modelTitle: "服务器上的模型",
    generating: "生成中…", done: "完成", stopped: "已停止", length: "已达到最大长度",
    stats: "{n} 个 token · {tps} token/秒 · {s} 秒", live: "约 {n} 个 token · {tps} token/秒",
    error: "错误", network: "连不上服务器", lang: "English",
  },
  en: {
    story: "Story", chat: "Chat", settings: "Settings", temperature: "Temperature",
    temperatureHint: "0 is greedy; higher is more random",
    maxTokens: "Max tokens", auto: "auto", context: "empty: the rest of the context ({n} tokens)",
    system: "System prompt", systemPlaceholder: "e.g. You are a helpful storyteller.",
    apiKey: "API key", optional: "optional",
    apiKeyHint: "needed if the server has an API key; kept in this browser",
    storyEmpty: "Write the beginning of a story; the model goes on with it.", chatEmpty: "Hello! Ask me something.",
    storyPlaceholder: "Once upon a time… (Enter continues, Shift+Enter new line)",
    chatPlaceholder: "Type a message… (Enter sends, Shift+Enter new line)",
    storySend: "Continue", chatSend: "Send", stop: "Stop", clear: "Clear", newChat: "New chat",
    you: "You", assistant: "Assistant", noChat: "This model's tokenizer has no chat template: story mode only",
    modelTitle: "the model on the server",
    generating: "Generating…", done: "Done", stopped: "Stopped", length: "Reached max tokens",
    stats: "{n} tokens · {tps} tokens/s · {s} s", live: "≈{n} tokens · {tps} tokens/s",
    error: "Error", network: "cannot reach the server", lang: "中文",
  },
};

const $ = (id) => document.getElementById(id);
const store = {
  get: (key, fallback) => { try { return localStorage.getItem("llama2zh." + key) ?? fallback; } catch { return fallback; } },
  set: (key, value) => { try { localStorage.setItem("llama2zh." + key, value); } catch { /* private mode */ } },
};

const state = {
  lang: store.get("lang", "zh") === "en" ? "en" : "zh",
  mode: "story",
  canChat: true,
  history: [],       // the chat so far: {role, content}, without the system prompt
  controller: null,  // the request in flight
  status: "",        // key of STRINGS for the state line
  stats: null,       // {n, tps, s, live}
};

function t(key, values = {}) {
  return STRINGS[state.lang][key].replace(/\{(\w+)\}/g, (_, name) => values[name]);
}

function applyLanguage() {
  document.documentElement.lang = state.lang === "zh" ? "zh-CN" : "en";
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of document.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
  for (const el of document.querySelectorAll("[data-i18n-title]")) el.title = t(el.dataset.i18nTitle);
  $("lang").textContent = t("lang");
  $("lang").lang = state.lang === "zh" ? "en" : "zh-CN";
  $("mode-chat").title = state.canChat ? "" : t("noChat");
  const hint = $("max-tokens-hint");
  hint.textContent = hint.dataset.context ? t("context", { n: hint.dataset.context }) : "";
  applyMode();
  showStatus();
}

function applyMode() {
  const chat = state.mode === "chat";
  $("story").hidden = chat;
  $("chat").hidden = !chat;
  for (const el of document.querySelectorAll(".chat-only")) el.hidden = !chat;
  for (const button of document.querySelectorAll(".modes button")) {
    button.setAttribute("aria-selected", String(button.dataset.mode === state.mode));
  }
  $("input").placeholder = t(chat ? "chatPlaceholder" : "storyPlaceholder");
  $("send").textContent = t(chat ? "chatSend" : "storySend");
  $("clear").textContent = t(chat ? "newChat" : "clear");
  for (const who of document.querySelectorAll(".message .who")) who.textContent = t(who.dataset.role);
}

function setMode(mode) {
  if (state.controller || (mode === "chat" && !state.canChat)) return;
  state.mode = mode;
  store.set("mode", mode);
  applyMode();
  $("input").focus();
}

function showStatus() {
  $("state").textContent = state.status ? t(state.status) : "";
  $("state").dataset.state = state.status;
  const s = state.stats;
  $("stats").textContent = s ? t(s.live ? "live" : "stats", { n: s.n, tps: s.tps.toFixed(1), s: s.s.toFixed(2) }) : "";
  $("stats").dataset.tps = s && !s.live ? String(s.tps) : "";  // the final figures, for scripts
  $("stats").dataset.tokens = s && !s.live ? String(s.n) : "";
}

function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = !message;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("clear").disabled = busy;
  for (const button of document.querySelectorAll(".modes button")) {
    button.disabled = busy || (button.dataset.mode === "chat" && !state.canChat);
  }
  document.body.classList.toggle("busy", busy);
}

function scrollDown(el) {
  el.scrollTop = el.scrollHeight;
}

// ---- talking to the server ----

function headers() {
  const key = $("api-key").value.trim();
  return { "Content-Type": "application/json", ...(key ? { Authorization: "Bearer " + key } : {}) };
}

function settings() {
  const body = { temperature: Number($("temperature").value), top_p: Number($("top-p").value),
                 stream: true, stream_options: { include_usage: true } };
  const max = $("max-tokens").value.trim();
  if (max) body.max_tokens = Number(max);
  return body;
}

class ServerError extends Error {}

async function errorOf(response) {
  let message = response.statusText;
  try { message = (await response.json()).error.message; } catch { /* not OpenAI's error object */ }
  return new ServerError(`${t("error")} ${response.status}: ${message}`);
}

// POSTs body to path and calls onText with each piece of the reply as it comes; resolves to
// {finish, tokens (from the usage, or null)}; rejects with an AbortError when stopped.
async function stream(path, body, onText, signal) {
  let response;
  try {
    response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ServerError(`${t("error")}: ${t("network")} (${e.message})`);
  }
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", finish = null, tokens = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return { finish, tokens };
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return { finish, tokens };
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ServerError(`${t("error")}: ${chunk.error.message}`);
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        for (const choice of chunk.choices || []) {
          const text = choice.delta ? choice.delta.content : choice.text;
          if (text) onText(text);
          finish = choice.finish_reason || finish;
        }
      }
    }
  }
}

// Runs one request: the live tokens/s while it streams, the final one from the usage, the stop button.
async function generate(path, body, onText) {
  const controller = new AbortController();
  state.controller = controller;
  state.status = "generating";
  state.stats = null;
  showError("");
  setBusy(true);
  showStatus();
  const start = performance.now();
  let pieces = 0;
  const seconds = () => Math.max(performance.now() - start, 1) / 1000;
  try {
    const { finish, tokens } = await stream(path, body, (text) => {
      pieces += 1;  // a piece is a token, or a few when one ends a multi-byte character
      onText(text);
      state.stats = { n: pieces, tps: pieces / seconds(), s: seconds(), live: true };
      showStatus();
    }, controller.signal);
    const n = tokens ?? pieces;
    state.stats = { n, tps: n / seconds(), s: seconds(), live: false };
    state.status = finish === "length" ? "length" : "done";
    return true;
  } catch (e) {
    if (e.name === "AbortError") {
      state.status = "stopped";
      if (state.stats) state.stats.live = true;
      return true;
    }
    state.status = "";
    state.stats = null;
    showError(e instanceof ServerError ? e.message : `${t("error")}: ${e.message}`);
    return false;
  } finally {
    state.controller = null;
    setBusy(false);
    showStatus();
  }
}

// ---- story mode ----

async function sendStory(prompt) {
  const out = $("story-out");
  out.replaceChildren();
  const head = document.createElement("span");
  head.className = "prompt";
  head.textContent = prompt;
  const reply = document.createElement("span");
  reply.className = "reply";
  reply.id = "story-reply";
  out.append(head, reply, cursor());
  const ok = await generate("/v1/completions", { ...settings(), prompt }, (text) => {
    reply.append(text);
    scrollDown(out);
  });
  out.querySelector(".cursor")?.remove();
  if (!ok) $("input").value = prompt;
}

function cursor() {
  const el = document.createElement("span");
  el.className = "cursor";
  return el;
}

// ---- chat mode ----

function bubble(role, text) {
  const el = document.createElement("div");
  el.className = "message " + role;
  const who = document.createElement("div");
  who.className = "who";
  who.dataset.role = role === "user" ? "you" : "assistant";
  who.textContent = t(who.dataset.role);
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  el.append(who, content);
  $("messages").querySelector(".empty")?.remove();
  $("messages").append(el);
  scrollDown($("messages"));
  return content;
}

async function sendChat(text) {
  const system = $("system").value.trim();
  const turn = { role: "user", content: text };
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...state.history, turn];
  const asked = bubble("user", text).parentElement;
  const content = bubble("assistant", ""), caret = cursor();
  content.append(caret);
  let reply = "";
  const ok = await generate("/v1/chat/completions", { ...settings(), messages }, (piece) => {
    reply += piece;
    caret.before(piece);
    scrollDown($("messages"));
  });
  caret.remove();
  if (ok) {
    state.history.push(turn, { role: "assistant", content: reply });
  } else {  // the turn did not happen: its text back in the box
    asked.remove();
    content.parentElement.remove();
    $("input").value = text;
  }
}

function clear() {
  const chat = state.mode === "chat", empty = document.createElement("p");
  if (chat) state.history = [];
  empty.className = "empty";
  empty.dataset.i18n = chat ? "chatEmpty" : "storyEmpty";
  empty.textContent = t(empty.dataset.i18n);
  $(chat ? "messages" : "story-out").replaceChildren(empty);
  state.status = "";
  state.stats = null;
  showError("");
  showStatus();
  $("input").focus();
}

// ---- wiring ----

function bindRange(id) {
  const input = $(id), output = $(id + "-value");
  const show = () => { output.textContent = String(Number(input.value)); };
  input.addEventListener("input", show);
  show();
}

async function loadHealth() {
  try {
    const response = await fetch("/health");
    if (!response.ok) throw await errorOf(response);
    const health = await response.json();
    $("model-name").textContent = health.model;
    $("model").classList.add("up");
    state.canChat = health.chat !== false;
    if (health.context) $("max-tokens-hint").dataset.context = health.context;
  } catch (e) {
    showError(e instanceof ServerError ? e.message : `${t("error")}: ${t("network")}`);
  }
  if (!state.canChat && state.mode === "chat") state.mode = "story";
  setBusy(false);
  applyLanguage();
  document.body.dataset.ready = "1";
}

function init() {
  state.mode = store.get("mode", "story") === "chat" ? "chat" : "story";
  $("api-key").value = store.get("apiKey", "");
  $("api-key").addEventListener("input", () => store.set("apiKey", $("api-key").value.trim()));
  $("settings").addEventListener("submit", (e) => e.preventDefault());
  bindRange("temperature");
  bindRange("top-p");
  for (const button of document.querySelectorAll(".modes button")) {
    button.addEventListener("click", () => setMode(button.dataset.mode));
  }
  $("lang").addEventListener("click", () => {
    state.lang = state.lang === "zh" ? "en" : "zh";
    store.set("lang", state.lang);
    applyLanguage();
  });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value;
    if (state.controller || !text.trim()) return;
    $("input").value = "";
    if (state.mode === "chat") sendChat(text); else sendStory(text);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("clear").addEventListener("click", clear);
  $("error-close").addEventListener("click", () => showError(""));
  applyLanguage();
  loadHealth();
}

init();
