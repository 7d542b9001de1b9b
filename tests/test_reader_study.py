"""The blinded reader study: the study hides each image's source, the server refuses anything it
did not list, and a reader answering in a real headless browser (Debian's Chromium, driven by
Playwright) ends up in the responses file and in the report's table."""

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
from medsyn.reader_study import _Study, build_study, plot_reader_study, reader_table, serve
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
    directory = build_study(data, {"fam": tmp_path / "gen"}, tmp_path / "study", per_class=2, split="validation")
    server = serve(directory, port=0)
    yield {"dir": directory, "url": f"http://127.0.0.1:{server.server_address[1]}"}
    server.shutdown()


def _post(url, body):
    request = urllib.request.Request(
        url + "/api/answer", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_study_is_blinded(study):
    public = json.loads((study["dir"] / "study.json").read_text())
    key = json.loads((study["dir"] / "key.json").read_text())
    assert public["classes"] == ["tiny: bar", "tiny: disc"] and set(public) == {"classes", "images"}
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
    for path in (
        "/images/../key.json",
        "/key.json",
        "/images/0123456789abcdef.png",
        "/study.json",
        "/images/%2e%2e/key.json",
    ):
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(url + path)
        assert error.value.code == 404, path
    good = {"reader": "r1", "image": token, "class": "tiny: bar", "confidence": 3}
    for bad in (
        {**good, "reader": "../etc"},
        {**good, "image": "../../key"},
        {**good, "class": "x"},
        {**good, "confidence": 6},
        {**good, "confidence": "3"},
        {**good, "extra": 1},
    ):
        assert _post(url, bad) == 400, bad
    assert not (study["dir"] / "responses.jsonl").exists()
    assert _post(url, good) == 200 and _post(url, good) == 409  # one answer per reader and image


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_a_reader_answers_every_image_in_a_headless_browser(study):
    from playwright.sync_api import sync_playwright

    key = json.loads((study["dir"] / "key.json").read_text())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(study["url"])
        page.fill("#reader", "reader_1")
        page.click("#start")
        for n in range(len(key)):
            page.wait_for_selector("#image[src*='/images/']")
            page.wait_for_function(f"document.getElementById('progress').textContent.startsWith('Image {n + 1} ')")
            page.wait_for_function("document.getElementById('image').complete")
            assert page.evaluate("document.getElementById('image').naturalWidth") == 16  # the image loaded
            page.select_option("#class", "tiny: disc")
            page.check("input[name=confidence][value='4']")
            page.click("#submit")
        page.wait_for_selector("#done", state="visible")
        browser.close()
    answers = [json.loads(line) for line in (study["dir"] / "responses.jsonl").read_text().splitlines()]
    assert len(answers) == len(key) and {a["image"] for a in answers} == set(key)
    assert all(a["reader"] == "reader_1" and a["confidence"] == 4 for a in answers)
    table = reader_table(study["dir"]).set_index("family")
    assert table.loc["real", "answers"] == 4 and table.loc["real", "class_accuracy"] == 0.5  # "disc" is right for half
    assert table.loc["fam", "mean_confidence"] == 4
    assert len(plot_reader_study(table.reset_index(), study["dir"]).axes) == 2


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
    url, token = study["url"], json.loads((study["dir"] / "study.json").read_text())["images"][0]
    answers = [{"reader": f"reader_{i}", "image": token, "class": "tiny: bar", "confidence": 3} for i in range(200)]
    with ThreadPoolExecutor(max_workers=200) as pool:
        statuses = list(pool.map(lambda answer: _post(url, answer), answers))
    assert statuses == [200] * 200
    stored = [json.loads(line) for line in (study["dir"] / "responses.jsonl").read_text().splitlines()]
    assert sorted(a["reader"] for a in stored) == sorted(a["reader"] for a in answers)  # each once


def _raw_post(url: str, body: bytes, length: str) -> int:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.putrequest("POST", "/api/answer")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", length)
    connection.endheaders(body)
    status = connection.getresponse().status
    connection.close()
    return status


def test_malformed_requests_are_answered_with_400(study):
    url, token = study["url"], json.loads((study["dir"] / "study.json").read_text())["images"][0]
    good = {"reader": "r1", "image": token, "class": "tiny: bar", "confidence": 3}
    assert _raw_post(url, json.dumps(good).encode(), "abc") == 400
    assert _raw_post(url, b"[" * 3000, "3000") == 400  # nesting deeper than the JSON parser's recursion
    for bad in ({**good, "image": [token]}, {**good, "class": {"a": 1}}, {**good, "reader": 7}, [good]):
        assert _post(url, bad) == 400, bad
    assert _post(url, good) == 200  # and the server still answers


def test_a_torn_answer_line_is_skipped_with_a_warning(study):
    url, token = study["url"], json.loads((study["dir"] / "study.json").read_text())["images"][0]
    responses = study["dir"] / "responses.jsonl"
    first = {"reader": "r1", "image": token, "class": "tiny: bar", "confidence": 3}
    responses.write_text(json.dumps(first) + "\n" + '{"reader": "r2", "ima')  # killed while writing
    with pytest.warns(UserWarning, match="line 2"):
        server = serve(study["dir"], port=0)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert _post(url, first) == 409  # the complete answer still counts
        assert _post(url, {**first, "reader": "r2"}) == 200  # and the torn one can be given again
    finally:
        server.shutdown()
    with pytest.warns(UserWarning, match="line 2"):
        table = reader_table(study["dir"])
    assert table["answers"].sum() == 2


def test_each_reader_gets_an_order_of_their_own(study):
    order = _Study(study["dir"], study["dir"] / "responses.jsonl").order
    assert order("reader_1") != order("reader_2")  # ids that share their first bytes
    assert order("reader_1") == order("reader_1")
