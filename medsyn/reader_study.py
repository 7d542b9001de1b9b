"""A blinded reader study, as MediSyn's clinicians did it through a web interface (its Fig. 3):
real and generated images, shuffled and renamed so that nothing about an image's source shows, are
shown one at a time; each reader names the class and a confidence from 1 to 5 and, when the study
asks as RoentGen's visual Turing test did, whether the image is real or synthetic. Every answer is
appended to `responses.jsonl`.

`build_study` writes the study directory: `images/<token>.png`, `study.json` (the class names, the
tokens and whether the real-or-synthetic question is asked: all the page sees), `key.json` (token ->
source, family, class) and `invitations.json` (reader -> the secret of their invitation link). The key
and the secrets are never served. Each reader gets a link `http://HOST:PORT/#invite=SECRET`; the
secret stays in the link's fragment (never in a request line or a log), and the page sends it with
every request. The server answers the API and the images only for a known secret, and stores an
answer under the reader that secret was given to: one reader cannot answer as another.
`serve` runs the page with the standard library's HTTP server, on localhost unless asked otherwise.
Requests are checked before anything touches the file system. `reader_table` and `turing_table`
join the answers with the key for the report.
"""

import hashlib
import hmac
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

import numpy as np
import pandas as pd
from PIL import Image

from medsyn.data.dataset import class_key, class_prompts, image_path, split_records
from medsyn.intervals import proportion_interval

READER = re.compile(r"[A-Za-z0-9_-]{1,32}")
TOKEN = re.compile(r"[0-9a-f]{16}")
SECRET = re.compile(r"[A-Za-z0-9_-]{32}")


def build_study(
    real_dir: str | Path,
    generated: dict[str, str | Path],
    out_dir: str | Path,
    per_class: int = 2,
    split: str = "test",
    seed: int = 0,
    readers: list[str] | tuple[str, ...] = ("reader_1",),
    real_or_synthetic: bool = False,
) -> Path:
    """Pick `per_class` real images of each class (from `split`) and `per_class` generated images of
    each family for each class prompt, copy them under random tokens, and write the study files with
    an invitation for each of `readers` (more with `invite`). With `real_or_synthetic`, every answer
    also says whether the reader takes the image for real or synthetic."""
    out_dir = Path(out_dir)
    for reader in readers:
        if not READER.fullmatch(reader):
            raise ValueError(f"reader id {reader!r}: 1-32 letters, digits, _ or -")
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
    public = {"classes": list(prompts), "images": sorted(tokens), "real_or_synthetic": real_or_synthetic}
    (out_dir / "study.json").write_text(json.dumps(public, indent=1))
    for reader in readers:
        invite(out_dir, reader)
    return out_dir


def invite(study_dir: str | Path, reader: str) -> str:
    """Add a reader to a study and return the secret of their invitation link (an existing reader keeps
    theirs). The secrets live in `invitations.json`, readable by the study's owner only."""
    if not READER.fullmatch(reader):
        raise ValueError(f"reader id {reader!r}: 1-32 letters, digits, _ or -")
    path = Path(study_dir) / "invitations.json"
    invitations = json.loads(path.read_text()) if path.exists() else {}
    if reader not in invitations:
        invitations[reader] = secrets.token_urlsafe(24)  # 32 characters, 192 bits
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(invitations, indent=1))
        os.chmod(partial, 0o600)
        partial.replace(path)
    return invitations[reader]


def invitation_links(study_dir: str | Path, base_url: str) -> dict[str, str]:
    """Reader -> their link for a server at `base_url` (e.g. `http://host:8765`)."""
    path = Path(study_dir) / "invitations.json"
    invitations = json.loads(path.read_text()) if path.exists() else {}
    return {reader: f"{base_url.rstrip('/')}/#invite={secret}" for reader, secret in invitations.items()}


def write_blinded_png(source: str | Path, target: str | Path) -> None:
    """Re-encode an image as every study image is: 8-bit RGB PNG from a fresh pixel array (no text,
    gamma or colour-profile chunks carried over), with the same encoder settings. A real greyscale
    PNG copied as it is would say "real" in its header (colour type 0) to anyone who looks."""
    pixels = np.asarray(Image.open(source).convert("RGB"))
    Image.fromarray(pixels).save(target, format="PNG", compress_level=6)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="referrer" content="no-referrer">
<title>medsyn reader study</title>
<style>body{font-family:sans-serif;max-width:40em;margin:2em auto}img{width:320px;height:320px;image-rendering:pixelated;
border:1px solid #888}label{margin-right:1em}#done,#nolink{display:none}</style></head>
<body><h1>Reader study</h1>
<p>Each image is either a real medical image or a generated one; you are not told which. Name its class and say how
sure you are.</p>
<p id="nolink">This page needs the invitation link you were given (it ends in <code>#invite=...</code>).</p>
<form id="answer" hidden><p id="progress"></p><img id="image" alt="image to classify"><p>
<label>Class <select id="class" required></select></label></p><p>Confidence:
<label><input type="radio" name="confidence" value="1" required>1 (guess)</label><label><input type="radio"
name="confidence" value="2">2</label><label><input type="radio" name="confidence" value="3">3</label><label><input
type="radio" name="confidence" value="4">4</label><label><input type="radio" name="confidence" value="5">5 (certain)
</label></p><p id="realq" hidden>This image is:
<label><input type="radio" name="real" value="real">real</label><label><input type="radio" name="real"
value="synthetic">synthetic</label></p><button id="submit">Submit</button></form>
<p id="done">All images answered. Thank you.</p>
<script>
const invite = new URLSearchParams(location.hash.slice(1)).get('invite');
const auth = {'Authorization': 'Bearer ' + invite};
let current = null, asksReal = false;
async function next() {
  const r = await fetch('/api/next', {headers: auth});
  const body = await r.json();
  if (!body.image) { document.getElementById('answer').hidden = true;
                     document.getElementById('done').style.display = 'block'; return; }
  current = body.image;
  const blob = await (await fetch('/images/' + current + '.png', {headers: auth})).blob();
  const image = document.getElementById('image');
  if (image.src) URL.revokeObjectURL(image.src);
  image.src = URL.createObjectURL(blob);
  document.getElementById('progress').textContent = 'Image ' + (body.answered + 1) + ' of ' + body.total;
  document.getElementById('answer').reset();
}
async function start() {
  if (!invite) { document.getElementById('nolink').style.display = 'block'; return; }
  const r = await fetch('/api/study', {headers: auth});
  if (!r.ok) { document.getElementById('nolink').style.display = 'block'; return; }
  const study = await r.json();
  const select = document.getElementById('class');
  for (const c of study.classes) { const o = document.createElement('option'); o.value = c; o.textContent = c;
                                   select.appendChild(o); }
  asksReal = study.real_or_synthetic;
  if (asksReal) { document.getElementById('realq').hidden = false;
                  for (const i of document.querySelectorAll('input[name=real]')) i.required = true; }
  document.getElementById('answer').hidden = false; next();
}
document.getElementById('answer').addEventListener('submit', async (e) => {
  e.preventDefault();
  const answer = {image: current, class: document.getElementById('class').value,
                  confidence: Number(document.querySelector('input[name=confidence]:checked').value)};
  if (asksReal) answer.real = document.querySelector('input[name=real]:checked').value === 'real';
  const r = await fetch('/api/answer', {method: 'POST', headers: {...auth, 'Content-Type': 'application/json'},
    body: JSON.stringify(answer)});
  if (r.ok) next(); else alert('The answer was not accepted: ' + (await r.text()));
});
start();
</script></body></html>
"""


class _Study:
    """What the server knows: the public study, the invitations, and the answers so far, read once at
    start (a torn line, from a server killed while writing, is skipped with a warning) and kept in
    memory; each new answer is appended under a lock."""

    def __init__(self, study_dir: Path, responses: Path):
        self.dir = study_dir
        self.public = json.loads((study_dir / "study.json").read_text())
        self.public.setdefault("real_or_synthetic", False)
        self.tokens = set(self.public["images"])
        self.classes = set(self.public["classes"])
        invitations = study_dir / "invitations.json"
        self.invitations = json.loads(invitations.read_text()) if invitations.exists() else {}
        self.responses = responses
        self.lock = threading.Lock()
        self.done: dict[str, set[str]] = {}
        for answer in read_answers(responses):
            self.done.setdefault(answer["reader"], set()).add(answer["image"])
        if responses.exists() and responses.stat().st_size and not responses.read_bytes().endswith(b"\n"):
            with open(responses, "a") as f:  # close a torn last line, so the next answer starts a line of its own
                f.write("\n")

    def reader(self, authorization: str | None) -> str | None:
        """The reader whose invitation secret the request carries (`Authorization: Bearer SECRET`), or
        None; every secret is compared in constant time, so timing says nothing about a near miss."""
        scheme, _, secret = (authorization or "").partition(" ")
        if scheme != "Bearer" or not SECRET.fullmatch(secret):
            return None
        found = None
        for reader, known in self.invitations.items():
            if hmac.compare_digest(known.encode(), secret.encode()):
                found = reader
        return found

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

        def _invited(self) -> str | None:
            reader = study.reader(self.headers.get("Authorization"))
            if reader is None:
                self._refuse(HTTPStatus.FORBIDDEN, "open the invitation link you were given")
            return reader

        def do_GET(self):
            path = self.path.partition("?")[0]
            if path == "/":
                return self._send(HTTPStatus.OK, PAGE.encode(), "text/html; charset=utf-8")
            if not path.startswith(("/api/", "/images/")):
                return self._refuse(HTTPStatus.NOT_FOUND, "not found")
            reader = self._invited()
            if reader is None:
                return None
            if path == "/api/study":
                return self._json(
                    {"classes": study.public["classes"], "real_or_synthetic": study.public["real_or_synthetic"]}
                )
            if path == "/api/next":
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
            reader = self._invited()
            if reader is None:
                return None
            length = self.headers.get("Content-Length", "")
            if not length.isdigit() or not 0 < int(length) <= 4096:
                return self._refuse(HTTPStatus.BAD_REQUEST, "an answer is a small JSON object with a Content-Length")
            try:
                answer = json.loads(self.rfile.read(int(length)))
            except (ValueError, RecursionError):  # RecursionError: deeply nested JSON
                return self._refuse(HTTPStatus.BAD_REQUEST, "not JSON")
            fields = {"image", "class", "confidence"} | ({"real"} if study.public["real_or_synthetic"] else set())
            if not isinstance(answer, dict) or set(answer) != fields:
                return self._refuse(HTTPStatus.BAD_REQUEST, f"fields: {', '.join(sorted(fields))}")
            checks = [
                (isinstance(answer["image"], str) and answer["image"] in study.tokens, "image"),
                (isinstance(answer["class"], str) and answer["class"] in study.classes, "class"),
                (type(answer["confidence"]) is int and 1 <= answer["confidence"] <= 5, "confidence (1-5)"),
                (type(answer.get("real", False)) is bool, "real (true or false)"),
            ]
            for ok, what in checks:
                if not ok:
                    return self._refuse(HTTPStatus.BAD_REQUEST, f"invalid {what}")
            answer = {"reader": reader, **answer}  # the reader the link was given to, never one the body names
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


def _answers_with_key(study_dir: Path, responses: str | Path | None) -> pd.DataFrame:
    key = json.loads((study_dir / "key.json").read_text())
    answers = read_answers(Path(responses) if responses else study_dir / "responses.jsonl")
    return pd.DataFrame(
        [
            {
                "family": key[a["image"]]["family"],
                "source": key[a["image"]]["source"],
                "reader": a["reader"],
                "correct": a["class"] == key[a["image"]]["class"],
                "confidence": a["confidence"],
                "judged_real": a.get("real"),
            }
            for a in answers
        ],
        columns=["family", "source", "reader", "correct", "confidence", "judged_real"],
    )


def reader_table(study_dir: str | Path, responses: str | Path | None = None) -> pd.DataFrame:
    """Per source (real, and each family): answers, readers, the share of correct classes with its
    Wilson 95 % interval, mean confidence, and, when the study asked, the share judged real (with its
    interval): the numbers of MediSyn's Fig. 3."""
    frame = _answers_with_key(Path(study_dir), responses)
    rows = []
    for family, group in frame.groupby("family", sort=False):
        correct = int(group["correct"].sum())
        low, high = proportion_interval(correct, len(group))
        row = {
            "family": family,
            "answers": len(group),
            "readers": group["reader"].nunique(),
            "class_accuracy": correct / len(group),
            "class_accuracy_low": low,
            "class_accuracy_high": high,
            "mean_confidence": group["confidence"].mean(),
        }
        judged = group["judged_real"].dropna().astype(bool)
        if len(judged):
            row["judged_real"] = judged.mean()
            row["judged_real_low"], row["judged_real_high"] = proportion_interval(int(judged.sum()), len(judged))
        rows.append(row)
    columns = ["family", "answers", "readers", "class_accuracy", "class_accuracy_low", "class_accuracy_high"]
    return pd.DataFrame(rows, columns=None if rows else [*columns, "mean_confidence"])


def turing_table(study_dir: str | Path, responses: str | Path | None = None) -> pd.DataFrame:
    """The visual Turing test (RoentGen's readers): per reader and for all readers together, how often
    a real image was called real and a synthetic one synthetic, and the accuracy of telling them apart
    with its Wilson 95 % interval; an interval that holds 0.5 means the readers could not tell.
    Empty when the study did not ask or nobody answered."""
    frame = _answers_with_key(Path(study_dir), responses).dropna(subset=["judged_real"])
    rows = []
    for reader, group in [*frame.groupby("reader"), ("all readers", frame)]:
        if group.empty:
            continue
        right = group["judged_real"].astype(bool) == (group["source"] == "real")
        real, synthetic = group["source"] == "real", group["source"] == "synthetic"
        low, high = proportion_interval(int(right.sum()), len(group))
        rows.append(
            {
                "reader": reader,
                "answers": len(group),
                "real_called_real": right[real].mean() if real.any() else float("nan"),
                "synthetic_called_synthetic": right[synthetic].mean() if synthetic.any() else float("nan"),
                "accuracy": right.mean(),
                "accuracy_low": low,
                "accuracy_high": high,
            }
        )
    columns = ["reader", "answers", "real_called_real", "synthetic_called_synthetic", "accuracy"]
    return pd.DataFrame(rows, columns=[*columns, "accuracy_low", "accuracy_high"])


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv=None) -> None:
    """`python -m medsyn.reader_study STUDY_DIR [--invite NAME ...] [--host H] [--port P]`: add
    readers, print every reader's invitation link, and serve until interrupted."""
    import argparse
    import socket

    parser = argparse.ArgumentParser(description="serve a blinded reader study (see medsyn.reader_study)")
    parser.add_argument("study_dir")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to listen on (default: localhost only; 0.0.0.0 lets readers at other computers in)",
    )
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--invite", action="append", default=[], metavar="READER", help="add a reader (repeatable)")
    args = parser.parse_args(argv)
    for reader in args.invite:
        invite(args.study_dir, reader)
    server = serve(args.study_dir, args.host, args.port)
    port = server.server_address[1]
    if _loopback(args.host):
        print(f"reader study on this computer only (http://{args.host}:{port}/); --host 0.0.0.0 opens it to others")
        shown = args.host
    else:
        shown = socket.getfqdn() if args.host in ("0.0.0.0", "::") else args.host
        print(
            f"reader study listening beyond localhost on {args.host}:{port}: anyone who can reach this computer "
            "sees the page, and only an invitation link shows images or takes answers (use HTTPS in front of it "
            "outside a trusted network)"
        )
    links = invitation_links(args.study_dir, f"http://{shown}:{port}")
    if not links:
        print("no reader is invited yet: add readers with --invite NAME")
    for reader, link in links.items():
        print(f"  {reader}: {link}")
    print("Ctrl-C stops")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()


def plot_reader_study(table: pd.DataFrame, study_dir: str | Path):
    """MediSyn Fig. 3: per image source, the share of images whose class the readers named correctly
    and their mean confidence and, when the study asked, the share judged real (RoentGen's visual
    Turing test), with Wilson 95 % intervals; with no answers yet, how to collect them."""
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
    panels = [
        ("class_accuracy", "class named correctly", (0, 1)),
        ("mean_confidence", "mean confidence (1-5)", (0, 5)),
    ]
    if "judged_real" in table and table["judged_real"].notna().any():
        panels.append(("judged_real", "judged real (visual Turing test)", (0, 1)))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.75 * len(panels), 3.0))
    colours = ["0.6" if f == "real" else f"C{i}" for i, f in enumerate(table["family"])]
    for ax, (column, title, limits) in zip(axes, panels):
        if f"{column}_low" in table:  # Wilson 95 % intervals
            errors = np.vstack([table[column] - table[f"{column}_low"], table[f"{column}_high"] - table[column]])
        else:
            errors = None
        ax.bar(range(len(table)), table[column], color=colours, yerr=errors, capsize=3)
        ax.set_xticks(range(len(table)), table["family"], rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(*limits)
    fig.suptitle(
        f"Blinded reader study: {int(table['answers'].sum())} answers from {int(table['readers'].max())} reader(s); "
        "bars: Wilson 95 % intervals",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
