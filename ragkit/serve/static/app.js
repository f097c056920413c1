// The search page: plain DOM, no build step, no outside resources. Text from the index is only ever set
// through textContent, so a passage cannot inject markup into the page.
"use strict";

const $ = (id) => document.getElementById(id);
let apiKey = sessionStorage.getItem("ragkit-api-key") || "";

function headers() {
  const h = { "content-type": "application/json" };
  if (apiKey) h["x-api-key"] = apiKey;
  return h;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").classList.toggle("error", Boolean(isError));
}

async function call(path, body) {
  const response = await fetch(path, body === undefined ? { headers: headers() }
    : { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const data = await response.json();
  if (response.status === 401) {
    $("key-box").hidden = false;
    throw new Error("this server needs an API key: enter it and search again");
  }
  if (!response.ok) throw new Error(data.error ? data.error.message : response.statusText);
  return data;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function render(row) {
  const list = $("results");
  list.replaceChildren();
  for (const hit of row.hits) {
    const item = element("li", "hit");
    item.dataset.id = hit.id;
    const head = element("div", "head");
    head.append(element("span", "rank", "#" + hit.rank), element("span", "score", hit.score.toFixed(4)));
    if (hit.title) head.append(element("span", "title", hit.title));
    head.append(element("span", "id", hit.id));
    if (hit.ranks) {
      const side = (r) => (r === null ? "–" : "#" + r);
      head.append(element("span", "ranks", "dense " + side(hit.ranks.dense) + " · sparse " + side(hit.ranks.sparse)));
    }
    item.append(head, element("p", "text", hit.text));
    list.append(item);
  }
}

async function search(event) {
  if (event) event.preventDefault();
  if (!$("key-box").hidden) {
    apiKey = $("key").value;
    sessionStorage.setItem("ragkit-api-key", apiKey);
  }
  const query = $("q").value.trim();
  if (!query) return;
  const k = parseInt($("k").value, 10) || 10;
  const mode = $("mode").value;
  history.replaceState(null, "", "?" + new URLSearchParams({ q: query, k: String(k), mode }));
  setStatus("searching…");
  const began = performance.now();
  try {
    const data = await call("/search", { query, k, mode });
    const row = data.results[0];
    render(row);
    const ms = Math.round(performance.now() - began);
    setStatus(row.hits.length + " hits in " + ms + " ms (index version " + data.version + ")");
  } catch (error) {
    $("results").replaceChildren();
    setStatus(error.message, true);
  }
}

async function start() {
  const params = new URLSearchParams(location.search);
  if (params.get("q")) $("q").value = params.get("q");
  if (params.get("k")) $("k").value = params.get("k");
  if (params.get("mode")) $("mode").value = params.get("mode");
  $("search").addEventListener("submit", search);
  try {
    const info = await call("/info");
    const index = info.index || {};
    $("about").textContent = (index.path || "index") + " · " + (index.passages ?? "?") + " passages · version "
      + info.version + " · " + (index.embedder || "") + (info.sparse ? " · BM25 side" : "");
    if (!info.sparse) {
      for (const option of $("mode").options) option.disabled = option.value !== "dense";
      $("mode").value = "dense";
    }
    $("k").max = String(info.limits.max_k);
  } catch (error) {
    $("about").textContent = "";
    setStatus(error.message, true);
  }
  if ($("q").value) search();
}

start();
