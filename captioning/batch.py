"""Caption many image files: expand inputs to paths, decode them in DataLoader workers, write results as they come.

Results are appended and flushed after every batch, so a killed run keeps what it did, and a new run skips every
image its output already holds (resume). Unreadable files are reported once each (path and reason) and skipped;
they are never written to the results file, so it always parses and a later run tries them again.

Formats: JSON Lines ({"path", "caption", "score"[, "nbest"]} per line), CSV (the same columns, nbest as JSON) and
the COCO results format ([{"image_id", "caption"}]). A COCO array cannot be appended to, so its records go to a
JSON Lines sidecar (<out stem>.progress.jsonl, the record of what is done) and the array is rewritten from it at the
end of every run that finishes. Beside every output, <out>.settings.json records the checkpoint and the decoding
options that made its captions, so a run with others does not resume it; one run at a time writes an output (a lock).
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import re
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from captioning.data.datasets import Preprocess
from captioning.data.sources import DEFAULT_MAX_PIXELS, BadImageError, open_image
from captioning.engine import StopFlag, Stopped, leave_signals_to_main
from captioning.files import lock_exclusive, write_whole
from captioning.inference import Caption, ImageCaptioner
from captioning.visualize import attention_figure

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "csv", "coco")
# Extensions of the image files a folder search picks up: those Pillow can open, less formats that hold no photo
# (video, scientific data, vector graphics that need Ghostscript), plus HEIC/HEIF (phone cameras), which need the
# pillow-heif plugin and are otherwise reported as unreadable rather than passed over.
NOT_PHOTOS = frozenset({".bufr", ".eps", ".fit", ".fits", ".grib", ".h5", ".hdf", ".mpeg", ".mpg", ".ps", ".wmf",
                        ".emf"})
IMAGE_SUFFIXES = frozenset(ext for ext, fmt in Image.registered_extensions().items()
                           if fmt in Image.OPEN and ext not in NOT_PHOTOS) | {".heic", ".heif"}
LIST_SUFFIXES = (".txt", ".lst")
RECORD_START = '{"path": '  # how every JSON Lines record this program writes begins
COCO_NAME = re.compile(r"COCO_[a-z]+\d{4}_(\d+)")  # COCO 2014 file names: COCO_val2014_000000391895


# ---------------------------------------------------------------------------------------------------- inputs


def expand_inputs(inputs: Iterable[str | Path], recursive: bool = True,
                  on_error: Callable[[OSError], None] | None = None, skip: str | Path | None = None) -> Iterator[str]:
    """Image paths from files, folders (image files inside, recursively unless `recursive` is off; hidden files and
    folders, symbolic links to folders and the folder `skip`, where the run writes its attention maps, left out) and
    list files (.txt/.lst: one file or folder per line, relative to the list file; blank lines and lines starting
    with '#' ignored). A file named directly is tried whatever its extension, so a bad one gets reported. A folder
    that cannot be read is passed to `on_error` (ignored without one)."""
    skip = os.path.realpath(skip) if skip is not None else None
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            yield from _walk(path, recursive, on_error, skip)
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            for entry in _read_list(path):
                yield from _walk(Path(entry), recursive, on_error, skip) if os.path.isdir(entry) else (entry,)
        elif path.is_file():
            yield str(path)
        elif _is_link_loop(path):
            raise ValueError(f"input is a symbolic link loop: {path} (a link that leads back to itself); fix or "
                             "remove the link")
        else:
            raise FileNotFoundError(f"input not found: {path} (pass image files, folders, or .txt files listing "
                                    "image paths one per line)")


def _walk(folder: Path, recursive: bool, on_error: Callable[[OSError], None] | None, skip: str | None
          ) -> Iterator[str]:
    for root, dirs, files in os.walk(folder, onerror=on_error):
        if skip is not None and os.path.realpath(root) == skip:
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for name in sorted(files):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                yield os.path.join(root, name)


def _read_list(list_file: Path) -> Iterator[str]:
    # utf-8-sig: a list saved by Windows Notepad starts with a byte-order mark. Bytes that are not UTF-8 (file names
    # from an old archive) pass through as they are, so the path opens the file the list names.
    with open(list_file, encoding="utf-8-sig", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            if "\0" in line:  # no path holds one; every line of a UTF-16 or UTF-32 text does
                raise ValueError(f"{list_file}:{lineno}: holds NUL characters, so it is not UTF-8 text (UTF-16, as "
                                 "some Windows editors save a list?); save it as UTF-8")
            entry = line.strip()
            if entry and not entry.startswith("#"):
                yield str(list_file.parent / entry)  # an absolute entry stays absolute


def coco_image_id(path: str) -> int | str:
    """COCO results image_id of a file: its stem as an int when numeric (000000391895.jpg -> 391895, and the
    number of a COCO 2014 name like COCO_val2014_000000391895.jpg), else the stem itself."""
    stem = Path(path).stem
    match = COCO_NAME.fullmatch(stem)
    if match:
        return int(match.group(1))
    return int(stem) if stem.isdigit() else stem


def describe_failure(path: str | Path, error: Exception) -> str:
    """Why an image could not be used, without repeating its path."""
    if isinstance(error, FileNotFoundError):
        return "symbolic link loop" if _is_link_loop(path) else "file not found"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error).removeprefix(f"{Path(path)}: ")


def _is_link_loop(path: str | Path) -> bool:
    """Whether `path` leads through symbolic links back to itself, which os.path and pathlib report as missing."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


# ---------------------------------------------------------------------------------------------------- loading


class ImageFiles(Dataset):
    """Item i: (i, preprocessed image (3, H, W)), or (i, reason) when file i cannot be used, so one bad file never
    stops a DataLoader worker."""

    def __init__(self, paths: list[str], preprocess: Preprocess, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.paths, self.preprocess, self.max_pixels = paths, preprocess, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | str]:
        try:
            return i, self.preprocess(open_image(self.paths[i], self.max_pixels, self.preprocess.size))
        except (BadImageError, OSError) as e:
            return i, describe_failure(self.paths[i], e)


@dataclass
class FileBatch:
    indices: list[int]  # dataset indices of the rows of `images`
    images: torch.Tensor | None  # (B, 3, H, W); None when every file of the batch failed
    failures: list[tuple[int, str]]  # (dataset index, reason)


def collate_files(items: list[tuple[int, torch.Tensor | str]]) -> FileBatch:
    good = [(i, x) for i, x in items if isinstance(x, torch.Tensor)]
    failures = [(i, x) for i, x in items if isinstance(x, str)]
    images = torch.stack([x for _, x in good]) if good else None
    return FileBatch([i for i, _ in good], images, failures)


# ---------------------------------------------------------------------------------------------------- writers


def format_for(out: str | Path) -> str:
    """The output format an --out file name implies: .csv -> csv, .json -> coco, anything else -> jsonl."""
    suffix = Path(out).suffix.lower()
    return {".csv": "csv", ".json": "coco"}.get(suffix, "jsonl")


def image_key(path: str) -> str:
    """What identifies an image file across runs: its absolute path with symbolic links resolved."""
    return os.path.realpath(path)


def json_line(record: dict) -> str:
    """One JSON Lines record, readable UTF-8. A file name that is not valid UTF-8 (a Latin-1 name from an old
    archive: its undecodable bytes arrive as lone surrogates) cannot be written as UTF-8, so such a record escapes its
    non-ASCII characters instead; json.loads gives back the same name, and open() the same file."""
    text = json.dumps(record, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(record)
    return text + "\n"


def _resume_error(path: Path, lineno: int, problem: str) -> ValueError:
    return ValueError(f"{path}:{lineno}: {problem}, so it cannot be resumed; pass --overwrite to start it afresh, "
                      "or write to another file with --out")


def _cut(path: Path, end: int) -> None:
    """Cut the file at byte `end`, where its last whole record ends (the rest is a record a killed run left half
    written), ending it with a newline if it lacks one, so appending starts on a fresh line."""
    with open(path, "rb+") as f:
        if f.seek(0, os.SEEK_END) > end:
            log.warning("%s: its last record, which a killed run left half written, is dropped (that image is "
                        "captioned again)", path)
        f.truncate(end)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                f.write(b"\n")


class ResultWriter(ABC):
    """Appends caption records to a results file (`path`, which is `out` but for COCO), one flushable record per
    image, and knows which images the file already holds (`done`: `image_key`s).

    A file to resume must be one this program wrote: anything else is refused (never overwritten) unless `overwrite`.
    `settings` (the checkpoint and the decoding options, in JSON types) are recorded beside `out` when it starts, and
    a resume with other settings is refused. An exclusive lock on the file keeps a second run out while one writes.
    """

    errors = "strict"  # how the file encodes text that is not valid UTF-8

    def __init__(self, out: str | Path, n_best: int = 1, overwrite: bool = False, settings: dict | None = None):
        self.out, self.n_best = Path(out), n_best
        self.path = self.records_path(self.out)
        self.settings_path = self.out.with_name(self.out.name + ".settings.json")
        self.done: set[str] = set()
        if self.out.is_dir():
            raise ValueError(f"--out {self.out} is a folder; name a results file, such as "
                             f"{self.out / 'captions.jsonl'}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Opened to append, which changes nothing, so that the file is locked before it is read, cut or emptied.
        self.file = open(self.path, "a", encoding="utf-8", errors=self.errors, newline="")
        try:
            lock_exclusive(self.file, f"{self.out} is being written by another caption.py run; let it finish (a "
                                      "rerun then resumes it), or write to another file with --out")
            if overwrite or not os.path.getsize(self.path):  # an empty file has nothing to resume
                self.file.seek(0)
                self.file.truncate()
                self._record(settings)
            else:
                self._resume(settings)
                self.file.seek(0, os.SEEK_END)  # where the file ends now that a half-written record is cut
        except BaseException:
            self.file.close()
            raise

    @staticmethod
    def records_path(out: Path) -> Path:
        """The file the records are appended to."""
        return out

    def _record(self, settings: dict | None) -> None:
        if settings is not None:
            write_whole({self.settings_path: json.dumps(settings, indent=1) + "\n"})

    def _resume(self, settings: dict | None) -> None:
        """Refuse settings other than the recorded ones before anything is cut; read the file. A file without a record
        (from before records, or whose record was deleted) is resumed as asked, unchecked, and gets no record: what
        made its captions is unknown."""
        try:
            recorded = json.loads(self.settings_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            recorded = None
        except ValueError:
            raise ValueError(f"{self.settings_path} is damaged: delete it to resume {self.out} without checking that "
                             "this run's checkpoint and options made it, or pass --overwrite to start afresh") from None
        if settings is not None and recorded is not None:
            changed = _changed_settings(recorded, settings)
            if changed:
                raise ValueError(f"{self.out} was made with {changed}: resume it with those, pass --overwrite to "
                                 "start it afresh, or write to another file with --out")
        self._check_paths(self._read_existing())
        if settings is not None and recorded is None:
            log.warning("%s has no record of the checkpoint and options that made it (%s is missing), so it is resumed "
                        "as asked without that check; pass --overwrite to caption it afresh with a record", self.out,
                        self.settings_path.name)

    @abstractmethod
    def _read_existing(self) -> list[str]:
        """Check the file (which exists) is one to resume, cut a half-written last record, fill `done`, and return
        the image paths the file holds, as written."""

    def _check_paths(self, paths: list[str]) -> None:
        """Paths are written as given, so relative ones are relative to the folder the first run started in. When
        none of them exists from here, this run started elsewhere and would caption every image again."""
        relative = [p for p in paths if not os.path.isabs(p)]
        if relative and not any(os.path.exists(p) for p in relative):
            raise ValueError(
                f"{self.path} holds {len(relative)} image paths relative to another folder (such as {relative[0]}), "
                f"none of them found from {os.getcwd()}: run the command from the folder its first run started in; "
                "if those images were moved or deleted, pass --overwrite to start afresh, or write to another file "
                "with --out")

    @abstractmethod
    def write(self, path: str, caption: Caption) -> None:
        """Append one image's record."""

    def flush(self) -> None:
        self.file.flush()

    def close(self, finished: bool = True) -> None:
        """Close the file (and with it the lock); `finished` says the run completed (it did not stop on an error)."""
        self.file.close()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(finished=exc_type is None)

    def _nbest(self, caption: Caption) -> list[dict]:
        return [{"caption": text, "score": round(score, 4)} for text, score in caption.nbest]


class JsonlWriter(ResultWriter):
    """{"path", "caption", "score"[, "nbest": [{"caption", "score"}, ...]]} per line."""

    def _read_existing(self) -> list[str]:
        paths, end = [], 0
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.decode("utf-8", "surrogateescape")
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        tail = line.rstrip("\0")  # a machine that crashed can leave zero bytes where writes were lost
                        if not raw.endswith(b"\n") and (tail.startswith(RECORD_START) or RECORD_START.startswith(tail)):
                            break  # the last record, cut off by a killed run
                        raise _resume_error(self.path, lineno, "is not JSON Lines") from None
                    if not isinstance(record, dict) or not isinstance(record.get("path"), str):
                        raise _resume_error(self.path, lineno, 'holds a record without a "path"')
                    paths.append(record["path"])
                end += len(raw)
        _cut(self.path, end)
        self.done.update(map(image_key, paths))
        return paths

    def write(self, path: str, caption: Caption) -> None:
        record = {"path": path, "caption": caption.text, "score": round(caption.score, 4)}
        if self.n_best > 1:
            record["nbest"] = self._nbest(caption)
        self.file.write(json_line(record))


class CsvWriter(ResultWriter):
    """Columns path, caption, score[, nbest (a JSON list)] under a header row. A file name that is not valid UTF-8
    is written as its own bytes (as `ls` prints it), so the file holds the name that opens the image."""

    errors = "surrogateescape"

    def __init__(self, out: str | Path, n_best: int = 1, overwrite: bool = False, settings: dict | None = None):
        self.columns = ["path", "caption", "score"] + (["nbest"] if n_best > 1 else [])
        super().__init__(out, n_best, overwrite, settings)
        self.csv = csv.writer(self.file)
        if self.file.tell() == 0:
            self.csv.writerow(self.columns)

    def _read_existing(self) -> list[str]:
        text = self.path.read_bytes().decode("utf-8", "surrogateescape")
        lines = io.StringIO(text, newline="")  # a quoted field may hold a newline, so a row can span lines
        reader = csv.reader(lines)
        paths, start, end = [], 0, 0  # start: characters, end: bytes, where the whole rows read so far end
        for row in reader:
            consumed = lines.tell()  # characters read so far: up to the end of this row
            if not row and text[consumed - 1] == "\n":
                continue  # a blank line
            whole = text[consumed - 1] == "\n" and len(row) == len(self.columns)
            if not whole and consumed == len(text) and (end or ",".join(self.columns).startswith(text)):
                break  # the last row (or the header), cut off by a killed run
            if not end and row != self.columns:
                raise _resume_error(self.path, 1, f"has the columns {row}, not {self.columns}")
            if not whole:
                raise _resume_error(self.path, reader.line_num, f"has {len(row)} columns, not {len(self.columns)}")
            if end:
                paths.append(row[0])
            end += len(text[start:consumed].encode("utf-8", "surrogateescape"))
            start = consumed
        _cut(self.path, end)
        self.done.update(map(image_key, paths))
        return paths

    def write(self, path: str, caption: Caption) -> None:
        row = [path, caption.text, round(caption.score, 4)]
        if self.n_best > 1:
            row.append(json.dumps(self._nbest(caption), ensure_ascii=False))
        self.csv.writerow(row)


class CocoWriter(JsonlWriter):
    """COCO results [{"image_id", "caption"}]: records go to a JSON Lines sidecar as they come; the array is
    rewritten from the sidecar (streamed, then atomically replaced) when a run finishes. A results file without its
    sidecar was not written here, and is refused rather than replaced."""

    def __init__(self, out: str | Path, n_best: int = 1, overwrite: bool = False, settings: dict | None = None):
        out = Path(out)
        progress = self.records_path(out)
        if out.exists() and not progress.exists() and not overwrite:
            raise ValueError(f"{out} exists and has no {progress.name} beside it, so it is not a results "
                             "file of an earlier run to resume; pass --overwrite to replace it, or write to another "
                             "file with --out")
        super().__init__(out, n_best, overwrite, settings)

    @staticmethod
    def records_path(out: Path) -> Path:
        return out.with_name(out.stem + ".progress.jsonl")

    def close(self, finished: bool = True) -> None:
        try:
            if finished:  # under the lock, so that no other run appends meanwhile
                self.file.flush()
                self._write_results()
        finally:
            super().close(finished)

    def _write_results(self) -> None:
        tmp = self.out.with_name(self.out.name + ".tmp")
        files = {}  # image_id -> the files that gave it
        with open(tmp, "w", encoding="utf-8") as out:
            out.write("[")
            with open(self.path, encoding="utf-8") as progress:
                for line in progress:
                    if line.strip():
                        record = json.loads(line)
                        entry = {"image_id": coco_image_id(record["path"]), "caption": record["caption"]}
                        out.write(("\n" if not files else ",\n") + json_line(entry).rstrip("\n"))
                        files.setdefault(entry["image_id"], []).append(record["path"])
            out.write("\n]\n")
        os.replace(tmp, self.out)
        _warn_of_ids(files, self.out)


def _warn_of_ids(files: dict[int | str, list[str]], results: Path) -> None:
    """COCO's caption evaluation takes one caption per image, named by its numeric id: say which files break that."""
    shared = {i: paths for i, paths in files.items() if len(paths) > 1}
    named = [path for i, paths in files.items() if isinstance(i, str) for path in paths]
    if shared:
        i, paths = next(iter(shared.items()))
        log.warning("%s: %d image_id(s) belong to more than one file (%s: %s), which COCO's caption evaluation does "
                    "not accept; caption one folder per run", results, len(shared), i, ", ".join(paths[:3]))
    if named:
        log.warning("%s: %d file(s) have no COCO image id in their name (%s), so their image_id is the name itself; "
                    "COCO's caption evaluation needs numbers", results, len(named), named[0])


def open_writer(out: str | Path, fmt: str, n_best: int = 1, overwrite: bool = False,
                settings: dict | None = None) -> ResultWriter:
    """A writer for `fmt` ('jsonl', 'csv' or 'coco'); without `overwrite` it resumes what `out` already holds, if
    `settings` (see ResultWriter) are the ones that made it."""
    writers = {"jsonl": JsonlWriter, "csv": CsvWriter, "coco": CocoWriter}
    if fmt not in writers:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {list(writers)}")
    return writers[fmt](out, n_best, overwrite, settings)


def _changed_settings(recorded: dict, settings: dict) -> str:
    """What differs between the recorded settings and this run's, as options: '--beam-size 3 (this run asks 5)'.
    "checkpoint" (a path) only names the file; "weights" (a digest of them) says whether it is the same model. A
    setting only one side has (one added to caption.py later) is not compared."""
    changes = []
    for key, value in settings.items():
        old = recorded.get(key, value)
        if key == "checkpoint" or old == value:
            continue
        flag = "--" + key.replace("_", "-")
        if key == "weights":
            changes.append(f"the checkpoint {recorded.get('checkpoint')} (this run's {settings.get('checkpoint')} "
                           "holds other weights)")
        elif isinstance(value, bool):
            changes.append(f"{flag} (this run asks without it)" if old else f"no {flag} (this run asks {flag})")
        else:
            changes.append(f"{flag} {old} (this run asks {value})")
    return ", ".join(changes)


# ---------------------------------------------------------------------------------------------------- the run


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0  # already in the output
    without_map: int = 0  # of those, the images with no attention map (when maps are asked for)
    failed: int = 0
    repeated: int = 0  # a file named again, e.g. through a symbolic link: captioned once, under its first name
    seconds: float = 0.0

    def __str__(self) -> str:
        rate = self.done / self.seconds if self.seconds > 0 else 0.0
        repeated = f", {self.repeated} named twice (captioned once)" if self.repeated else ""
        return (f"captioned {self.done}, skipped {self.skipped} (already captioned), failed {self.failed}{repeated}, "
                f"{self.seconds:.1f} s, {rate:.1f} images/s")


def attention_file(folder: Path, path: str) -> Path:
    """Where the attention figure of image `path` goes: under `folder` at the image's path from the current folder,
    extension kept and .png added (so photo.jpg and photo.png get one each); an image outside the current folder
    goes under folder/@root at its absolute path (and a first folder named @... gains an @, so no path is taken
    twice). One file per image, the same in a resumed run."""
    path = Path(os.path.abspath(path))
    cwd = Path.cwd()
    if path.is_relative_to(cwd):
        parts = path.relative_to(cwd).parts
        parts = ("@" + parts[0], *parts[1:]) if parts[0].startswith("@") else parts
    else:
        parts = ("@root", *path.parts[1:])
    return folder.joinpath(*parts).with_name(path.name + ".png")


def _save_attention(path: str, caption: Caption, attention_dir: Path, max_pixels: int) -> None:
    """Draw the caption's attention over the photo, read again at full size. A photo gone or changed since its batch
    was read gets no map, and says so; the caption is kept."""
    try:
        photo = open_image(path, max_pixels)
    except (BadImageError, OSError) as e:
        tqdm.write(f"no attention map: {path}: {e}", file=sys.stderr)
        return
    figure_path = attention_file(attention_dir, path)
    figure_path.parent.mkdir(parents=True, exist_ok=True)
    attention_figure(photo, caption.words, caption.attention).save(figure_path)


def caption_files(captioner: ImageCaptioner, paths: Iterable[str], writer: ResultWriter, beam_size: int = 3,
                  max_len: int = 20, n_best: int = 1, batch_size: int = 16, num_workers: int = 2,
                  max_pixels: int = DEFAULT_MAX_PIXELS, attention_dir: str | Path | None = None,
                  progress: bool = True) -> Summary:
    """Caption every path not yet in `writer` (duplicates once), writing and flushing after each batch. SIGTERM or
    Ctrl-C stops the run once the batch at hand is written, with Stopped.

    With `attention_dir` (attention models only) each image's per-word heat maps are saved there as one PNG.
    """
    start = time.perf_counter()
    summary = Summary()
    todo, seen = [], set()
    for path in paths:
        key = image_key(path)
        if key in writer.done:
            summary.skipped += 1
            summary.without_map += attention_dir is not None and not attention_file(Path(attention_dir), path).exists()
        elif key in seen:
            summary.repeated += 1
        else:
            seen.add(key)
            todo.append(path)
    if attention_dir is not None:
        if not captioner.has_attention:
            raise ValueError("attention heat maps need a model with attention (model.decoder=attention)")
        attention_dir = Path(attention_dir)
        attention_dir.mkdir(parents=True, exist_ok=True)
    loader = DataLoader(ImageFiles(todo, captioner.preprocess, max_pixels), batch_size, collate_fn=collate_files,
                        num_workers=num_workers, pin_memory=captioner.device.type == "cuda",
                        worker_init_fn=leave_signals_to_main)
    with StopFlag() as stop, tqdm(total=len(todo), unit="img", desc="captioning", disable=not progress,
                                  dynamic_ncols=True) as bar:
        for batch in loader:
            for i, reason in batch.failures:
                tqdm.write(f"failed: {todo[i]}: {reason}", file=sys.stderr)
            if batch.images is not None:
                captions = captioner.caption_batch(batch.images, beam_size=beam_size, max_len=max_len, n_best=n_best)
                for i, caption in zip(batch.indices, captions):
                    if attention_dir is not None and caption.attention is not None:  # before the record that says done
                        _save_attention(todo[i], caption, attention_dir, max_pixels)
                    writer.write(todo[i], caption)
            writer.flush()
            summary.done += len(batch.indices)
            summary.failed += len(batch.failures)
            bar.update(len(batch.indices) + len(batch.failures))
            if stop.signal is not None:
                raise Stopped(stop.signal)
    summary.seconds = time.perf_counter() - start
    return summary
