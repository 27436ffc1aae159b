// cai review: the page. Every piece of data is inserted with textContent, never as HTML.
"use strict";
(function () {
  const token = new URLSearchParams(location.search).get("token") || "";
  const $ = (id) => document.getElementById(id);
  const NAMES = { first: "Response 1", second: "Response 2", tie: "a tie", skip: "skip" };
  let view = null;
  let busy = false;

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function say(text) { $("message").textContent = text || ""; }

  async function call(method, path, body) {
    const opts = { method, headers: { "X-Cai-Token": token } };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    const r = await fetch(path, opts);
    let data = null;
    try { data = await r.json(); } catch (e) { data = { error: "HTTP " + r.status }; }
    return { status: r.status, data };
  }

  function render(v) {
    const changed = !view || !v.pair || !view.pair || view.pair.id !== v.pair.id;
    view = v;
    $("who").textContent = "annotator: " + v.annotator;
    const pct = v.total ? (100 * v.done) / v.total : 100;
    $("bar").style.width = pct.toFixed(1) + "%";
    $("progress").setAttribute("aria-valuemax", String(v.total));
    $("progress").setAttribute("aria-valuenow", String(v.done));
    $("count").textContent = v.done + " / " + v.total + " answered";
    $("task").hidden = !v.pair;
    $("finished").hidden = !!v.pair;
    $("outpath").textContent = v.out;
    $("outpath2").textContent = v.out;
    if (v.pair && changed) {
      const conv = $("conversation");
      conv.replaceChildren();
      conv.appendChild(el("div", "hint", "Pair " + v.pair.position + " of " + v.total));
      for (const m of v.pair.prompt) {
        const box = el("div", "msg " + m.role);
        box.appendChild(el("div", "role", m.role));
        box.appendChild(el("div", "content", m.content));
        conv.appendChild(box);
      }
      $("first").textContent = v.pair.responses[0];
      $("second").textContent = v.pair.responses[1];
      $("note").value = "";
      window.scrollTo(0, 0);
    }
    const last = v.last;
    $("last").hidden = !last;
    $("reveal").hidden = !last || !v.reveal;
    if (last) {
      $("lastline").textContent = "Last answered: pair " + last.position + " — you chose " + (NAMES[last.answer] || last.answer) + ". ";
    }
    if (!last || $("revealed").dataset.id !== (last && last.id)) {
      $("revealed").hidden = true;
      $("revealed").replaceChildren();
      delete $("revealed").dataset.id;
    }
    document.querySelectorAll("#buttons button, #undo2").forEach((b) => { b.disabled = false; });
    $("undo").disabled = $("undo2").disabled = !last;
  }

  async function load() {
    const r = await call("GET", "/api/state");
    if (r.status !== 200) return say(r.data.error || "could not load the state");
    say("");
    render(r.data);
  }

  async function act(path, body) {
    if (busy) return;
    busy = true;
    document.querySelectorAll("button").forEach((b) => { b.disabled = true; });
    try {
      const r = await call("POST", path, body);
      if (r.status === 200) { say(""); render(r.data); }
      else if (r.status === 409 && r.data.state) { say(r.data.error); render(r.data.state); }
      else { say(r.data.error || "the server refused that"); render(view); }
    } catch (e) {
      say("cannot reach cai review (was it stopped?): " + e);
      document.querySelectorAll("button").forEach((b) => { b.disabled = false; });
    } finally {
      busy = false;
    }
  }

  function answer(a) {
    if (!view || !view.pair) return;
    act("/api/answer", { id: view.pair.id, answer: a, note: $("note").value });
  }

  function undo() {
    if (view && view.last) act("/api/undo", {});
  }

  function pct(p) { return (100 * p).toFixed(0) + "%"; }

  async function reveal() {
    if (!view || !view.last || !view.reveal) return;
    const id = view.last.id;
    const r = await call("GET", "/api/reveal?id=" + encodeURIComponent(id));
    const box = $("revealed");
    box.replaceChildren();
    box.dataset.id = id;
    box.hidden = false;
    if (r.status !== 200) { box.appendChild(el("p", "", r.data.error || "not available")); return; }
    const d = r.data;
    if (d.p_first === null || d.p_first === undefined) {
      box.appendChild(el("p", "", "This pair has no AI label."));
    } else {
      const side = d.p_first > 0.5 ? "Response 1" : d.p_first < 0.5 ? "Response 2" : "neither (a tie)";
      const who = d.label_source === "ai" ? "The judge" + (d.model ? " (" + d.model + ")" : "") : "The existing label (" + d.label_source + ")";
      box.appendChild(el("p", "", who + " gives Response 1 " + pct(d.p_first) + " and Response 2 " + pct(1 - d.p_first) +
        ": it prefers " + side + ". You chose " + (NAMES[d.your_answer] || d.your_answer) + "."));
    }
    if (d.principles.length) box.appendChild(el("p", "", "Principles: " + d.principles.join(", ") + (d.method ? " (" + d.method + ")" : "")));
    if (d.rounds.length && d.initial_is) {
      const rev = d.initial_is === "first" ? "Response 2" : "Response 1";
      const ini = d.initial_is === "first" ? "Response 1" : "Response 2";
      box.appendChild(el("p", "", ini + " is the model's initial answer; " + rev + " is its revision after these critiques:"));
      for (const s of d.rounds) {
        const step = el("div", "step");
        step.appendChild(el("b", "", s.principle));
        step.appendChild(el("div", "text", s.critique));
        box.appendChild(step);
      }
    }
  }

  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const t = ev.target;
    if (t && (t.tagName === "TEXTAREA" || t.tagName === "INPUT")) {
      if (ev.key === "Escape") t.blur();
      return;
    }
    const k = ev.key.toLowerCase();
    const acts = { "1": () => answer("first"), "2": () => answer("second"), t: () => answer("tie"),
      s: () => answer("skip"), u: undo, r: reveal, n: () => $("note").focus() };
    if (acts[k]) { ev.preventDefault(); acts[k](); }
  });
  document.querySelectorAll("#buttons button[data-answer]").forEach((b) => {
    b.addEventListener("click", () => answer(b.dataset.answer));
  });
  $("undo").addEventListener("click", undo);
  $("undo2").addEventListener("click", undo);
  $("reveal").addEventListener("click", reveal);
  load();
})();
