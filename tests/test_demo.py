"""The Gradio demo: its handler on good and bad files, and the real page driven in headless Chromium."""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import load_script
from PIL import Image
from playwright.sync_api import Page, expect, sync_playwright

from captioning import inference
from captioning.data.sources import open_image
from captioning.data.synthetic import SyntheticShapes
from captioning.inference import ImageCaptioner

browser_tools = load_script("scripts/screenshot_demo.py")  # the screenshot script's Chromium settings and helpers
demo = browser_tools.load_demo()


@pytest.fixture(scope="module")
def captioner(trained_checkpoint) -> ImageCaptioner:
    return ImageCaptioner.from_checkpoint(trained_checkpoint, "cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("uploads")
    (photo,) = SyntheticShapes("val", 1, image_size=96).write_images(folder, 1)
    (folder / "not_a_photo.png").write_text("plain text with an image's extension")
    data = photo.read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    return {"photo": photo, "text": folder / "not_a_photo.png", "truncated": folder / "cut.png"}


@contextlib.contextmanager
def served_page(app) -> Iterator[tuple[Page, int]]:
    """The app served on a free port and opened in headless Chromium -> (the page, the port); both closed after."""
    port = browser_tools.free_port()
    demo.serve(app, port=port, prevent_thread_lock=True)
    try:
        with sync_playwright() as p:
            browser = browser_tools.launch_browser(p)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            yield page, port
            browser.close()
    finally:
        app.close()


def expected_caption(captioner: ImageCaptioner, path: Path, beam_size: int = 3, max_len: int = 20) -> str:
    (caption,) = captioner.caption([open_image(path)], beam_size=beam_size, max_len=max_len, n_best=beam_size)
    return caption.text or "(no words)"


def test_handler_captions_a_photo_and_explains_bad_files(captioner, files):
    photo, html, rows, maps = demo.describe_photo(captioner, str(files["photo"]), 2, 12)
    assert photo.mode == "RGB" and photo.size == (96, 96)
    assert f">{expected_caption(captioner, files['photo'], 2, 12)}<" in html
    assert [r[0] for r in rows] == [1, 2] and rows[0][2] >= rows[1][2]  # best first
    assert len(maps) == len(rows[0][1].split()) and all(word for _, word in maps)
    for name, reason in [("text", "not_a_photo.png could not be read: not an image"),
                         ("truncated", "cut.png could not be read: truncated or corrupt")]:
        with pytest.warns(UserWarning, match=reason):  # outside a page, gr.Warning is a Python warning
            photo, html, rows, maps = demo.describe_photo(captioner, str(files[name]), 3, 20)
        assert photo is None and rows == [] and maps == [] and 'class="caption-problem"' in html and reason in html
    assert demo.describe_photo(captioner, None, 3, 20)[1] == demo.EMPTY_CAPTION


def test_a_photo_over_the_pixel_limit_is_refused_with_the_limit(captioner, files, monkeypatch):
    monkeypatch.setattr(demo, "DEFAULT_MAX_PIXELS", 9_216)  # the photo's 96 x 96 pixels: allowed
    assert demo.describe_photo(captioner, str(files["photo"]), 3, 20)[0] is not None
    monkeypatch.setattr(demo, "DEFAULT_MAX_PIXELS", 9_000)
    reason = f"{files['photo'].name} is too large: this demo takes images of up to 9,000 pixels"
    with pytest.warns(UserWarning, match=reason):
        photo, html, _, _ = demo.describe_photo(captioner, str(files["photo"]), 3, 20)
    assert photo is None and reason in html and "caption.py" not in html


def test_a_large_photo_is_sent_back_small_and_a_deleted_upload_is_explained(captioner, tmp_path):
    Image.new("RGB", (2000, 1000), (200, 30, 30)).save(tmp_path / "wide.png")
    photo, html, rows, maps = demo.describe_photo(captioner, str(tmp_path / "wide.png"), 2, 12)
    assert photo.size == (demo.SHOWN_SIDE, demo.SHOWN_SIDE // 2) and "caption-text" in html
    with pytest.warns(UserWarning, match="gone.png is no longer on the server"):  # deleted from Gradio's cache
        photo, html, rows, maps = demo.describe_photo(captioner, str(tmp_path / "gone.png"), 2, 12)
    assert photo is None and "Please upload it again" in html


def test_a_caption_past_the_time_limit_is_stopped_with_a_message(captioner, files):
    with pytest.warns(UserWarning, match="took longer than 0 s"):
        photo, html, rows, maps = demo.describe_photo(captioner, str(files["photo"]), 3, 20, timeout=0)
    assert photo is None and rows == [] and maps == []
    assert 'class="caption-problem"' in html and "smaller beam size" in html
    assert demo.get_args_parser().parse_args(["--timeout", "5"]).timeout == 5


def test_a_deadline_stops_beam_search_at_the_next_step(captioner, files, monkeypatch):
    steps = []
    decoder_class, step = type(captioner.model.decoder), type(captioner.model.decoder).step

    def counted_step(self, *args):
        steps.append(1)
        return step(self, *args)

    monkeypatch.setattr(decoder_class, "step", counted_step)
    monkeypatch.setattr(inference, "monotonic", lambda: float(len(steps)))  # a clock that ticks once a step
    photo = open_image(files["photo"])
    captioner.caption([photo], beam_size=3, max_len=20)
    assert len(steps) > 3  # without a deadline
    steps.clear()
    with pytest.raises(TimeoutError):
        captioner.caption([photo], beam_size=3, max_len=20, deadline=3.0)
    assert len(steps) == 3


def test_without_a_model_the_page_says_how_to_get_one(tmp_path):
    assert demo.newest_checkpoint(tmp_path) is None
    for name, age in [("20240101-000000", 100), ("20240102-000000", 0)]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "best.pt").write_bytes(b"")
        os.utime(tmp_path / name / "best.pt", (time.time() - age, time.time() - age))
    assert demo.newest_checkpoint(tmp_path) == tmp_path / "20240102-000000" / "best.pt"
    (tmp_path / "best.pt").write_bytes(b"")  # train.py --config configs/quickstart.yaml, without a timestamp
    assert demo.newest_checkpoint(tmp_path) == tmp_path / "best.pt"
    app = demo.build_app(None)
    texts = [getattr(block, "value", None) for block in app.blocks.values()]
    assert any(isinstance(t, str) and "bash scripts/quickstart.sh" in t and "--checkpoint" in t for t in texts)
    assert "bash scripts/quickstart.sh" in demo.describe_photo(None, "any.png", 3, 20)[1]  # no markdown quotes


def test_uploads_and_returned_images_leave_gradios_cache_once_old(tmp_path, captioner):
    """The app has Gradio sweep its cache every SWEEP_EVERY seconds: an upload younger than FORGET_AFTER stays, an
    older one is deleted and its path forgotten (age 0 stands for the sweep an hour later)."""
    from gradio.route_utils import delete_files_created_by_app

    app = demo.build_app(captioner)
    assert app.delete_cache == (demo.SWEEP_EVERY, demo.FORGET_AFTER)
    upload = tmp_path / "upload.png"
    upload.write_bytes(b"an uploaded photo")
    app.upload_file_set.add(str(upload))
    delete_files_created_by_app(app, demo.FORGET_AFTER)
    assert upload.exists() and str(upload) in app.upload_file_set
    delete_files_created_by_app(app, 0)
    assert not upload.exists() and not app.upload_file_set


def test_only_sessions_idle_for_the_age_are_forgotten(captioner):
    from gradio.state_holder import StateHolder

    sessions = StateHolder()
    sessions.set_blocks(demo.build_app(captioner))
    _ = sessions["idle"], sessions["recent"]  # a request from each creates its record
    sessions.time_last_used["idle"] -= datetime.timedelta(seconds=demo.FORGET_AFTER + 1)
    assert demo.forget_idle_sessions(sessions, demo.FORGET_AFTER) == 1
    assert "idle" not in sessions and "recent" in sessions
    assert demo.forget_idle_sessions(sessions, demo.FORGET_AFTER) == 0


@pytest.mark.parametrize("flag", ["--forget-after", "--timeout"])
@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_times_must_be_positive_numbers_of_seconds(flag, value, capsys):
    with pytest.raises(SystemExit):
        demo.get_args_parser().parse_args([flag, value])
    assert "not a positive number of seconds" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1", "65536", "99999", "http"])
def test_ports_must_be_1_to_65535(value, capsys):
    with pytest.raises(SystemExit):
        demo.get_args_parser().parse_args(["--port", value])
    assert f"--port: {value} is not a port number (1 to 65535)" in capsys.readouterr().err
    assert demo.get_args_parser().parse_args(["--port", "65535"]).port == 65535


@pytest.mark.parametrize(("flags", "message"), [
    (["--device", "gpu0"], "error: unknown device 'gpu0'"),
    (["--device", "cpu", "--bf16"], "error: --bf16: this CPU has no bf16 matrix units"),
])
def test_device_and_bf16_reach_the_model_and_bad_ones_are_one_line_errors(trained_checkpoint, monkeypatch, flags,
                                                                           message):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(demo, "serve", lambda *args: pytest.fail("served a demo it could not load"))
    with pytest.raises(SystemExit, match=message):
        demo.main(demo.get_args_parser().parse_args(["--checkpoint", str(trained_checkpoint), *flags]))


@pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # Gradio's own event statistics, under pandas 3
def test_only_the_newest_request_of_a_page_answers_it(captioner, monkeypatch):
    """A slow caption that finishes after the page asked for another one changes nothing on the page."""
    from gradio_client import Client, handle_file

    slow_photo, fast_photo = demo.EXAMPLES[:2]
    second_started, describe_photo = threading.Event(), demo.describe_photo

    def slow_for_the_first(captioner, path, *args):
        if Path(path).name == slow_photo.name:
            assert second_started.wait(60)
        else:
            second_started.set()
        return describe_photo(captioner, path, *args)

    monkeypatch.setattr(demo, "describe_photo", slow_for_the_first)
    app = demo.build_app(captioner)
    port = browser_tools.free_port()
    demo.serve(app, port=port, prevent_thread_lock=True)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False, analytics_enabled=False)
    try:
        client.predict(handle_file(str(slow_photo)), api_name="/upload")
        first = client.submit(3, 20, api_name="/caption")
        time.sleep(1)  # the first caption is running (and waits for the second)
        client.predict(handle_file(str(fast_photo)), api_name="/upload")
        second = client.submit(3, 20, api_name="/caption")
        assert "caption-text" in second.result(timeout=60)[1]
        assert "caption-text" not in str(first.result(timeout=60)[1])  # answered last, and left the page alone
    finally:
        client.close()
        app.close()


@pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # Gradio's own event statistics, under pandas 3
def test_a_served_demo_forgets_a_session_once_idle(captioner, capsys):
    """Gradio itself keeps a session's record until newer sessions push it out; the served demo drops it."""
    from gradio_client import Client, handle_file

    app = demo.build_app(captioner, forget_after=2)
    port = browser_tools.free_port()
    demo.serve(app, port=port, prevent_thread_lock=True)
    printed = capsys.readouterr().out
    assert f"Serving the demo on http://127.0.0.1:{port}/ (--share adds a temporary public link)" in printed
    assert "share=True" not in printed  # Gradio's advice names its launch() argument, not the demo's --share
    client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False, analytics_enabled=False)
    try:
        client.predict(handle_file(str(demo.EXAMPLES[0])), api_name="/upload")
        assert client.session_hash in app.state_holder
        deadline = time.monotonic() + 30
        while client.session_hash in app.state_holder and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.session_hash not in app.state_holder
    finally:
        client.close()
        app.close()


@pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # Gradio's own event statistics, under pandas 3
@pytest.mark.skipif(not Path(browser_tools.CHROMIUM).exists(),
                    reason=f"{browser_tools.CHROMIUM} not installed (Debian: apt-get install chromium)")
def test_page_in_a_real_browser(trained_checkpoint, captioner, files):
    app = demo.build_app(trained_checkpoint)
    with served_page(app) as (page, port):
        expect(page.get_by_text("run/best.pt", exact=True)).to_be_visible()  # its run folder and name only
        assert str(trained_checkpoint.parent) not in page.content()
        page.locator("#upload input[type=file]").set_input_files(files["photo"])
        assert browser_tools.wait_for_caption(page) == expected_caption(captioner, files["photo"])
        assert page.locator("#nbest").get_by_text("log-prob").is_visible()
        assert page.locator("#attention img").count() > 0
        table = page.locator("#nbest [role=grid]")
        expect(table).to_have_attribute("aria-rowcount", "4")  # a header row and beam 3's captions
        page.get_by_label("range slider for Beam size").press("ArrowRight")  # the keyboard re-captions too
        expect(table).to_have_attribute("aria-rowcount", "5", timeout=30_000)
        box = page.get_by_label("number input for Beam size")
        toast = page.locator(".toast-body").filter(has_text=demo.SETTINGS_RANGE)
        for typed in ["0", ""]:  # out of range, and an emptied box: a message, and the caption stays
            box.fill(typed)
            box.press("Enter")
            expect(toast).to_have_count(1)
            expect(table).to_have_attribute("aria-rowcount", "5")
            assert page.locator("#caption .caption-text").is_visible()
            expect(toast).to_have_count(0, timeout=30_000)  # the message goes after a while
        box.blur()  # the box snaps back into range (1) and captions with it
        expect(table).to_have_attribute("aria-rowcount", "2", timeout=30_000)
        demo.forget_idle_sessions(app.state_holder, 0)  # as the sweeper does to a page left idle
        page.get_by_label("range slider for Beam size").press("ArrowRight")
        expect(page.locator("#caption .caption-problem")).to_have_text(demo.FORGOTTEN, timeout=30_000)
        expect(page.locator("#upload input[type=file]")).to_have_count(1)  # the box is empty, ready for it
        page.locator("#upload input[type=file]").set_input_files(files["photo"])
        assert browser_tools.wait_for_caption(page) == expected_caption(captioner, files["photo"], beam_size=2)

        page.goto(f"http://127.0.0.1:{port}/")  # a fresh page: its upload box is empty again
        page.locator("#upload input[type=file]").set_input_files(files["text"])
        message = page.locator("#caption .caption-problem")
        message.wait_for(state="visible", timeout=30_000)
        assert message.inner_text().startswith("not_a_photo.png could not be read: not an image")
        toast = page.locator(".toast-body").filter(has_text="not_a_photo.png could not be read")
        toast.wait_for(state="visible", timeout=10_000)  # gr.Warning reaches the page from the model thread
        assert "Traceback" not in page.content()


@pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # Gradio's own event statistics, under pandas 3
@pytest.mark.skipif(not Path(browser_tools.CHROMIUM).exists(),
                    reason=f"{browser_tools.CHROMIUM} not installed (Debian: apt-get install chromium)")
def test_a_photo_uploaded_while_the_last_one_is_captioned_gets_its_caption(captioner, files, monkeypatch):
    slow_photo = demo.EXAMPLES[0]
    first_started, release, describe_photo = threading.Event(), threading.Event(), demo.describe_photo

    def slow_for_the_first(captioner, path, *args):
        if Path(path).name == slow_photo.name:
            first_started.set()
            assert release.wait(60)
        return describe_photo(captioner, path, *args)

    monkeypatch.setattr(demo, "describe_photo", slow_for_the_first)
    with served_page(demo.build_app(captioner)) as (page, _):
        try:
            page.locator("#upload input[type=file]").set_input_files(slow_photo)
            assert first_started.wait(60)
            page.locator("#upload").get_by_label("Clear").click()  # the upload box's X, while the caption runs
            with page.expect_request(lambda r: "queue/join" in r.url and files["photo"].name in (r.post_data or "")):
                page.locator("#upload input[type=file]").set_input_files(files["photo"])
            page.wait_for_timeout(1000)  # the photo is stored, and its caption asked for while the first one runs
            release.set()  # the first caption ends (unseen)
            assert browser_tools.wait_for_caption(page, 30_000) == expected_caption(captioner, files["photo"])
        finally:
            release.set()  # a failed check leaves no model thread waiting
