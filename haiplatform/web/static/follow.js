// Follow a rank's log: poll the dashboard for the bytes after the last offset and append them.
// No framework, nothing fetched from elsewhere; the text goes in as text (never as HTML).
"use strict";
(function () {
  const pre = document.getElementById("log");
  const state = document.getElementById("follow-state");
  const statusEl = document.getElementById("job-status");
  if (!pre) return;
  let offset = Number(pre.dataset.offset || "0");
  const attempt = pre.dataset.attempt;
  const ended = new Set(["succeeded", "failed", "stopped", "canceled"]);
  const decoder = new TextDecoder("utf-8");
  let quietAfterEnd = 0;
  if (state) state.textContent = "following…";

  function atBottom() {
    return window.innerHeight + window.scrollY >= document.body.scrollHeight - 40;
  }

  async function poll() {
    const url = pre.dataset.more + "?offset=" + offset + (attempt ? "&attempt=" + encodeURIComponent(attempt) : "");
    let resp;
    try {
      resp = await fetch(url, { credentials: "same-origin", cache: "no-store" });
    } catch (e) {
      if (state) state.textContent = "connection lost; retrying…";
      return setTimeout(poll, 3000);
    }
    const next = resp.headers.get("X-Log-Offset-Next");
    if (!resp.ok || next === null) {  // logged out, or the job went away: say so and stop
      if (state) state.textContent = "stopped following (" + resp.status + "); reload the page";
      return;
    }
    const bytes = new Uint8Array(await resp.arrayBuffer());
    const follow = atBottom();
    if (bytes.length) {
      pre.appendChild(document.createTextNode(decoder.decode(bytes, { stream: true })));
      if (follow) window.scrollTo(0, document.body.scrollHeight);
    }
    offset = Number(next);
    const status = resp.headers.get("X-Job-Status") || "";
    if (statusEl && status) { statusEl.textContent = status; statusEl.className = "status " + status; }
    if (ended.has(status) && !bytes.length && ++quietAfterEnd >= 2) {
      if (state) state.textContent = "the job has ended; the log is complete";
      return;
    }
    if (state) state.textContent = "following (" + offset + " bytes)";
    setTimeout(poll, bytes.length ? 300 : 1000);
  }
  setTimeout(poll, 500);
})();
