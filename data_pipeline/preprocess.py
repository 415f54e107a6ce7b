"""Videos -> sharded ArrayRecord files of codec primitives (docs/architecture.md §3). Beam-free.

    python -m data_pipeline.preprocess --videos clips/ --output primitives/ --workers 2

Each input is decoded by timestamp, resampled to --fps, squashed to --size, re-encoded in memory
as MPEG-4 Part 2 with a fixed --gop, and decoded again with its motion vectors; every --fusion
frames a step stores the decoded RGB and the motion fused since the previous step (the residual is
derived on read). One record per video in `primitives-SSSSS-of-NNNNN.array_record`; inputs go to
shards round-robin in sorted order, shards to tasks round-robin, so `--task-index/--num-tasks`
(e.g. a SLURM array) split the work with no coordination and `records.open` reads the union.

Exit status: 0 when done (bad videos are listed in errors.jsonl), 1 on bad arguments or when every
video this run processed was rejected, 2 on bad flag values.

Output directory:
  primitives-*.array_record   one record per good video (see data_pipeline/records.py)
  primitives-*.json           per-shard sidecar: settings, inputs, per-video counts, errors
  manifest.json               settings, shards, per-video counts, totals (rewritten by every task)
  errors.jsonl                one line per rejected input: {"path", "video_id", "reason"}

Safe to rerun: finished shards are skipped, a shard appears only when complete (temp + rename),
and a killed run resumes to the same bytes as an uninterrupted one, whatever --workers is.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import glob
import json
import multiprocessing
import os
import sys
import time
from typing import Iterator

from tqdm import tqdm

from cope_jax.errors import UserError
from data_pipeline import codec, records

VIDEO_EXTENSIONS = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
                    ".flv", ".wmv", ".3gp", ".ogv", ".gif", ".y4m", ".h264", ".hevc", ".ivf", ".mjpeg"}
FORMAT = "cope-jax primitives v1"


class InputError(UserError):
    """Bad command-line input (no videos found, unreadable list, settings clash with the output)."""


@dataclasses.dataclass(frozen=True)
class Input:
    path: str
    video_id: str
    shard: int
    duplicate_of: str | None = None


# ---------------------------------------------------------------------------- inputs


def _video_id(path: str, root: str) -> str:
    """Path relative to the input root, POSIX, without extension: the key instruction data
    (LLaVA-Video-178K's "video" field, extension dropped) joins on."""
    relative = os.path.relpath(path, root) if root else path.lstrip("/")
    return os.path.splitext(relative)[0].replace(os.sep, "/")


def _file_id(path: str) -> str:
    """A single video's id: its file name without extension (no root to be relative to)."""
    return os.path.splitext(os.path.basename(path))[0]


def _path_list(path: str) -> list[str] | None:
    """The lines of a text file of paths, or None when the file is a video: a known video
    extension, or bytes that are not UTF-8 text (a video with an odd extension). The head is
    checked first so a large video is never read whole."""
    if os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS:
        return None
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
        except UnicodeDecodeError:
            return None
        if b"\0" in head:
            return None
        data = head + f.read()
    try:
        text = data.decode("utf-8-sig")  # a BOM from a Windows editor is not part of the first path
    except UnicodeDecodeError:
        return None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _listed(spec: str, lines: list[str]) -> list[tuple[str, str]]:
    """Entries of a path list, relative to the list's directory. A list none of whose paths exist
    is a mistake (paths relative to the shell's directory, a stale list), not a dataset of bad
    videos; a few missing ones are reported per video in errors.jsonl ("no such file")."""
    base = os.path.dirname(os.path.abspath(spec))
    lines = [os.path.expanduser(line) for line in lines]
    listed = sorted((os.path.join(base, line), _video_id(os.path.normpath(line), "")) for line in lines)
    if listed and not any(os.path.exists(path) for path, _ in listed):
        raise InputError(f"--videos {spec}: none of its {len(listed)} listed paths exist (e.g. {listed[0][0]}); "
                         "relative paths are read relative to the list's directory")
    return listed


def list_inputs(spec: str) -> list[tuple[str, str]]:
    """(path, video_id) for a directory (recursive, by extension), a single video file, a text file
    of paths, or a glob."""
    if os.path.isdir(spec):
        paths = [os.path.join(d, f) for d, _, files in os.walk(spec) for f in files
                 if os.path.splitext(f)[1].lower() in VIDEO_EXTENSIONS]
        return sorted((p, _video_id(p, spec)) for p in paths)
    if os.path.isfile(spec):  # before the glob test: an existing file named "clip[1].mp4" is that file
        lines = _path_list(spec)
        return [(spec, _file_id(spec))] if lines is None else _listed(spec, lines)
    if glob.has_magic(spec):
        root = spec.split("*")[0].split("?")[0].split("[")[0]
        root = root if root.endswith(os.sep) else os.path.dirname(root)
        paths = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
        return sorted((p, _video_id(p, root)) for p in paths)
    if not os.path.exists(spec):
        raise InputError(f"--videos {spec}: no such file or directory")
    raise InputError(f"--videos {spec}: not a directory, a video, a glob or a file listing videos")


def plan(spec: str, num_shards: int) -> tuple[list[Input], int]:
    """Every input of every task, in the order all tasks agree on, with its shard and duplicates,
    and the shard count: --num-shards, but never more shards than inputs (an empty shard is only
    clutter). It depends on the input list and flags alone, so every task and every rerun agree."""
    listed = list_inputs(spec)
    if not listed:
        raise InputError(f"--videos {spec}: no videos found (extensions: {' '.join(sorted(VIDEO_EXTENSIONS))})")
    num_shards = min(num_shards, len(listed))
    first_with_id: dict[str, str] = {}
    inputs = []
    for index, (path, video_id) in enumerate(listed):
        duplicate_of = first_with_id.setdefault(video_id, path)
        inputs.append(Input(path, video_id, index % num_shards, None if duplicate_of == path else duplicate_of))
    return inputs, num_shards


# ---------------------------------------------------------------------------- one video


def _counted(frames: Iterator, counter: list) -> Iterator:
    for item in frames:
        counter[0] += 1
        yield item


def _check_file(path: str) -> None:
    """Reasons a path cannot be a video, found before FFmpeg gives a vaguer one."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise codec.VideoError("no such file") from None
    except OSError as e:
        raise codec.VideoError(f"cannot read: {e.strerror or e}") from None
    if os.path.isdir(path):
        raise codec.VideoError("a directory, not a video file")
    if size == 0:
        raise codec.VideoError("empty file (0 bytes)")


def record_meta(video_id: str, source: str, settings: codec.Settings) -> dict:
    """What a record's header says about its video besides the steps."""
    return {"video_id": video_id, "source": source, "fps": settings.fps, "gop": settings.gop, "fusion": settings.fusion,
            "height": settings.size, "width": settings.size, "mv_block": settings.mv_block}


def encode_video(path: str, settings: codec.Settings, video_id: str | None = None) -> tuple[bytes, dict]:
    """One video file -> (its record bytes exactly as the job writes them, its per-video counts:
    video_id, source, steps, frames, seconds, bytes). Writes nothing; `records.decode(bytes)` is the
    docs/architecture.md §3 dict. video_id defaults to the file name without extension.

    Raises codec.VideoError, whose message is the one-line reason, for any input that cannot give
    a correct record (missing, empty, not a video, truncated, corrupt ...); anything else is a bug."""
    video_id = _file_id(path) if video_id is None else video_id
    _check_file(path)
    frames, steps_count = [0], [0]
    meta = record_meta(video_id, path, settings)
    try:
        source = _counted(codec.source_frames(path, settings), frames)
        steps = _counted(codec.steps(codec.canonical_frames(source, settings), settings), steps_count)
        data = records.encode(meta, steps, settings.jpeg_qscale)
    except OSError as e:  # the file vanished or the disk failed mid-read
        raise codec.VideoError(f"cannot read: {e.strerror or e}") from None
    return data, {"video_id": video_id, "source": path, "steps": steps_count[0], "frames": frames[0],
                  "seconds": round(frames[0] / settings.fps, 3), "bytes": len(data)}


def process(item: tuple[Input, codec.Settings]) -> dict:
    """One input -> {"record": bytes, "video": counts} or {"error": reason}. Never raises."""
    entry, settings = item
    started = time.perf_counter()
    if entry.duplicate_of is not None:
        return {"error": f"duplicate video id {entry.video_id!r} (kept {entry.duplicate_of})"}
    try:
        data, video = encode_video(entry.path, settings, entry.video_id)
    except codec.VideoError as e:
        return {"error": str(e)}
    except Exception as e:  # a bug or an FFmpeg surprise must not end the job; it is reported, not hidden
        return {"error": f"internal error ({type(e).__name__}: {e})"}
    return {"record": data, "video": video, "seconds": time.perf_counter() - started}


# ---------------------------------------------------------------------------- shards


def _sidecar(path: str) -> str:
    return path[: -len(".array_record")] + ".json"


def _write_json(path: str, value) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(temporary, path)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _settings_dict(settings: codec.Settings) -> dict:
    return {"format": FORMAT, **dataclasses.asdict(settings)}


def finished(output: str, shard: int, num_shards: int, settings: codec.Settings, inputs: list[Input]) -> bool:
    """A shard is finished when its sidecar (renamed last) and its records exist; a finished shard
    made from other settings or inputs is an error, never silently mixed in."""
    path = os.path.join(output, records.shard_name(shard, num_shards))
    sidecar = _sidecar(path)
    if not (os.path.exists(sidecar) and os.path.exists(path)):
        return False
    done = _read_json(sidecar)
    if done["settings"] != _settings_dict(settings):
        raise InputError(f"{sidecar}: written with other settings {done['settings']}; use a new --output")
    if done["inputs"] != [e.path for e in inputs]:
        raise InputError(f"{sidecar}: made from a different input list; use a new --output")
    return True


class ShardWriter:
    """Writes one shard to a temporary name; `commit` renames records, then the sidecar."""

    def __init__(self, output: str, shard: int, num_shards: int, settings: codec.Settings, inputs: list[Input]):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path = os.path.join(output, records.shard_name(shard, num_shards))
        self.temporary = f"{self.path}.tmp-{os.getpid()}"
        self.writer = ArrayRecordWriter(self.temporary, "group_size:1")
        self.sidecar = {"shard": os.path.basename(self.path), "settings": _settings_dict(settings),
                        "inputs": [e.path for e in inputs], "videos": [], "errors": []}

    def add(self, entry: Input, result: dict) -> None:
        if "error" in result:
            self.sidecar["errors"].append({"path": entry.path, "video_id": entry.video_id, "reason": result["error"]})
        else:
            self.writer.write(result["record"])
            self.sidecar["videos"].append(dict(result["video"], index=len(self.sidecar["videos"])))

    def commit(self) -> None:
        self.writer.close()
        os.replace(self.temporary, self.path)
        _write_json(_sidecar(self.path), self.sidecar)


def _check_shard_count(output: str, num_shards: int) -> None:
    """Shards of another count (an earlier --num-shards, or a run before the count was capped at
    the number of inputs) would be mixed with this run's; refused here, not found out on read."""
    counts = {int(m.group(2)) for m in map(records.SHARD_PATTERN.match, os.listdir(output)) if m}
    if counts - {num_shards}:
        raise InputError(f"{output}: holds shards of a run with {max(counts - {num_shards})} shards, this run makes "
                         f"{num_shards}; use a new --output")


def _remove_stale_temporaries(output: str) -> None:
    for name in os.listdir(output):
        if ".tmp-" in name and name.startswith("primitives-"):
            os.remove(os.path.join(output, name))


def write_manifest(output: str, num_shards: int, settings: codec.Settings) -> dict:
    """Merges every finished shard's sidecar (any task's) into manifest.json and errors.jsonl."""
    shards, videos, errors = [], [], []
    for shard in range(num_shards):
        sidecar = _sidecar(os.path.join(output, records.shard_name(shard, num_shards)))
        if not os.path.exists(sidecar):
            continue
        done = _read_json(sidecar)
        shards.append({"name": done["shard"], "videos": len(done["videos"]), "errors": len(done["errors"]),
                       "steps": sum(v["steps"] for v in done["videos"])})
        videos += [dict(v, shard=done["shard"]) for v in done["videos"]]
        errors += done["errors"]
    manifest = {
        "settings": _settings_dict(settings),
        "num_shards": num_shards,
        "complete": len(shards) == num_shards,
        "shards": shards,
        "totals": {"videos": len(videos), "failed": len(errors), "steps": sum(v["steps"] for v in videos),
                   "seconds": round(sum(v["seconds"] for v in videos), 3),
                   "bytes": sum(v["bytes"] for v in videos)},
        "videos": sorted(videos, key=lambda v: v["video_id"]),
    }
    _write_json(os.path.join(output, "manifest.json"), manifest)
    temporary = os.path.join(output, f"errors.jsonl.tmp-{os.getpid()}")
    with open(temporary, "w") as f:
        for error in sorted(errors, key=lambda e: e["path"]):
            f.write(json.dumps(error, sort_keys=True) + "\n")
    os.replace(temporary, os.path.join(output, "errors.jsonl"))
    return manifest


# ---------------------------------------------------------------------------- the job


def _results(work: list[Input], settings: codec.Settings, workers: int) -> Iterator[dict]:
    """Results in input order; videos run in a spawn pool (no forked FFmpeg or thread state)."""
    items = [(entry, settings) for entry in work]
    if workers <= 1:
        yield from map(process, items)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(process, items, chunksize=1)


def run(args: argparse.Namespace) -> tuple[dict, int, int]:
    """The job for this task -> (manifest, videos ok this run, videos failed this run)."""
    # Quoted or programmatic paths reach us unexpanded ("~/clips"); the shell expands only bare ones.
    args.videos, args.output = os.path.expanduser(args.videos), os.path.expanduser(args.output)
    settings = codec.Settings(fps=args.fps, gop=args.gop, fusion=args.fusion, size=args.size,
                              qscale=args.qscale, mv_block=args.mv_block, jpeg_qscale=args.jpeg_qscale)
    settings.check()
    if not 0 <= args.task_index < args.num_tasks:
        raise InputError(f"--task-index {args.task_index} must be in [0, --num-tasks {args.num_tasks})")
    inputs, num_shards = plan(args.videos, args.num_shards)
    os.makedirs(args.output, exist_ok=True)
    _check_shard_count(args.output, num_shards)
    _remove_stale_temporaries(args.output)
    by_shard = {s: [e for e in inputs if e.shard == s] for s in range(num_shards)}
    mine = [s for s in range(num_shards) if s % args.num_tasks == args.task_index]
    pending = [s for s in mine if not finished(args.output, s, num_shards, settings, by_shard[s])]
    work = [e for s in pending for e in by_shard[s]]
    capped = f" (--num-shards {args.num_shards} capped at the number of inputs)" if num_shards < args.num_shards else ""
    print(f"{len(inputs)} inputs in {num_shards} shards{capped}; task {args.task_index}/{args.num_tasks}: "
          f"{len(mine)} shards, {len(mine) - len(pending)} already finished, {len(work)} videos to process",
          file=sys.stderr)
    started = time.perf_counter()
    ok = failed = 0
    video_seconds = 0.0
    results = _results(work, settings, args.workers)
    # In a log file (SLURM, nohup) redraw every 30 s, not every 0.1 s.
    with tqdm(total=len(work), unit="video", disable=args.quiet, dynamic_ncols=True,
              mininterval=0.1 if sys.stderr.isatty() else 30) as bar:
        for shard in pending:
            writer = ShardWriter(args.output, shard, num_shards, settings, by_shard[shard])
            for entry in by_shard[shard]:
                result = next(results)
                writer.add(entry, result)
                if "error" in result:
                    failed += 1
                else:
                    ok += 1
                    video_seconds += result["video"]["seconds"]
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{video_seconds * settings.fps / elapsed:.0f} frames/s, {failed} failed", refresh=False)
                bar.update()
            writer.commit()
    manifest = write_manifest(args.output, num_shards, settings)
    elapsed = time.perf_counter() - started
    totals = manifest["totals"]
    print(f"done in {elapsed:.1f}s: {ok} videos ok, {failed} failed this run ({video_seconds:.1f}s of video, "
          f"{video_seconds / max(elapsed, 1e-9):.1f}x real time); output holds {totals['videos']} videos, "
          f"{totals['steps']} steps, {totals['failed']} rejected (errors.jsonl)"
          + ("" if manifest["complete"] else f"; {num_shards - len(manifest['shards'])} shards still to do by other tasks"))
    return manifest, ok, failed


def build_parser() -> argparse.ArgumentParser:
    defaults = codec.Settings()
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.preprocess", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", required=True, help="a directory (searched recursively), one video file, a glob ('clips/**/*.mp4'), "
                        "or a text file with one path per line (relative to the file's directory)")
    parser.add_argument("--output", required=True, help="output directory (created; rerun with the same one to resume)")
    parser.add_argument("--fps", type=float, default=defaults.fps, help="resampling rate of the canonical stream (default %(default)s)")
    parser.add_argument("--gop", type=int, default=defaults.gop, help="frames per GOP; an I-frame starts each (default %(default)s = 8 s at 30 fps)")
    parser.add_argument("--fusion", type=int, default=defaults.fusion, help="frames fused into one step; must divide --gop (default %(default)s = 1 step/s at 30 fps)")
    parser.add_argument("--size", type=int, default=defaults.size, help="frames are squashed to size x size, a multiple of 16 (default %(default)s)")
    parser.add_argument("--qscale", type=int, default=defaults.qscale, help="fixed MPEG-4 quantiser of the canonical stream, 1 (best) .. 31 (default %(default)s)")
    parser.add_argument("--mv-block", type=int, default=defaults.mv_block, help="motion is traced once per block x block tile (default %(default)s)")
    parser.add_argument("--jpeg-qscale", type=int, default=defaults.jpeg_qscale, help="JPEG quantiser of stored RGB, 1 (best) .. 31 (default %(default)s)")
    parser.add_argument("--num-shards", type=int, default=16, help="total shards over all tasks, at most one per input (default %(default)s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="video processes on this machine (default: all cores = %(default)s)")
    parser.add_argument("--task-index", type=int, default=0, help="this task's index, e.g. $SLURM_ARRAY_TASK_ID (default %(default)s)")
    parser.add_argument("--num-tasks", type=int, default=1, help="number of tasks splitting the input list (default %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_shards < 1 or args.num_tasks < 1 or args.workers < 1:
        print("error: --num-shards, --num-tasks and --workers must be >= 1", file=sys.stderr)
        return 2
    try:
        _, ok, failed = run(args)
    except (InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    # Every video this run tried was rejected: a wrong path or a broken install, not a dataset with
    # a few bad clips, so scripts must see it. Nothing to do (all shards finished) is success.
    if failed and not ok:
        print(f"error: all {failed} videos of this run failed; reasons in "
              f"{os.path.join(args.output, 'errors.jsonl')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
