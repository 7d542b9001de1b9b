"""The blinded reader study: the study hides each image's source, the server refuses anything it
did not list and anyone without an invitation, one reader's link never answers as another, and a
reader answering in a real headless browser (Debian's Chromium, driven by Playwright) ends up in the
responses file and in the report's tables."""

import http.client
import json
import shutil
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from tiny_models import write_tiny_dataset

from medsyn.data.dataset import image_path, read_records
from medsyn.reader_study import (
    _Study,
    build_study,
    invitation_links,
    invite,
    plot_reader_study,
    reader_table,
    serve,
    turing_table,
)
from medsyn.sampling import write_generated_dataset

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def study(tmp_path):
    data = write_tiny_dataset(tmp_path / "data", size=16, n=24)
    for record in read_records(data, "validation"):  # real radiographs are greyscale PNGs, generated ones RGB
        path = image_path(data, record)
        Image.open(path).convert("L").save(path)
    rng = np.random.default_rng(0)
    samples = [
        {
            "prompt_id": i % 2,
            "prompt": ["A cyan bar.", "A red disc."][i % 2],
            "seed": i,
            "image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
        }
        for i in range(6)
    ]
    write_generated_dataset(
        samples,
        tmp_path / "gen",
        "fam",
        [{"source": "tiny", "labels": ["bar"]}, {"source": "tiny", "labels": ["disc"]}],
        {},
    )
    directory = build_study(
        data,
        {"fam": tmp_path / "gen"},
        tmp_path / "study",
        per_class=2,
        split="validation",
        readers=["reader_1", "reader_2"],
        real_or_synthetic=True,
    )
    server = serve(directory, port=0)
    secrets = json.loads((directory / "invitations.json").read_text())
    yield {"dir": directory, "url": f"http://127.0.0.1:{server.server_address[1]}", "secrets": secrets}
    server.shutdown()


def _post(url, body, secret=None):
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {secret}"} if secret else {})}
    request = urllib.request.Request(url + "/api/answer", data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _get(url, secret=None):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {secret}"} if secret else {})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""


def test_the_study_is_blinded(study):
    public = json.loads((study["dir"] / "study.json").read_text())
    key = json.loads((study["dir"] / "key.json").read_text())
    assert public["classes"] == ["tiny: bar", "tiny: disc"] and set(public) == {
        "classes",
        "images",
        "real_or_synthetic",
    }
    assert sorted(public["images"]) == sorted(key) and len(key) == 2 * 2 + 2 * 2  # real and fam, 2 per class
    assert {v["source"] for v in key.values()} == {"real", "synthetic"}
    assert sorted(p.stem for p in (study["dir"] / "images").iterdir()) == sorted(key)  # names say nothing
    with pytest.raises(FileExistsError):
        build_study(study["dir"], {}, study["dir"])
    empty = reader_table(study["dir"])
    assert (
        empty.empty
        and "python -m medsyn.reader_study" in plot_reader_study(empty, study["dir"]).axes[0].texts[0].get_text()
    )


def test_the_server_refuses_what_it_did_not_list(study):
    url, token = study["url"], json.loads((study["dir"] / "study.json").read_text())["images"][0]
    secret = study["secrets"]["reader_1"]
    for path in (
        "/images/../key.json",
        "/key.json",
        "/invitations.json",
        "/images/0123456789abcdef.png",
        "/study.json",
        "/images/%2e%2e/key.json",
        "/api/nothing",
    ):
        assert _get(url + path, secret)[0] == 404, path
    good = {"image": token, "class": "tiny: bar", "confidence": 3, "real": True}
    for bad in (
        {**good, "image": "../../key"},
        {**good, "class": "x"},
        {**good, "confidence": 6},
        {**good, "confidence": "3"},
        {**good, "real": "yes"},
        {k: v for k, v in good.items() if k != "real"},  # the study asks: the question must be answered
        {**good, "extra": 1},
        {**good, "reader": "reader_2"},  # the reader is the link's, never one the body names
    ):
        assert _post(url, bad, secret) == 400, bad
    assert not (study["dir"] / "responses.jsonl").exists()
    assert _post(url, good, secret) == 200 and _post(url, good, secret) == 409  # one answer per reader and image


def test_without_a_valid_invitation_nothing_is_shown_or_stored(study):
    url, token = study["url"], json.loads((study["dir"] / "study.json").read_text())["images"][0]
    good = {"image": token, "class": "tiny: bar", "confidence": 3, "real": False}
    right = study["secrets"]["reader_1"]
    wrong = right[:-1] + ("A" if right[-1] != "A" else "B")  # one character off
    for secret in (None, wrong, "x" * 32, right + "x", "Basic " + right):
        assert _post(url, good, secret) == 403, secret
        for path in ("/api/study", "/api/next", f"/images/{token}.png"):
            assert _get(url + path, secret)[0] == 403, (path, secret)
    assert not (study["dir"] / "responses.jsonl").exists()
    status, page = _get(url + "/")  # the page itself is public and holds no secret, key or image name
    assert status == 200 and right.encode() not in page and token.encode() not in page
    status, body = _get(url + "/api/study", right)
    assert status == 200 and set(json.loads(body)) == {"classes", "real_or_synthetic"}


def test_two_readers_links_never_write_each_others_answers(study):
    url, tokens = study["url"], json.loads((study["dir"] / "study.json").read_text())["images"]
    one, two = study["secrets"]["reader_1"], study["secrets"]["reader_2"]
    assert one != two and len(one) == 32
    assert _post(url, {"image": tokens[0], "class": "tiny: bar", "confidence": 2, "real": True}, one) == 200
    assert _post(url, {"image": tokens[0], "class": "tiny: disc", "confidence": 5, "real": False}, two) == 200
    assert _post(url, {"image": tokens[1], "class": "tiny: disc", "confidence": 4, "real": False}, two) == 200
    stored = [json.loads(line) for line in (study["dir"] / "responses.jsonl").read_text().splitlines()]
    assert [(a["reader"], a["image"], a["class"]) for a in stored] == [
        ("reader_1", tokens[0], "tiny: bar"),
        ("reader_2", tokens[0], "tiny: disc"),
        ("reader_2", tokens[1], "tiny: disc"),
    ]
    assert not any(one in line or two in line for line in (study["dir"] / "responses.jsonl").read_text().splitlines())
    # each link's progress is its own reader's
    assert json.loads(_get(url + "/api/next", one)[1])["answered"] == 1
    assert json.loads(_get(url + "/api/next", two)[1])["answered"] == 2
    # a reader added later gets a link of their own; an existing one keeps theirs
    assert invite(study["dir"], "reader_1") == one
    late = invite(study["dir"], "reader_3")
    assert late not in (one, two)
    assert invitation_links(study["dir"], "http://host:1")["reader_3"] == f"http://host:1/#invite={late}"
    with pytest.raises(ValueError, match="reader id"):
        invite(study["dir"], "../x")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_a_reader_answers_every_image_in_a_headless_browser(study):
    from playwright.sync_api import sync_playwright

    key = json.loads((study["dir"] / "key.json").read_text())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(study["url"] + "/")
        page.wait_for_selector("#nolink", state="visible")  # no invitation: nothing but the sentence
        page.goto(study["url"] + "/#invite=" + study["secrets"]["reader_1"])
        page.reload()
        for n in range(len(key)):
            page.wait_for_function(f"document.getElementById('progress').textContent.startsWith('Image {n + 1} ')")
            page.wait_for_function("document.getElementById('image').complete")
            assert page.evaluate("document.getElementById('image').naturalWidth") == 16  # the image loaded
            page.select_option("#class", "tiny: disc")
            page.check("input[name=confidence][value='4']")
            page.check("input[name=real][value='real']")
            page.click("#submit")
        page.wait_for_selector("#done", state="visible")
        browser.close()
    answers = [json.loads(line) for line in (study["dir"] / "responses.jsonl").read_text().splitlines()]
    assert len(answers) == len(key) and {a["image"] for a in answers} == set(key)
    assert all(a["reader"] == "reader_1" and a["confidence"] == 4 and a["real"] is True for a in answers)
    table = reader_table(study["dir"]).set_index("family")
    assert table.loc["real", "answers"] == 4 and table.loc["real", "class_accuracy"] == 0.5  # "disc" is right for half
    assert table.loc["fam", "mean_confidence"] == 4 and table.loc["fam", "judged_real"] == 1.0
    # Wilson's interval for 2 of 4, by its formula
    z, p, n = 1.959963984540054, 0.5, 4
    centre, half = (
        (p + z * z / (2 * n)) / (1 + z * z / n),
        z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)),
    )
    assert table.loc["real", "class_accuracy_low"] == pytest.approx(centre - half)
    assert table.loc["real", "class_accuracy_high"] == pytest.approx(centre + half)
    turing = turing_table(study["dir"]).set_index("reader")
    assert turing.loc["all readers", "real_called_real"] == 1.0
    assert turing.loc["all readers", "synthetic_called_synthetic"] == 0.0
    assert turing.loc["all readers", "accuracy"] == 0.5 and turing.loc["reader_1", "answers"] == len(key)
    assert len(plot_reader_study(table.reset_index(), study["dir"]).axes) == 3


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of each chunk of a PNG file."""
    chunks, at = [], 8
    while at < len(data):
        length = int.from_bytes(data[at : at + 4], "big")
        chunks.append((data[at + 4 : at + 8], data[at + 8 : at + 8 + length]))
        at += 12 + length
    return chunks


def test_real_and_generated_study_images_share_one_format(study):
    """Greyscale real images and RGB generated ones are served as the same kind of PNG: the bytes'
    header (IHDR: bit depth, colour type, interlace) and the chunk types are the same for every image."""
    key = json.loads((study["dir"] / "key.json").read_text())
    formats = {}
    for token, entry in key.items():
        chunks = _png_chunks((study["dir"] / "images" / f"{token}.png").read_bytes())
        ihdr = chunks[0][1]
        form = (ihdr[8:], tuple(sorted({kind for kind, _ in chunks})))  # all but width and height
        formats.setdefault(form, set()).add(entry["source"])
    assert len(formats) == 1, formats
    ((ihdr_tail, kinds),) = formats
    assert ihdr_tail[:2] == bytes([8, 2]) and kinds == (b"IDAT", b"IEND", b"IHDR")  # 8-bit RGB, nothing else


def test_two_hundred_readers_answering_at_once_are_all_stored(study):
    token = json.loads((study["dir"] / "study.json").read_text())["images"][0]
    readers = [f"reader_{i}" for i in range(200)]
    links = {reader: invite(study["dir"], reader) for reader in readers}
    server = serve(study["dir"], port=0)  # a server started after the invitations
    url = f"http://127.0.0.1:{server.server_address[1]}"
    answer = {"image": token, "class": "tiny: bar", "confidence": 3, "real": False}
    try:
        with ThreadPoolExecutor(max_workers=200) as pool:
            statuses = list(pool.map(lambda reader: _post(url, answer, links[reader]), readers))
    finally:
        server.shutdown()
    assert statuses == [200] * 200
    stored = [json.loads(line) for line in (study["dir"] / "responses.jsonl").read_text().splitlines()]
    assert sorted(a["reader"] for a in stored) == sorted(readers)  # each once


def _raw_post(url: str, body: bytes, length: str, secret: str) -> int:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.putrequest("POST", "/api/answer")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Authorization", f"Bearer {secret}")
    connection.putheader("Content-Length", length)
    connection.endheaders(body)
    status = connection.getresponse().status
    connection.close()
    return status


def test_malformed_requests_are_answered_with_400(study):
    url, token = study["url"], json.loads((study["dir"] / "study.json").read_text())["images"][0]
    secret = study["secrets"]["reader_1"]
    good = {"image": token, "class": "tiny: bar", "confidence": 3, "real": True}
    assert _raw_post(url, json.dumps(good).encode(), "abc", secret) == 400
    assert _raw_post(url, b"[" * 3000, "3000", secret) == 400  # nesting deeper than the JSON parser's recursion
    for bad in ({**good, "image": [token]}, {**good, "class": {"a": 1}}, {**good, "real": 1}, [good]):
        assert _post(url, bad, secret) == 400, bad
    assert _post(url, good, secret) == 200  # and the server still answers


def test_a_torn_answer_line_is_skipped_with_a_warning(study):
    url, token = study["url"], json.loads((study["dir"] / "study.json").read_text())["images"][0]
    responses = study["dir"] / "responses.jsonl"
    first = {"reader": "reader_1", "image": token, "class": "tiny: bar", "confidence": 3, "real": True}
    responses.write_text(json.dumps(first) + "\n" + '{"reader": "reader_2", "ima')  # killed while writing
    with pytest.warns(UserWarning, match="line 2"):
        server = serve(study["dir"], port=0)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    answer = {k: v for k, v in first.items() if k != "reader"}
    try:
        assert _post(url, answer, study["secrets"]["reader_1"]) == 409  # the complete answer still counts
        assert _post(url, answer, study["secrets"]["reader_2"]) == 200  # and the torn one can be given again
    finally:
        server.shutdown()
    with pytest.warns(UserWarning, match="line 2"):
        table = reader_table(study["dir"])
    assert table["answers"].sum() == 2


def test_each_reader_gets_an_order_of_their_own(study):
    order = _Study(study["dir"], study["dir"] / "responses.jsonl").order
    assert order("reader_1") != order("reader_2")  # ids that share their first bytes
    assert order("reader_1") == order("reader_1")
