"""A blinded reader study, as MediSyn's clinicians did it through a web interface (its Fig. 3):
real and generated images, shuffled and renamed so that nothing about an image's source shows, are
shown one at a time; each reader names the class and a confidence from 1 to 5, and every answer is
appended to `responses.jsonl`.

`build_study` writes the study directory: `images/<token>.png`, `study.json` (the class names and the
tokens, which is all the page sees) and `key.json` (token -> source, family, class; never served).
`serve` runs the page on localhost with the standard library's HTTP server. Requests are checked
before anything touches the file system: an image is served only when its token is in the key, and
an answer is stored only when its reader id, token, class and confidence are all valid.
`reader_table` joins the answers with the key for the report.
"""

import hashlib
import json
import os
import re
import secrets
import threading
import time
import warnings
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
import pandas as pd
from PIL import Image

from medsyn.data.dataset import class_key, class_prompts, image_path, split_records

READER = re.compile(r"[A-Za-z0-9_-]{1,32}")
TOKEN = re.compile(r"[0-9a-f]{16}")


def build_study(
    real_dir: str | Path,
    generated: dict[str, str | Path],
    out_dir: str | Path,
    per_class: int = 2,
    split: str = "test",
    seed: int = 0,
) -> Path:
    """Pick `per_class` real images of each class (from `split`) and `per_class` generated images of
    each family for each class prompt, copy them under random tokens, and write the study files."""
    out_dir = Path(out_dir)
    if (out_dir / "key.json").exists():
        raise FileExistsError(f"{out_dir} already holds a study; answers belong to the images they were given for")
    rng = np.random.default_rng(seed)
    prompts = class_prompts(split_records(real_dir, "train"))
    chosen = []  # (path, source, family, class)
    for family, directory in [("real", Path(real_dir)), *((f, Path(d)) for f, d in generated.items())]:
        records = split_records(directory, split if family == "real" else "train")  # generated: one split
        for key in prompts:
            mine = [r for r in records if class_key(r) == key]
            for i in rng.permutation(len(mine))[:per_class]:
                chosen.append(
                    (image_path(directory, mine[i]), "real" if family == "real" else "synthetic", family, key)
                )
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    key_file, tokens = {}, []
    for path, source, family, cls in chosen:
        token = secrets.token_hex(8)
        write_blinded_png(path, out_dir / "images" / f"{token}.png")
        key_file[token] = {"source": source, "family": family, "class": cls}
        tokens.append(token)
    (out_dir / "key.json").write_text(json.dumps(key_file, indent=1))
    (out_dir / "study.json").write_text(json.dumps({"classes": list(prompts), "images": sorted(tokens)}, indent=1))
    return out_dir


def write_blinded_png(source: str | Path, target: str | Path) -> None:
    """Re-encode an image as every study image is: 8-bit RGB PNG from a fresh pixel array (no text,
    gamma or colour-profile chunks carried over), with the same encoder settings. A real greyscale
    PNG copied as it is would say "real" in its header (colour type 0) to anyone who looks."""
    pixels = np.asarray(Image.open(source).convert("RGB"))
    Image.fromarray(pixels).save(target, format="PNG", compress_level=6)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>medsyn reader study</title>
<style>body{font-family:sans-serif;max-width:40em;margin:2em auto}img{width:320px;height:320px;image-rendering:pixelated;
border:1px solid #888}label{margin-right:1em}#done{display:none}</style></head>
<body><h1>Reader study</h1>
<p>Each image is either a real medical image or a generated one; you are not told which. Name its class and say how
sure you are.</p>
<form id="login"><label>Reader id <input id="reader" required pattern="[A-Za-z0-9_-]{1,32}"></label>
<button id="start">Start</button></form>
<form id="answer" hidden><p id="progress"></p><img id="image" alt="image to classify"><p>
<label>Class <select id="class" required></select></label></p><p>Confidence:
<label><input type="radio" name="confidence" value="1" required>1 (guess)</label><label><input type="radio"
name="confidence" value="2">2</label><label><input type="radio" name="confidence" value="3">3</label><label><input
type="radio" name="confidence" value="4">4</label><label><input type="radio" name="confidence" value="5">5 (certain)
</label></p><button id="submit">Submit</button></form>
<p id="done">All images answered. Thank you.</p>
<script>
let reader = null, current = null;
async function next() {
  const r = await fetch('/api/next?reader=' + encodeURIComponent(reader));
  const body = await r.json();
  if (!body.image) { document.getElementById('answer').hidden = true;
                     document.getElementById('done').style.display = 'block'; return; }
  current = body.image;
  document.getElementById('image').src = '/images/' + current + '.png';
  document.getElementById('progress').textContent = 'Image ' + (body.answered + 1) + ' of ' + body.total;
  document.getElementById('answer').reset();
}
document.getElementById('login').addEventListener('submit', async (e) => {
  e.preventDefault(); reader = document.getElementById('reader').value;
  const study = await (await fetch('/api/study')).json();
  const select = document.getElementById('class');
  for (const c of study.classes) { const o = document.createElement('option'); o.value = c; o.textContent = c;
                                   select.appendChild(o); }
  document.getElementById('login').hidden = true; document.getElementById('answer').hidden = false; next();
});
document.getElementById('answer').addEventListener('submit', async (e) => {
  e.preventDefault();
  const confidence = Number(document.querySelector('input[name=confidence]:checked').value);
  const r = await fetch('/api/answer', {method: 'POST', headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({reader: reader, image: current, class: document.getElementById('class').value,
                          confidence: confidence})});
  if (r.ok) next(); else alert('The answer was not accepted: ' + (await r.text()));
});
</script></body></html>
"""


class _Study:
    """What the server knows: the public study, the key (for validation only) and the answers so far,
    read once at start (a torn line, from a server killed while writing, is skipped with a warning)
    and kept in memory; each new answer is appended under a lock."""

    def __init__(self, study_dir: Path, responses: Path):
        self.dir = study_dir
        self.public = json.loads((study_dir / "study.json").read_text())
        self.tokens = set(self.public["images"])
        self.classes = set(self.public["classes"])
        self.responses = responses
        self.lock = threading.Lock()
        self.done: dict[str, set[str]] = {}
        for answer in read_answers(responses):
            self.done.setdefault(answer["reader"], set()).add(answer["image"])
        if responses.exists() and responses.stat().st_size and not responses.read_bytes().endswith(b"\n"):
            with open(responses, "a") as f:  # close a torn last line, so the next answer starts a line of its own
                f.write("\n")

    def answered(self, reader: str) -> set[str]:
        with self.lock:
            return set(self.done.get(reader, ()))

    def store(self, answer: dict) -> bool:
        """Append an answer unless this reader has answered this image; False if it had."""
        with self.lock:
            if answer["image"] in self.done.get(answer["reader"], ()):
                return False
            line = json.dumps({**answer, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n"
            with open(self.responses, "a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self.done.setdefault(answer["reader"], set()).add(answer["image"])
            return True

    def order(self, reader: str) -> list[str]:
        """Each reader's own shuffled order, the same on every visit, seeded by a hash of the whole id
        (so `reader_1` and `reader_2` see different orders)."""
        seed = int.from_bytes(hashlib.sha256(reader.encode()).digest()[:8], "little")
        return [self.public["images"][i] for i in np.random.default_rng(seed).permutation(len(self.public["images"]))]


def read_answers(path: Path) -> list[dict]:
    """The answers in a responses file; a line that is not a complete answer (a torn write) is skipped
    with a warning naming its line number, never an error for everyone."""
    if not path.exists():
        return []
    answers = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            answer = json.loads(line)
            if not isinstance(answer, dict) or not {"reader", "image", "class", "confidence"} <= set(answer):
                raise ValueError("not an answer")
        except ValueError:
            warnings.warn(f"{path}: line {number} is not a complete answer (a torn write?); skipped", stacklevel=2)
            continue
        answers.append(answer)
    return answers


def _handler(study: _Study):
    class Handler(BaseHTTPRequestHandler):
        timeout = 15  # seconds a connection may sit idle: a slow or stalled client does not hold a thread forever

        def log_message(self, *args):  # answers go to the responses file, not to a log
            pass

        def _send(self, status, body: bytes, kind: str):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, value, status=HTTPStatus.OK):
            self._send(status, json.dumps(value).encode(), "application/json")

        def _refuse(self, status, why: str):
            self._send(status, why.encode(), "text/plain; charset=utf-8")

        def do_GET(self):
            path, _, query = self.path.partition("?")
            if path == "/":
                return self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
            if path == "/api/study":
                return self._json({"classes": study.public["classes"]})
            if path == "/api/next":
                reader = parse_qs(query).get("reader", [""])[0]
                if not READER.fullmatch(reader):
                    return self._refuse(HTTPStatus.BAD_REQUEST, "reader id: 1-32 letters, digits, _ or -")
                done = study.answered(reader)
                left = [t for t in study.order(reader) if t not in done]
                return self._json(
                    {"image": left[0] if left else None, "answered": len(done), "total": len(study.tokens)}
                )
            match = re.fullmatch(r"/images/([0-9a-f]{16})\.png", path)
            if match and match.group(1) in study.tokens:  # only files the study lists, never a path from the request
                return self._send(
                    HTTPStatus.OK, (study.dir / "images" / f"{match.group(1)}.png").read_bytes(), "image/png"
                )
            return self._refuse(HTTPStatus.NOT_FOUND, "not found")

        def do_POST(self):
            if self.path != "/api/answer":
                return self._refuse(HTTPStatus.NOT_FOUND, "not found")
            length = self.headers.get("Content-Length", "")
            if not length.isdigit() or not 0 < int(length) <= 4096:
                return self._refuse(HTTPStatus.BAD_REQUEST, "an answer is a small JSON object with a Content-Length")
            try:
                answer = json.loads(self.rfile.read(int(length)))
            except (ValueError, RecursionError):  # RecursionError: deeply nested JSON
                return self._refuse(HTTPStatus.BAD_REQUEST, "not JSON")
            if not isinstance(answer, dict) or set(answer) != {"reader", "image", "class", "confidence"}:
                return self._refuse(HTTPStatus.BAD_REQUEST, "fields: reader, image, class, confidence")
            checks = [
                (isinstance(answer["reader"], str) and READER.fullmatch(answer["reader"]), "reader id"),
                (isinstance(answer["image"], str) and answer["image"] in study.tokens, "image"),
                (isinstance(answer["class"], str) and answer["class"] in study.classes, "class"),
                (type(answer["confidence"]) is int and 1 <= answer["confidence"] <= 5, "confidence (1-5)"),
            ]
            for ok, what in checks:
                if not ok:
                    return self._refuse(HTTPStatus.BAD_REQUEST, f"invalid {what}")
            if not study.store(answer):
                return self._refuse(HTTPStatus.CONFLICT, "this reader has answered this image")
            return self._json({"stored": True})

    return Handler


class _StudyServer(ThreadingHTTPServer):
    """A thread per connection, daemon threads, and a listen queue deep enough for a room of readers
    submitting at once (the standard library's default of 5 resets the rest)."""

    request_queue_size = 512
    daemon_threads = True


def serve(
    study_dir: str | Path, host: str = "127.0.0.1", port: int = 8765, responses: str | Path | None = None
) -> ThreadingHTTPServer:
    """Start the study page (in a background thread) and return the server; `server.shutdown()` stops
    it. Listens on localhost unless `host` says otherwise; port 0 picks a free port
    (`server.server_address`). Answers go to `responses` (default `<study_dir>/responses.jsonl`)."""
    study_dir = Path(study_dir)
    study = _Study(study_dir, Path(responses) if responses else study_dir / "responses.jsonl")
    server = _StudyServer((host, port), _handler(study))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def reader_table(study_dir: str | Path, responses: str | Path | None = None) -> pd.DataFrame:
    """Per source (real, and each family): answers, share of correct classes and mean confidence;
    the numbers of MediSyn's Fig. 3."""
    study_dir = Path(study_dir)
    key = json.loads((study_dir / "key.json").read_text())
    path = Path(responses) if responses else study_dir / "responses.jsonl"
    answers = read_answers(path)
    rows = [
        {
            "family": key[a["image"]]["family"],
            "reader": a["reader"],
            "correct": a["class"] == key[a["image"]]["class"],
            "confidence": a["confidence"],
        }
        for a in answers
    ]
    if not rows:
        return pd.DataFrame(columns=["family", "answers", "readers", "class_accuracy", "mean_confidence"])
    frame = pd.DataFrame(rows)
    return (
        frame.groupby("family", sort=False)
        .agg(
            answers=("correct", "size"),
            readers=("reader", "nunique"),
            class_accuracy=("correct", "mean"),
            mean_confidence=("confidence", "mean"),
        )
        .reset_index()
    )


def main(argv=None) -> None:
    """`python -m medsyn.reader_study STUDY_DIR [--host H] [--port P]`: serve until interrupted."""
    import argparse

    parser = argparse.ArgumentParser(description="serve a blinded reader study (see medsyn.reader_study)")
    parser.add_argument("study_dir")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: localhost only)")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)
    server = serve(args.study_dir, args.host, args.port)
    print(f"reader study at http://{server.server_address[0]}:{server.server_address[1]}/ (Ctrl-C stops)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


def plot_reader_study(table: pd.DataFrame, study_dir: str | Path):
    """MediSyn Fig. 3: per image source, the share of images whose class the readers named correctly
    and their mean confidence; with no answers yet, how to collect them."""
    import matplotlib.pyplot as plt

    if table.empty:
        fig, ax = plt.subplots(figsize=(6, 1.6))
        ax.axis("off")
        ax.text(
            0,
            0.5,
            f"No reader answers yet. Serve the study with\n  python -m medsyn.reader_study {study_dir}\n"
            "and run this notebook again.",
            family="monospace",
            fontsize=8,
            va="center",
        )
        return fig
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.0))
    colours = ["0.6" if f == "real" else f"C{i}" for i, f in enumerate(table["family"])]
    for ax, column, title in (
        (axes[0], "class_accuracy", "class named correctly"),
        (axes[1], "mean_confidence", "mean confidence (1-5)"),
    ):
        ax.bar(range(len(table)), table[column], color=colours)
        ax.set_xticks(range(len(table)), table["family"], rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[0].set_ylim(0, 1)
    axes[1].set_ylim(0, 5)
    fig.suptitle(
        f"Blinded reader study: {int(table['answers'].sum())} answers from {int(table['readers'].max())} reader(s)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
