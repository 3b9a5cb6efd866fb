"""Caption a photo in the browser: the best caption, the n-best list with scores, and per-word attention maps.

    python demo/app.py                               # the newest quick-start model (runs/quickstart/[*/]best.pt)
    python demo/app.py --checkpoint path/to/best.pt --port 7860
    python demo/app.py --share                       # also a temporary public gradio.live link
    python demo/app.py --timeout 20                  # stop a caption that takes longer than 20 s
    python demo/app.py --forget-after 600            # forget sessions idle for 10 minutes, and files that old
    python demo/app.py --bf16                        # bfloat16 on a CPU with bf16 matrix units (Intel AMX)

Serves on 127.0.0.1 only, unless --host says otherwise; --share is the only way to a public link. Two captions are
computed at a time and 64 more may wait; each is stopped after --timeout seconds of work, with a message on the page,
so that a slow request (a wide beam on a busy machine) cannot hold a worker for long.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import datetime
import functools
import html
import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
from gradio.state_holder import StateHolder
from PIL import Image

from captioning.batch import describe_failure
from captioning.checkpoint import CheckpointError
from captioning.config import ConfigError
from captioning.data.sources import DEFAULT_MAX_PIXELS, BadImageError, ImageTooLargeError, open_image
from captioning.engine import GLIBC
from captioning.inference import ImageCaptioner
from captioning.visualize import word_overlays

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((Path(__file__).resolve().parent / "examples").glob("*.png"))
NO_MODEL = ("No captioning model is loaded. Train the quick-start model with `bash scripts/quickstart.sh` "
            "(a few minutes on a CPU), or start the demo with `python demo/app.py --checkpoint PATH`.")
MAX_FILE_SIZE = "10mb"
UPLOAD_TYPES = [".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"]  # the browser's file picker
SHOWN_SIDE = 640  # pixels: the longer side of the photo sent back to the page (shown 220 px high)
TIMEOUT = 60.0  # seconds of work per caption
CONCURRENCY, QUEUE_SIZE = 2, 64  # captions computed at once, requests waiting
# Gradio keeps a record of every session (each browser page, each gradio_client user) in memory, closed ones too, until
# launch(state_session_capacity=), by default 10000, newer ones push it out: 30 KiB each here (a copy of every
# component's config), so up to ~290 MiB; the load test adds 41 per pass. 500 bound them to ~15 MiB. A page left idle
# while 500 newer sessions came loses only the photo on show: moving a slider then asks for an upload.
STATE_SESSIONS = 500
# Every upload, and every photo and heat map a caption returns, is a file in Gradio's cache whose path it keeps in
# memory; without delete_cache both stay for the life of the server. Files an hour old are deleted (the time Gradio
# keeps a closed page's session for it to reconnect), and the records of sessions idle that long are dropped (Gradio
# keeps them until newer ones push them out): memory then does not grow with the number of sessions served. Checked
# every 10 minutes.
FORGET_AFTER, SWEEP_EVERY = 3600, 600  # seconds
THEME = gr.themes.Soft(primary_hue="indigo", neutral_hue="slate")
CSS = """
#caption { min-height: 5.5rem; }
#caption .caption-text { font-size: 1.9rem; font-weight: 650; line-height: 1.25; margin: 0.2rem 0; }
#caption .caption-score { color: var(--body-text-color-subdued); font-size: 0.95rem; }
#caption .caption-empty { color: var(--body-text-color-subdued); font-size: 1.1rem; }
#caption .caption-problem { color: var(--error-icon-color); font-size: 1.1rem; font-weight: 600; }
#attention .fixed-height { min-height: 0; max-height: none; }  /* as tall as its rows of heat maps */
#attention .grid-container, #examples .grid-container { padding-top: 2.75rem; }  /* below the gallery's label */
"""
EMPTY_CAPTION = '<div class="caption-empty">Upload a photo or pick an example: its caption appears here.</div>'
FORGOTTEN = ("The server no longer holds this page's photo: pages left idle for a while are forgotten. Please upload "
             "it again or click an example.")
BEAM_SIZES, CAPTION_LENGTHS = (1, 10), (3, 40)  # the sliders' ranges
SETTINGS_RANGE = (f"Beam size takes a whole number from {BEAM_SIZES[0]} to {BEAM_SIZES[1]}, and max length one from "
                  f"{CAPTION_LENGTHS[0]} to {CAPTION_LENGTHS[1]}.")

# glibc gives each thread that allocates its own heap ("arena") and keeps what is freed there for reuse. Requests run
# on a pool of worker threads, so bursts of up to 32 users (scripts/load_test_demo.py) left the server 147 MiB above
# its warmed-up size for good. One heap for the process and a trim after each request hand those pages back. The
# limit must be set before the model loads: threads that run while it loads and the page is built (PyTorch's,
# Gradio's) make 4 more heaps, and a limit set at launch spread the worker threads over all 5 (those 4 grew from 18 to
# 77 MiB in 3 passes, malloc_info): 35 MiB were left after 2 passes then, 17 MiB with the limit set first.
M_ARENA_MAX = -8  # mallopt's option number, from glibc's <malloc.h>


def one_malloc_heap() -> None:
    """One glibc heap for all threads; call it before any thread allocates (before a model loads); glibc only."""
    if GLIBC is not None:
        GLIBC.mallopt(M_ARENA_MAX, 1)


def return_freed_memory() -> None:
    """Give the heap pages freed by a request (its tensors, images, files) back to the system; glibc only."""
    if GLIBC is not None:
        GLIBC.malloc_trim(0)


def forget_idle_sessions(sessions: StateHolder, age: float) -> int:
    """Drop the records Gradio keeps of sessions not used for `age` seconds; returns how many were dropped."""
    cutoff = datetime.datetime.now() - datetime.timedelta(seconds=age)
    with sessions.lock:
        idle = [session for session, used in list(sessions.time_last_used.items()) if used < cutoff]
        for session in idle:
            sessions.session_data.pop(session, None)
            del sessions.time_last_used[session]
    if idle:
        return_freed_memory()
    return len(idle)


def session_sweeper(every: float, age: float):
    """A FastAPI lifespan that calls forget_idle_sessions every `every` seconds while the server runs."""
    @contextlib.asynccontextmanager
    async def lifespan(server):
        async def sweep():
            while True:
                await asyncio.sleep(every)
                forget_idle_sessions(server.state_holder, age)

        task = asyncio.create_task(sweep())
        try:
            yield
        finally:
            task.cancel()

    return lifespan


# The model runs on these threads only, as many as captions run at once. Gradio would run each request on whichever
# of its pool's threads is free (up to 40), and every thread that runs the model keeps the math libraries' per-thread
# buffers until it exits: after a burst of 32 users, ~17 idle threads held 3.6 MB of them.
MODEL_THREADS = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="caption")


async def on_model_thread(fn, *args):
    """Await fn(*args) run on MODEL_THREADS, in this request's context (gr.Warning finds its page through it)."""
    call = functools.partial(contextvars.copy_context().run, fn, *args)
    return await asyncio.get_running_loop().run_in_executor(MODEL_THREADS, call)


def newest_checkpoint(runs: Path = REPO / "runs" / "quickstart") -> Path | None:
    """The most recently written runs/quickstart/<timestamp>/best.pt (quickstart.sh's runs) or runs/quickstart/best.pt
    (train.py with configs/quickstart.yaml as it is), if any."""
    candidates = [*runs.glob("best.pt"), *runs.glob("*/best.pt")]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def caption_html(text: str, score: float) -> str:
    return (f'<div class="caption-text">{html.escape(text or "(no words)")}</div>'
            f'<div class="caption-score">log-probability {score:.2f}</div>')


def problem_html(message: str) -> str:
    return f'<div class="caption-problem">{html.escape(message)}</div>'


def describe_photo(captioner: ImageCaptioner | None, path: str | None, beam_size: int, max_len: int,
                   timeout: float | None = None
                   ) -> tuple[Image.Image | None, str, list[list], list[tuple[Image.Image, str]]]:
    """An image file -> (the photo, at most SHOWN_SIDE pixels wide or high; caption HTML; n-best rows; per-word
    heat maps).

    A file that is not a usable image gives a readable message in the caption area (and a warning toast), never
    a traceback; so do a page without a model and a caption that is still not done after `timeout` seconds (it is
    stopped then, which frees its worker for the next request).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    if captioner is None:
        return None, problem_html(NO_MODEL.replace("`", "")), [], []
    if not path:
        return None, EMPTY_CAPTION, [], []
    try:
        photo = open_image(path, DEFAULT_MAX_PIXELS, captioner.preprocess.size)  # a JPEG decodes at reduced size
    except (BadImageError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            message = (f"{Path(path).name} is no longer on the server: uploads left unused for a while are deleted. "
                       "Please upload it again.")
        elif isinstance(e, ImageTooLargeError):
            message = (f"{Path(path).name} is too large: this demo takes images of up to {DEFAULT_MAX_PIXELS:,} "
                       "pixels. Please upload a smaller one.")
        else:
            message = (f"{Path(path).name} could not be read: {describe_failure(path, e)}. Please upload another "
                       "photo (JPEG, PNG, WebP or another common image format).")
        gr.Warning(html.escape(message))
        return None, problem_html(message), [], []
    try:
        (caption,) = captioner.caption([photo], beam_size=beam_size, max_len=max_len, n_best=beam_size,
                                       deadline=deadline)
    except TimeoutError:
        message = (f"Captioning took longer than {timeout:g} s and was stopped. Try a smaller beam size or max length, "
                   "or try again when the demo is less busy.")
        gr.Warning(html.escape(message))
        return None, problem_html(message), [], []
    rows = [[rank, text, round(score, 3)] for rank, (text, score) in enumerate(caption.nbest, 1)]
    maps = word_overlays(photo, caption.words, caption.attention) if caption.attention is not None else []
    photo.thumbnail((SHOWN_SIDE, SHOWN_SIDE), Image.Resampling.LANCZOS)  # a 9400x9400 PNG took 3.5 s to encode
    return photo, caption_html(caption.text, caption.score), rows, maps


def build_app(model: ImageCaptioner | str | Path | None, timeout: float | None = TIMEOUT,
              forget_after: float = FORGET_AFTER, device: str = "auto", cpu_bf16: bool = False) -> gr.Blocks:
    """The demo page for a captioner (or the checkpoint to load one on `device`, in bf16 on a CPU if `cpu_bf16`);
    None shows how to get a model. A caption is stopped after `timeout` seconds of work (None: never); cached files
    `forget_after` seconds old are deleted (and, once served, sessions idle that long are forgotten)."""
    one_malloc_heap()  # before the model loads: its threads would make heaps of their own
    if isinstance(model, (str, Path)):
        captioner = ImageCaptioner.from_checkpoint(model, device, cpu_bf16)
    else:
        captioner = model
    with gr.Blocks(title="Image captioning demo", analytics_enabled=False,
                   delete_cache=(min(SWEEP_EVERY, forget_after), forget_after)) as app:
        gr.Markdown("# Image captioning\nA CNN encoder looks at the photo and an LSTM decoder writes a caption word "
                    "by word, with beam search. Upload a photo or click an example. The quick-start model has only "
                    "seen coloured circles, squares and triangles, so it describes everything in those words.")
        if captioner is None:
            gr.Markdown(f"> **{NO_MODEL}**", elem_id="no-model")
        else:
            # the run folder and file only: the server's directory layout is not the visitors' business
            source = Path(*Path(model).parts[-2:]) if isinstance(model, (str, Path)) else "a model given in code"
            kind = "attention" if captioner.has_attention else "no attention"
            gr.Markdown(f"Model: `{source}` ({kind}, {len(captioner.model.vocab)}-word vocabulary)")
        current = gr.State(None)  # path of the image on show
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=300):
                upload = gr.File(label="Upload a photo (up to 10 MB)", file_types=UPLOAD_TYPES, height=120,
                                 elem_id="upload")
                examples = gr.Gallery([str(p) for p in EXAMPLES], label="Or click an example", columns=4, rows=1,
                                      height=184, allow_preview=False, object_fit="contain", buttons=[],
                                      elem_id="examples")
                with gr.Accordion("Decoding settings", open=True):
                    beam = gr.Slider(*BEAM_SIZES, value=3, step=1, precision=0, label="Beam size",
                                     info="1 = greedy; a larger beam searches more captions and lists them all")
                    max_len = gr.Slider(*CAPTION_LENGTHS, value=20, step=1, precision=0, label="Max length (words)")
            with gr.Column(scale=3, min_width=360):
                caption = gr.HTML(EMPTY_CAPTION, label="Caption", elem_id="caption", container=True)
                with gr.Row(equal_height=False):
                    photo = gr.Image(label="Photo", type="pil", interactive=False, height=220,
                                     scale=1, min_width=160, buttons=[])
                    nbest = gr.Dataframe(headers=["#", "caption", "log-prob"],
                                         datatype=["number", "str", "number"], label="n-best captions (one per beam)",
                                         interactive=False, wrap=True, column_widths=["9%", "71%", "20%"], scale=2,
                                         elem_id="nbest")
                gallery = gr.Gallery(label="Where the model looked for each word", columns=6, height="auto",
                                     object_fit="contain", fit_columns=False,
                                     visible=captioner is not None and captioner.has_attention,
                                     elem_id="attention")

        outputs = [photo, caption, nbest, gallery]
        # A page's requests can run side by side (CONCURRENCY), so a slow one (a large photo) may finish after the
        # one that followed it: only the newest request of a session answers its page; earlier ones change nothing.
        newest: dict[str, int] = {}  # session -> ticket of its newest request, until that request has answered
        tickets = itertools.count()

        def describe(path: str | None, beam_size: float, length: float):
            try:
                if path and Path(path) not in EXAMPLES:
                    with contextlib.suppress(OSError):
                        os.utime(path)  # in use: Gradio deletes cached files by age (delete_cache), not by last use
                return describe_photo(captioner, path, int(beam_size), int(length), timeout)
            finally:
                return_freed_memory()

        async def run(path: str | None, beam_size: float, length: float, request: gr.Request):
            ticket = newest[request.session_hash] = next(tickets)
            result = await on_model_thread(describe, path, beam_size, length)
            if newest.get(request.session_hash) != ticket:
                return [gr.skip()] * len(outputs)
            del newest[request.session_hash]
            return result

        async def rerun(path: str | None, beam_size: float | None, length: float | None, shown: str,
                        request: gr.Request):
            """run, for a slider moved on a page that shows a caption: if its session was forgotten (and the photo
            with it), say so and empty the upload box for the next one, rather than empty the page. A number typed
            into a slider's box arrives as typed (it snaps into range only when the box loses focus): one out of
            range, or none, leaves the page as it is."""
            try:
                beam_size, length = beam.preprocess(beam_size), max_len.preprocess(length)
            except (gr.Error, TypeError):  # TypeError: an emptied box
                gr.Warning(SETTINGS_RANGE)
                return [gr.skip()] * (len(outputs) + 1)
            if path is None and captioner is not None and shown != EMPTY_CAPTION:
                gr.Warning(html.escape(FORGOTTEN))
                return None, problem_html(FORGOTTEN), [], [], None
            return *await run(path, beam_size, length, request), gr.skip()

        def store_upload(path: str | None) -> str | None:
            return path

        def clear(request: gr.Request):
            newest.pop(request.session_hash, None)  # a caption still running for the cleared photo stays unseen
            return None, None, EMPTY_CAPTION, [], []

        def pick_example(evt: gr.SelectData) -> tuple[str, None]:
            return str(EXAMPLES[evt.index]), None

        inputs, private = [current, beam, max_len], {"api_visibility": "private"}
        # always_last: a photo chosen while the previous one is still captioned is captioned next (Gradio's default
        # for these events drops a trigger while the last one runs, and the page would keep waiting)
        upload.upload(store_upload, upload, current, api_name="upload").then(run, inputs, outputs, api_name="caption",
                                                                             trigger_mode="always_last")
        upload.clear(clear, None, [current, *outputs], **private)
        examples.select(pick_example, None, [current, upload], **private).then(run, inputs, outputs,
                                                                               trigger_mode="always_last", **private)
        # change: dragging, arrow keys, typing a number, the reset button; always_last: while one caption runs, only
        # the slider's latest value waits
        gr.on([beam.change, max_len.change], rerun, [*inputs, caption], [*outputs, upload],
              trigger_mode="always_last", preprocess=False, **private)
    return app.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)


def serve(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
          prevent_thread_lock: bool = False) -> None:
    """Launch an app from build_app (which limits malloc to one heap) with the demo's limits: uploads up to
    MAX_FILE_SIZE, STATE_SESSIONS sessions kept, and forgotten on the schedule its cached files are deleted; its
    theme and style."""
    app.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_FILE_SIZE, theme=THEME, css=CSS,
               state_session_capacity=STATE_SESSIONS, prevent_thread_lock=True, quiet=True,
               app_kwargs={"lifespan": session_sweeper(*app.delete_cache)})
    # quiet: Gradio's own advice names its launch() arguments; a public link still prints its address
    print(f"Serving the demo on {app.local_url}" + ("" if share else " (--share adds a temporary public link)"),
          flush=True)
    if not prevent_thread_lock:
        app.block_thread()


def seconds(text: str) -> float:
    """A positive number of seconds, for the command line."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def port(text: str) -> int:
    """A TCP port number, for the command line."""
    value = int(text) if text.isdigit() else 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port number (1 to 65535)")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="default: the newest runs/quickstart/*/best.pt or runs/quickstart/best.pt")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves every network interface")
    p.add_argument("--port", type=port, default=7860, help="the port to serve on (1 to 65535)")
    p.add_argument("--share", action="store_true", help="create a temporary public link through gradio.live")
    p.add_argument("--timeout", type=seconds, default=TIMEOUT,
                   help="seconds of work one caption may take before it is stopped with a message on the page")
    p.add_argument("--forget-after", type=seconds, default=FORGET_AFTER,
                   help="seconds after which idle sessions and cached uploads and results are forgotten")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--bf16", action="store_true",
                   help="run the model in bfloat16 on a CPU with bf16 matrix units (Intel AMX): faster, a few "
                        "captions change by a word")
    return p


def main(args: argparse.Namespace) -> None:
    checkpoint = args.checkpoint or newest_checkpoint()
    if checkpoint is None:
        print(f"warning: {NO_MODEL}")
    try:
        app = build_app(checkpoint, args.timeout, args.forget_after, args.device, args.bf16)
    except (CheckpointError, ConfigError) as e:
        raise SystemExit(f"error: {e}") from None
    try:
        serve(app, args.host, args.port, args.share)
    except OSError:  # Gradio: "Cannot find empty port", or an address this machine does not have
        raise SystemExit(f"error: cannot serve on {args.host}:{args.port}, which is in use or not an address of "
                         "this machine; pass another --port or --host") from None


if __name__ == "__main__":
    main(get_args_parser().parse_args())
