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


def test_resume_after_kill_gives_identical_output(video_dir, job, tmp_path):
    command = [sys.executable, "-m", "data_pipeline.preprocess", "--videos", str(video_dir), "--output", str(tmp_path),
               *SETTINGS, "--workers", "1", "--num-shards", "3"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not any(n.endswith(".json") and n.startswith("primitives-") for n in os.listdir(tmp_path)):
        assert process.poll() is None and time.time() < deadline, "job ended before a shard was finished"
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not os.path.exists(tmp_path / "manifest.json") or not json.load(open(tmp_path / "manifest.json"))["complete"]
    assert run_job(video_dir, tmp_path, "--workers", "1", "--num-shards", "3") == 0
    assert shard_bytes(tmp_path) == shard_bytes(job)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


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
