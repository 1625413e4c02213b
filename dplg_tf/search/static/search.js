"use strict";
const $ = (id) => document.getElementById(id);
let chosen = null;
let latest = 0;   // only the newest search shows its answer

function say(text, error) {
  $("status").textContent = text;
  $("status").classList.toggle("error", !!error);
}

// A server started with --auth_token_file wants "Authorization: Bearer <token>"
// on its API (not on this page): the token typed in #auth is kept for this tab.
function token() { return sessionStorage.getItem("dplg-token") || ""; }

function api(url, options) {
  const headers = token() ? { Authorization: `Bearer ${token()}` } : {};
  return fetch(url, Object.assign({}, options, { headers })).then((response) => {
    if (response.status === 401) $("auth").hidden = false;
    return response;
  });
}

function loadInfo() {
  api("/v1/health").then(async (r) => {
    const h = await r.json().catch(() => ({}));
    if (r.status === 401) throw new Error("waiting for the token");
    if (!r.ok) throw new Error(h.error || `The server answered ${r.status}.`);
    const version = h.model.version === null ? "" : ` version ${h.model.version}`;
    $("info").textContent = `${h.index.vectors} images indexed (${h.index.kind}, ` +
      `${h.model.dim}-d) \u00b7 model ${h.model.name}${version}` +
      (h.status === "ok" ? "" : ` \u00b7 ${h.reason}`);
    $("rerank").checked = !!(h.search && h.search.rerank);
  }).catch((err) => {
    $("info").textContent = err instanceof TypeError ? "the server does not answer"
      : err.message;
  });
}
loadInfo();

$("auth").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("dplg-token", $("token").value.trim());
  $("token").value = "";
  $("auth").hidden = true;
  loadInfo();
  if (chosen) search();
});

function describe(file, doing) {
  $("drop-text").textContent = `${file.name} (${Math.round(file.size / 1024)} KiB): ${doing}`;
}

function choose(file) {
  if (!file) return;
  chosen = file;
  $("go").disabled = false;
  search();
}

function clearResults() {
  $("results").replaceChildren();
  $("query").classList.remove("shown");
  $("query-image").removeAttribute("src");
  $("query-attention").removeAttribute("src");
}

$("file").addEventListener("change", (e) => choose(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("keydown", (e) => {
  if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); }
});
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
  e.preventDefault(); drop.classList.add("over");
}));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => {
  e.preventDefault(); drop.classList.remove("over");
}));
drop.addEventListener("drop", (e) => choose(e.dataTransfer.files[0]));
$("form").addEventListener("submit", (e) => { e.preventDefault(); search(); });
$("top_k").addEventListener("change", () => { if (chosen) search(); });
$("rerank").addEventListener("change", () => { if (chosen) search(); });

async function search() {
  if (!chosen) { say("Choose a query image first."); return; }
  const body = new FormData();
  body.append("image", chosen);
  body.append("top_k", $("top_k").value);
  body.append("attention", "true");
  body.append("rerank", $("rerank").checked ? "true" : "false");
  const mine = ++latest;
  $("go").disabled = true;
  describe(chosen, "searching\u2026");
  say("Searching\u2026");
  try {
    const response = await api("/v1/search", { method: "POST", body });
    const answer = await response.json().catch(() => ({}));
    if (mine !== latest) return;
    if (response.ok) {
      show(answer);
    } else {
      clearResults();
      say(answer.error || `The server answered ${response.status}.`, true);
    }
  } catch (err) {
    if (mine !== latest) return;
    clearResults();
    say(`The search failed: ${err}`, true);
  } finally {
    if (mine === latest) {
      $("go").disabled = false;
      describe(chosen, "drop another image, or press Enter / click to choose one.");
    }
  }
}

function show(answer) {
  $("query-image").src = URL.createObjectURL(chosen);
  if (answer.attention) $("query-attention").src = answer.attention;
  else $("query-attention").removeAttribute("src");
  $("query").classList.add("shown");
  const list = $("results");
  list.replaceChildren();
  answer.results.forEach((hit, i) => {
    const item = document.createElement("li");
    const link = document.createElement("a");
    if (hit.image) { link.href = hit.image; link.target = "_blank"; }
    link.setAttribute("aria-label", `rank ${i + 1}: ${hit.name}, score ${hit.score.toFixed(4)}`);
    const img = document.createElement(hit.image ? "img" : "div");
    img.className = "thumb";
    if (hit.image && token()) {   // an <img> cannot send the token: fetch it
      img.alt = hit.name;
      api(hit.image).then((r) => (r.ok ? r.blob() : null)).then((blob) => {
        if (blob) { img.src = URL.createObjectURL(blob); link.href = img.src; }
      });
    } else if (hit.image) { img.src = hit.image; img.alt = hit.name; img.loading = "lazy"; }
    const rank = document.createElement("div");
    rank.innerHTML = `<span class="rank">#${i + 1}</span> <span class="score"></span>`;
    rank.querySelector(".score").textContent = hit.score.toFixed(4);
    const name = document.createElement("div");
    name.className = "name"; name.textContent = hit.name.split("/").pop(); name.title = hit.name;
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.innerHTML = "<span></span>";
    bar.firstChild.style.width = `${Math.max(0, Math.min(1, hit.score)) * 100}%`;
    link.append(img, rank, name, bar);
    item.append(link);
    list.append(item);
  });
  say(`${answer.results.length} results in ${answer.took_ms} ms.`);
}
