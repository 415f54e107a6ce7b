"""The preprocessing job end to end: records, bad inputs, resume after kill -9, determinism, tasks."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import videos
from data_pipeline import codec, preprocess, primitives, records, sampler

SETTINGS = ["--fps", "30", "--gop", "30", "--fusion", "10", "--size", "64", "--quiet"]


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    """Good clips of several codecs and lengths, plus one of every bad-input class."""
    root = tmp_path_factory.mktemp("videos")
    (root / "nested").mkdir()
    videos.write(str(root / "pan_h264.mp4"), videos.pan(45, 64, 80, 1, 0), "libx264", options={"bf": "2"})
    videos.write(str(root / "nested" / "square.mkv"), videos.moving_square(25, 64, 16, 1, 1), "mpeg4")
    videos.write(str(root / "tilt_vp9.webm"), videos.pan(61, 64, 64, 0, -1), "libvpx-vp9")
    videos.write(str(root / "short.mp4"), videos.pan(5, 48, 48, 1, 1))
    # Bad inputs.
    (root / "empty.mp4").write_bytes(b"")
    (root / "notes.mp4").write_text("not a video\n")
    videos.write_audio_only(str(root / "audio_only.mp4"))
    good = (root / "pan_h264.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(good[: len(good) // 2])  # index (moov) at the end: unreadable
    mkv = videos.write(str(root / "cut_stream.mkv"), videos.pan(90, 64, 64, 1, 0))
    data = open(mkv, "rb").read()
    open(mkv, "wb").write(data[: len(data) * 2 // 3])  # demuxable head, the later frames missing
    videos.write(str(root / "corrupt_mid.mp4"), videos.pan(60, 64, 64, 1, 0))
    corrupt = bytearray(open(root / "corrupt_mid.mp4", "rb").read())
    mdat = corrupt.index(b"mdat")  # garbage in the middle of the frame data, index intact
    middle = mdat + int.from_bytes(corrupt[mdat - 4: mdat], "big") // 2
    corrupt[middle: middle + 400] = np.random.default_rng(0).integers(0, 256, 400, np.uint8).tobytes()
    (root / "corrupt_mid.mp4").write_bytes(bytes(corrupt))
    (root / "nested" / "square.mp4").write_bytes((root / "nested" / "square.mkv").read_bytes())  # same id
    return root


GOOD = {"pan_h264", "nested/square", "tilt_vp9", "short"}
BAD = {"empty", "notes", "audio_only", "truncated", "cut_stream", "corrupt_mid", "nested/square (duplicate)"}


def run_job(videos_spec, output, *extra):
    return preprocess.main(["--videos", str(videos_spec), "--output", str(output), *SETTINGS, *extra])


@pytest.fixture(scope="module")
def job(video_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("out")
    assert run_job(video_dir, output, "--workers", "1", "--num-shards", "3") == 0
    return output


def shard_bytes(output):
    return {name: open(os.path.join(output, name), "rb").read() for name in sorted(os.listdir(output))
            if name.startswith("primitives-")}


def test_good_videos_become_records_and_bad_ones_errors(job, capsys):
    found = records.open(str(job))
    assert sorted(found[i]["video_id"] for i in range(len(found))) == sorted(GOOD)
    errors = [json.loads(line) for line in open(job / "errors.jsonl")]
    reasons = {e["video_id"]: e["reason"] for e in errors}
    assert len(errors) == len(BAD)
    assert reasons["empty"] == "empty file (0 bytes)"
    assert "not a video" in reasons["notes"]
    assert "no video stream" in reasons["audio_only"]
    assert "truncated" in reasons["truncated"] and "truncated" in reasons["cut_stream"]
    assert "corrupt" in reasons["corrupt_mid"] or "undecodable" in reasons["corrupt_mid"]
    assert "duplicate video id 'nested/square'" in reasons["nested/square"]
    assert all(os.path.isabs(e["path"]) or os.path.exists(e["path"]) for e in errors)
    manifest = json.load(open(job / "manifest.json"))
    assert manifest["complete"] and manifest["totals"]["videos"] == 4 and manifest["totals"]["failed"] == len(BAD)
    assert manifest["settings"]["gop"] == 30 and len(manifest["shards"]) == 3


def test_record_fields_follow_the_contract(job):
    found = records.open(str(job))
    record = next(found[i] for i in range(len(found)) if found[i]["video_id"] == "tilt_vp9")
    steps = 7  # 61 frames at 30 fps -> frames 0..60, a step every 10
    assert record["rgb"].shape == (steps, 64, 64, 3) and record["rgb"].dtype == np.uint8
    assert record["mv"].shape == (steps, 64, 64, 2) and record["mv"].dtype == np.float32
    assert record["residual"].shape == (steps, 64, 64, 3) and record["residual"].dtype == np.int16
    assert record["timestamps"].dtype == np.float32 and np.allclose(record["timestamps"], np.arange(steps) / 3)
    assert record["gop_index"].tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert record["is_gop_start"].tolist() == [True, False, False, True, False, False, True]
    assert record["fps"] == 30 and record["gop"] == 30 and record["fusion"] == 10 and record["height"] == record["width"] == 64
    for t in np.flatnonzero(record["is_gop_start"]):
        assert not record["mv"][t].any() and not record["residual"][t].any()
    # The tilt moves content up by 1 px per frame: dy = -10 per step, wherever content is covered.
    assert np.median(record["mv"][1][:40, :, 1]) == -10


def test_reconstruction_and_stored_rgb_fidelity(job):
    found = records.open(str(job))
    for i in range(len(found)):
        record = found[i]
        decoded = list(codec.video_steps(record["source"], codec.Settings(fps=30, gop=30, fusion=10, size=64)))
        for t, step in enumerate(decoded):
            assert primitives.psnr(record["rgb"][t], step.rgb) > 40  # JPEG q1 4:4:4
            if not record["is_gop_start"][t]:
                rebuilt = primitives.reconstruct(record["rgb"][t - 1], record["mv"][t], record["residual"][t])
                assert np.array_equal(rebuilt, record["rgb"][t])
                assert np.array_equal(record["mv"][t], step.mv(4))  # motion stored exactly


def test_partial_read_equals_full_read(job):
    found = records.open(str(job))
    full = found[0]
    part = found.read(0, [2, 1])
    for key in ("rgb", "mv", "residual", "timestamps", "is_gop_start", "gop_index"):
        assert np.array_equal(part[key], full[key][[2, 1]])
    with pytest.raises(IndexError):
        found.read(0, [99])


def test_deterministic_across_worker_counts(video_dir, job, tmp_path):
    assert run_job(video_dir, tmp_path, "--workers", "2", "--num-shards", "3") == 0
    assert shard_bytes(tmp_path) == shard_bytes(job)


def test_tasks_split_the_work_and_records_open_reads_the_union(video_dir, job, tmp_path):
    for task in (1, 0):
        assert run_job(video_dir, tmp_path, "--workers", "1", "--num-shards", "3", "--num-tasks", "2", "--task-index", str(task)) == 0
        manifest = json.load(open(tmp_path / "manifest.json"))
        assert manifest["complete"] == (task == 0)
    assert shard_bytes(tmp_path) == shard_bytes(job)
    assert open(tmp_path / "errors.jsonl").read() == open(job / "errors.jsonl").read()
    assert len(records.open(str(tmp_path))) == len(GOOD)


# A `python -c` script: the job (argv[1:]), held before it commits its last shard; it touches the
# file $HOLD_FLAG and sleeps there, so a SIGKILL always lands mid-job, never after the job is done.
HELD_JOB = """
import os, sys, time
from data_pipeline import preprocess
commit = preprocess.ShardWriter.commit
def held_commit(writer):
    if os.path.basename(writer.path) == os.environ["HOLD_SHARD"]:
        open(os.environ["HOLD_FLAG"], "w").close()
        time.sleep(600)
    commit(writer)
preprocess.ShardWriter.commit = held_commit
sys.exit(preprocess.main(sys.argv[1:]))
"""


def test_resume_after_kill_gives_identical_output(video_dir, job, tmp_path):
    output, flag, last = tmp_path / "out", tmp_path / "held", records.shard_name(2, 3)
    command = [sys.executable, "-c", HELD_JOB, "--videos", str(video_dir), "--output", str(output),
               *SETTINGS, "--workers", "1", "--num-shards", "3"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "HOLD_SHARD": last, "HOLD_FLAG": str(flag)})
    try:
        deadline = time.time() + 300
        while not flag.exists():
            assert process.poll() is None, f"the job ended (exit {process.returncode}) before its last shard"
            assert time.time() < deadline, "the job never reached its last shard"
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL
    # Killed mid-job: shards 0 and 1 finished, the last one only a temporary file, no manifest.
    names = set(os.listdir(output))
    finished = {records.shard_name(s, 3) for s in (0, 1)}
    assert finished | {n[: -len(".array_record")] + ".json" for n in finished} <= names
    assert last not in names and last.replace(".array_record", ".json") not in names
    assert [n for n in names if n.startswith(last + ".tmp-")]
    assert "manifest.json" not in names
    assert run_job(video_dir, output, "--workers", "1", "--num-shards", "3") == 0
    assert json.load(open(output / "manifest.json"))["complete"]
    assert shard_bytes(output) == shard_bytes(job)
    assert not [n for n in os.listdir(output) if ".tmp-" in n]


def test_rerun_skips_finished_shards(video_dir, job, capsys):
    before = {n: os.path.getmtime(job / n) for n in os.listdir(job) if n.endswith(".array_record")}
    assert run_job(video_dir, job, "--workers", "1", "--num-shards", "3") == 0
    assert "3 already finished, 0 videos to process" in capsys.readouterr().err
    assert before == {n: os.path.getmtime(job / n) for n in before}


def test_settings_clash_with_existing_output_is_refused(video_dir, job, capsys):
    assert run_job(video_dir, job, "--num-shards", "3", "--fusion", "15") == 1
    assert "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--size", "100"], "multiple of 16"),
    (["--gop", "25"], "multiple of fusion"),
    (["--task-index", "2", "--num-tasks", "2"], "--task-index"),
])
def test_bad_arguments_give_one_line(video_dir, tmp_path, capsys, args, message):
    assert run_job(video_dir, tmp_path, *args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and message in err[-1]


def test_input_forms(video_dir, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{video_dir}/short.mp4\n# a comment\n{video_dir}/tilt_vp9.webm\n")
    assert [p for p, _ in preprocess.list_inputs(str(listing))] == [f"{video_dir}/short.mp4", f"{video_dir}/tilt_vp9.webm"]
    assert [i for _, i in preprocess.list_inputs(f"{video_dir}/**/sq*.mkv")] == ["nested/square"]
    with pytest.raises(preprocess.InputError):
        preprocess.list_inputs(str(tmp_path / "missing"))


def raw_record(output, video_id):
    found = records.open(str(output))
    return next(found.raw(i) for i in range(len(found)) if records.read_header(found.raw(i))[0]["video_id"] == video_id)


def test_single_video_file_is_one_input_not_a_list(video_dir, job, tmp_path):
    short = str(video_dir / "short.mp4")
    assert preprocess.list_inputs(short) == [(short, "short")]
    odd = tmp_path / "clip.video"  # unknown extension, but not UTF-8 text: a video, not a list
    odd.write_bytes((video_dir / "short.mp4").read_bytes())
    assert preprocess.list_inputs(str(odd)) == [(str(odd), "clip")]
    notes = str(video_dir / "notes.mp4")  # text with a video extension: a (bad) video
    assert preprocess.list_inputs(notes) == [(notes, "notes")]
    assert run_job(short, tmp_path / "out", "--workers", "1") == 0
    assert len(records.open(str(tmp_path / "out"))) == 1
    assert raw_record(tmp_path / "out", "short") == raw_record(job, "short")


def test_path_list_naming_missing_files(video_dir, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text("nowhere/a.mp4\nnowhere/b.mp4\n")  # relative to the list, so all missing: a mistake
    assert run_job(listing, tmp_path / "none", "--workers", "1") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "none of its 2 listed paths exist" in err[0]
    listing.write_text(f"{video_dir}/short.mp4\nnowhere/b.mp4\n")  # a few missing: per-video errors
    assert run_job(listing, tmp_path / "some", "--workers", "1") == 0
    errors = [json.loads(line) for line in open(tmp_path / "some" / "errors.jsonl")]
    assert [(e["video_id"], e["reason"]) for e in errors] == [("nowhere/b", "no such file")]


def test_run_where_every_video_fails_exits_1(video_dir, tmp_path, capsys):
    listing = tmp_path / "bad.txt"
    listing.write_text(f"{video_dir}/empty.mp4\n{video_dir}/notes.mp4\n")
    output = tmp_path / "out"
    assert run_job(listing, output, "--workers", "1") == 1
    captured = capsys.readouterr()
    assert "0 videos ok, 2 failed this run" in captured.out
    assert "all 2 videos of this run failed" in captured.err.strip().splitlines()[-1]
    assert len(open(output / "errors.jsonl").readlines()) == 2
    assert run_job(listing, output, "--workers", "1") == 0  # nothing left to do is success
    assert "2 already finished, 0 videos to process" in capsys.readouterr().err


def test_tilde_paths_are_expanded(video_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "short.mp4").write_bytes((video_dir / "short.mp4").read_bytes())
    assert preprocess.main(["--videos", "~/short.mp4", "--output", "~/primitives", *SETTINGS, "--workers", "1"]) == 0
    assert (tmp_path / "primitives" / "manifest.json").exists() and not os.path.exists("~")
    found = records.open("~/primitives")
    assert len(found) == 1 and records.read_header(found.raw(0))[0]["video_id"] == "short"


def test_shard_count_is_capped_at_the_number_of_inputs(video_dir, tmp_path, capsys):
    listing = tmp_path / "two.txt"
    listing.write_text(f"{video_dir}/short.mp4\n{video_dir}/nested/square.mkv\n")
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_job(listing, whole, "--workers", "1") == 0  # default --num-shards 16
    assert "2 inputs in 2 shards (--num-shards 16 capped" in capsys.readouterr().err
    assert sorted(n for n in os.listdir(whole) if n.endswith(".array_record")) == [records.shard_name(i, 2) for i in (0, 1)]
    assert json.load(open(whole / "manifest.json"))["num_shards"] == 2
    assert run_job(listing, whole, "--workers", "1") == 0
    assert "2 already finished, 0 videos to process" in capsys.readouterr().err
    for task in (2, 1, 0):  # more tasks than shards: task 2 has nothing to do
        assert run_job(listing, split, "--workers", "1", "--num-tasks", "3", "--task-index", str(task)) == 0
    assert shard_bytes(split) == shard_bytes(whole)
    assert run_job(listing, whole, "--workers", "1", "--num-shards", "1") == 1  # would mix 1-shard and 2-shard files
    assert "holds shards of a run with 2 shards" in capsys.readouterr().err


def test_encode_video_gives_the_job_record_in_memory(video_dir, job):
    settings = codec.Settings(fps=30.0, gop=30, fusion=10, size=64)
    data, video = preprocess.encode_video(str(video_dir / "short.mp4"), settings)
    assert data == raw_record(job, "short")
    listed = next(v for v in json.load(open(job / "manifest.json"))["videos"] if v["video_id"] == "short")
    assert video == {k: listed[k] for k in ("video_id", "source", "steps", "frames", "seconds", "bytes")}
    record = records.decode(data)
    assert record["video_id"] == "short" and record["rgb"].shape == (video["steps"], 64, 64, 3)
    assert preprocess.encode_video(str(video_dir / "short.mp4"), settings, "clips/short")[1]["video_id"] == "clips/short"
    for name, reason in [("missing.mp4", "no such file"), ("empty.mp4", "empty file"), ("notes.mp4", "not a video"),
                         ("truncated.mp4", "truncated"), ("nested", "directory")]:
        with pytest.raises(codec.VideoError, match=reason):
            preprocess.encode_video(str(video_dir / name), settings)
    missing = preprocess.Input(str(video_dir / "missing.mp4"), "missing", 0)
    assert preprocess.process((missing, settings)) == {"error": "no such file"}


def test_help_explains_the_job():
    result = subprocess.run([sys.executable, "-m", "data_pipeline.preprocess", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--task-index" in result.stdout and "errors.jsonl" in result.stdout


def test_sampler_keyframes_and_token_counts():
    gop_starts = np.tile([True] + [False] * 7, 3)  # 3 full GOPs of 8 steps
    one = sampler.sample_steps(gop_starts, 8, 1)
    assert one.steps.tolist() == list(range(24)) and np.flatnonzero(one.is_keyframe).tolist() == [0, 8, 16]
    assert one.tokens() == 3 * 280
    four = sampler.sample_steps(gop_starts, 8, 4)
    assert np.flatnonzero(four.is_keyframe[:8]).tolist() == [0, 2, 4, 6] and four.tokens() == 3 * 880
    assert sampler.sample_steps(gop_starts, 8, 8).tokens() == 24 * 210
    partial = sampler.sample_steps(np.array([True] + [False] * 7 + [True, False, False]), 8, 4)
    assert partial.is_keyframe.tolist()[8:] == [True, False, True] and partial.tokens() == 880 + 2 * 210 + 10


def test_sampler_spreads_long_videos_uniformly_by_gop():
    gop_starts = np.tile([True] + [False] * 7, 100)
    plan = sampler.sample_steps(gop_starts, 8, 1, max_gops=64)
    gops = np.unique(plan.steps // 8)
    assert len(gops) == 64 and gops[0] == 0 and gops[-1] == 99 and np.ptp(np.diff(gops)) <= 1
    assert plan.tokens() == 64 * 280
    with pytest.raises(ValueError, match="keyframes_per_gop"):
        sampler.sample_steps(gop_starts, 8, 9)
