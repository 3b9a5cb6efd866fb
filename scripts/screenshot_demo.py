"""Screenshot the demo page with a captioned example, for the README.

    python scripts/screenshot_demo.py --checkpoint runs/quickstart/<run>/best.pt --out docs/demo.png

Starts the demo on a free localhost port, opens it in headless Chromium (Playwright), clicks the first example,
waits for its caption and saves a full-page screenshot. tests/test_demo.py drives the page the same way.
"""

import argparse
import importlib.util
import socket
import sys
from pathlib import Path
from types import ModuleType

from playwright.sync_api import Browser, Page, Playwright, sync_playwright

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
# Headless and offline: without these, Chromium stalls on network lookups on a machine with no internet.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def load_demo() -> ModuleType:
    """demo/app.py as a module (demo/ is not a package); importing it starts nothing."""
    spec = importlib.util.spec_from_file_location("demo_app", REPO / "demo" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_browser(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def wait_for_caption(page: Page, timeout_ms: float = 60_000) -> str:
    """The caption text, once the page shows one."""
    caption = page.locator("#caption .caption-text")
    caption.wait_for(state="visible", timeout=timeout_ms)
    return caption.inner_text()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="an attention model shows heat maps too")
    p.add_argument("--out", default="docs/demo.png")
    p.add_argument("--example", type=int, default=0, help="which example image to caption")
    p.add_argument("--width", type=int, default=1280)
    return p


def main(args: argparse.Namespace) -> None:
    if not Path(CHROMIUM).exists():
        sys.exit(f"error: {CHROMIUM} not found; install Chromium (Debian: apt-get install chromium)")
    demo = load_demo()
    app = demo.build_app(args.checkpoint)
    port = free_port()
    demo.serve(app, port=port, prevent_thread_lock=True)
    try:
        with sync_playwright() as p:
            browser = launch_browser(p)
            page = browser.new_page(viewport={"width": args.width, "height": 900}, device_scale_factor=1)
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#examples button").nth(args.example).click()
            text = wait_for_caption(page)
            if page.locator("#attention").is_visible():  # attention models: wait for the heat maps too
                page.locator("#attention img").first.wait_for(state="visible")
            page.wait_for_timeout(500)  # let the images finish fading in
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        app.close()
    print(f"caption {text!r}; screenshot in {args.out}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
