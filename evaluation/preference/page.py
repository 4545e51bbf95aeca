'''The rating page: one HTML file with its script and style inline (served by `evaluation.preference.server`).

Two players play, pause, loop and seek together: the left one leads, the right one follows its every
play/pause/seek and is pulled back whenever it drifts more than DRIFT_S from the leader. Each axis is one forced
choice (left, no preference, right); a choice is sent at once, so a closed tab loses nothing, and the page moves
to the next axis, then to the next pair; keys pressed while a vote is on its way wait their turn. Keys: A or
Left arrow = left, S or Down arrow = no preference, D or Right arrow = right, W or Up arrow = back to the
previous axis, Space = play/pause, L = loop on/off, R = restart. The rater id comes from `?rater=` or the last
one used in this browser, and the token (when the study has one) from `?token=`.
'''

PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Video preference study</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0; background: #15171a; color: #e8e8e8; }
  header { display: flex; gap: 1.5em; align-items: center; padding: .6em 1em; background: #202329; }
  header input { width: 12em; }
  #label { padding: .6em 1em; font-size: 1.1em; min-height: 1.4em; }
  #players { display: grid; grid-template-columns: 1fr 1fr; gap: .8em; padding: 0 1em; }
  #players figure { margin: 0; text-align: center; }
  video { width: 100%; max-height: 60vh; background: #000; }
  #transport { display: flex; gap: 1em; align-items: center; padding: .6em 1em; }
  #scrub { flex: 1; }
  #axes { padding: 0 1em; }
  .axis { display: grid; grid-template-columns: 9em 1fr 1fr 1fr; gap: .5em; margin: .3em 0; padding: .3em;
          border-radius: 6px; }
  .axis.current { background: #2d3440; outline: 2px solid #5b8def; }
  .axis button { padding: .5em; font-size: 1em; border-radius: 4px; border: 1px solid #555; background: #2a2d33;
                 color: inherit; cursor: pointer; }
  .axis button.chosen { background: #5b8def; color: #fff; border-color: #5b8def; }
  #message { padding: .6em 1em; min-height: 1.2em; color: #f0b429; }
  #help { padding: 0 1em 1em; color: #999; font-size: .9em; }
  #done { display: none; padding: 2em; font-size: 1.3em; }
</style>
</head>
<body>
<header>
  <label>Rater id <input id="rater" autocomplete="off" placeholder="your name or code"></label>
  <button id="start">Start</button>
  <span id="progress"></span>
</header>
<div id="study">
  <div id="label"></div>
  <div id="players">
    <figure><video id="left" muted playsinline loop preload="auto"></video><figcaption>Left (A)</figcaption></figure>
    <figure><video id="right" muted playsinline loop preload="auto"></video><figcaption>Right (D)</figcaption></figure>
  </div>
  <div id="transport">
    <button id="play">Play / pause (Space)</button>
    <input id="scrub" type="range" min="0" max="1000" value="0" aria-label="position">
    <label><input id="loop" type="checkbox" checked> Loop (L)</label>
  </div>
  <div id="axes"></div>
</div>
<div id="done">All pairs rated: thank you.</div>
<div id="message"></div>
<div id="help">Keys: A / &larr; left is better, S / &darr; no preference, D / &rarr; right is better,
  W / &uarr; previous axis, Space play/pause, L loop, R restart both videos.</div>
<script>
"use strict";
const DRIFT_S = 0.05;
const params = new URLSearchParams(location.search);
const token = params.get("token");
const left = document.getElementById("left"), right = document.getElementById("right");
const scrub = document.getElementById("scrub"), loopBox = document.getElementById("loop");
const raterInput = document.getElementById("rater"), message = document.getElementById("message");
let rater = params.get("rater") || localStorage.getItem("lvd-study-rater") || "";
let current = null, axisIndex = 0, scrubbing = false;
raterInput.value = rater;

function withToken(path) {
  if (!token) return path;
  return path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token);
}
function say(text) { message.textContent = text || ""; }

async function loadNext() {
  let response, data;
  try {
    response = await fetch(withToken("/api/next?rater=" + encodeURIComponent(rater)));
    data = await response.json();
  } catch (error) {
    say("the study server did not answer (" + error + "): reload the page to try again");
    return;
  }
  if (!response.ok) { say(data.error); return; }
  showProgress(data.progress);
  if (data.done) {
    current = null;
    document.getElementById("study").style.display = "none";
    document.getElementById("done").style.display = "block";
    return;
  }
  current = data;
  document.getElementById("label").textContent = data.label;
  left.src = withToken(data.left);
  right.src = withToken(data.right);
  left.load(); right.load();
  buildAxes();
  const unvoted = data.axes.findIndex(axis => !(axis in data.voted));
  axisIndex = unvoted < 0 ? 0 : unvoted;
  markAxes();
  left.play().catch(() => {});
}

function showProgress(progress) {
  document.getElementById("progress").textContent =
    "Pairs done: " + progress.done + " / " + progress.total;
}

function buildAxes() {
  const box = document.getElementById("axes");
  box.textContent = "";
  current.axes.forEach((axis, index) => {
    const row = document.createElement("div");
    row.className = "axis";
    row.dataset.axis = axis;
    const name = document.createElement("strong");
    name.textContent = axis;
    row.appendChild(name);
    for (const [choice, text] of [["left", "Left is better"], ["none", "No preference"],
                                  ["right", "Right is better"]]) {
      const button = document.createElement("button");
      button.textContent = text;
      button.dataset.choice = choice;
      button.addEventListener("click", () => enqueue(() => { axisIndex = index; return send(choice); }));
      row.appendChild(button);
    }
    box.appendChild(row);
  });
}

function markAxes() {
  document.querySelectorAll(".axis").forEach((row, index) => {
    row.classList.toggle("current", index === axisIndex);
    const chosen = current.voted[row.dataset.axis];
    row.querySelectorAll("button").forEach(b => b.classList.toggle("chosen", b.dataset.choice === chosen));
  });
}

// Choices and axis moves run one after the other, in the order of the keys: a fast rater's next key waits
// for the vote before it, so it applies to the axis (or pair) that vote led to.
let queue = Promise.resolve();
function enqueue(action) { queue = queue.then(action).catch(error => say(String(error))); }
function choose(choice) { enqueue(() => send(choice)); }
function previousAxis() { enqueue(() => { if (current) { axisIndex = Math.max(0, axisIndex - 1); markAxes(); } }); }

async function send(choice) {
  if (!current) return;
  const axis = current.axes[axisIndex];
  let response, data;
  try {
    response = await fetch(withToken("/api/votes"), {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({pair: current.pair, rater: rater, axis: axis, choice: choice}),
    });
    data = await response.json();
  } catch (error) {
    say("the vote was not sent (" + error + "): choose again");
    return;
  }
  if (!response.ok) { say(data.error); return; }
  say("");
  current.voted[axis] = choice;
  showProgress(data.progress);
  const next = current.axes.findIndex(a => !(a in current.voted));
  if (next < 0) { await loadNext(); } else { axisIndex = next; markAxes(); }
}

// ---- the two players move together: the left one leads
function follow() {
  if (Math.abs(right.currentTime - left.currentTime) > DRIFT_S) right.currentTime = left.currentTime;
}
left.addEventListener("play", () => { follow(); right.play().catch(() => {}); });
left.addEventListener("pause", () => { right.pause(); follow(); });
left.addEventListener("seeked", follow);
left.addEventListener("timeupdate", () => {
  if (!scrubbing && left.duration) scrub.value = Math.round(1000 * left.currentTime / left.duration);
  if (!left.paused) follow();
});
right.addEventListener("play", () => { if (left.paused) right.pause(); });
scrub.addEventListener("input", () => {
  scrubbing = true;
  if (left.duration) {
    const time = left.duration * scrub.value / 1000;
    left.currentTime = time;
    right.currentTime = Math.min(time, right.duration || time);
  }
});
scrub.addEventListener("change", () => { scrubbing = false; });
loopBox.addEventListener("change", () => { left.loop = right.loop = loopBox.checked; });
function togglePlay() { if (left.paused) left.play().catch(() => {}); else left.pause(); }
document.getElementById("play").addEventListener("click", togglePlay);

document.addEventListener("keydown", event => {
  if (event.target === raterInput || event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key.toLowerCase();
  const choices = {"a": "left", "arrowleft": "left", "s": "none", "arrowdown": "none", "d": "right",
                   "arrowright": "right"};
  if (key in choices) { choose(choices[key]); }
  else if (key === "w" || key === "arrowup") { previousAxis(); }
  else if (key === " ") { togglePlay(); }
  else if (key === "l") { loopBox.checked = !loopBox.checked; loopBox.dispatchEvent(new Event("change")); }
  else if (key === "r") { left.currentTime = 0; right.currentTime = 0; }
  else { return; }
  event.preventDefault();
});

function start() {
  const value = raterInput.value.trim();
  if (!/^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$/.test(value)) {
    say("enter a rater id: 1-64 letters, digits, '_', '.', '@' or '-'");
    return;
  }
  rater = value;
  localStorage.setItem("lvd-study-rater", rater);
  document.getElementById("study").style.display = "";
  document.getElementById("done").style.display = "none";
  raterInput.blur();
  say("");
  enqueue(loadNext);
}
document.getElementById("start").addEventListener("click", start);
raterInput.addEventListener("keydown", event => { if (event.key === "Enter") start(); });
if (rater) start(); else say("enter your rater id to begin");
</script>
</body>
</html>
"""
