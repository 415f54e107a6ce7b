"""Synthetic demo data: the same bytes from every run, and motion questions whose answers follow the motion in the
written files (decoded back), balanced over the letters, with nothing in frame 0 to give them away."""

import collections
import json
import os
import subprocess
import sys

import av
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from data_pipeline import synthetic

TESTS = os.path.dirname(os.path.abspath(__file__))
COUNT, SIZE, SIDE = 16, 64, 16
CENTRE = (SIZE - SIDE) // 2


def write_all(directory: str) -> list[dict]:
    """A plain clip, the demo clips and motion questions under `directory`; returns the annotation rows."""
    os.makedirs(directory)
    synthetic.write(os.path.join(directory, "pan.mp4"), synthetic.pan(120, 64, 64, 1, 0))
    synthetic.demo_clips(os.path.join(directory, "demo"), count=6)
    return synthetic.motion_questions(os.path.join(directory, "motion"), 16, seed=3)


def files_under(directory) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(root, name), directory): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(directory) for name in names}


def test_same_bytes_from_fresh_processes_and_this_one(tmp_path):
    """Two fresh processes repeat the same history, so an encoder whose output depends on it (x264's AVX-512
    macroblock tree, without the pin in `write`) agrees with itself there: this process writes the same files too."""
    writer = f"import json, sys; sys.path.insert(0, {TESTS!r}); import test_synthetic; " \
             "print(json.dumps(test_synthetic.write_all(sys.argv[1])))"
    runs = []
    for name in ("first", "second"):
        printed = subprocess.run([sys.executable, "-c", writer, str(tmp_path / name)], cwd=os.path.dirname(TESTS),
                                 check=True, capture_output=True, text=True).stdout
        runs.append((json.loads(printed), files_under(tmp_path / name)))
    runs.append((write_all(str(tmp_path / "here")), files_under(tmp_path / "here")))
    (rows, files), others = runs[0], runs[1:]
    assert len(files) == 1 + 6 + 16
    for rows_again, files_again in others:
        assert sorted(files) == sorted(files_again)
        assert [name for name in files if files[name] != files_again[name]] == []
        assert rows == rows_again


def decode(path: str) -> np.ndarray:
    with av.open(path) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]).astype(np.float32)


@pytest.fixture(scope="module")
def motion(tmp_path_factory):
    directory = tmp_path_factory.mktemp("motion")
    rows = synthetic.motion_questions(str(directory), COUNT, size=SIZE)
    return directory, rows, {row["id"]: decode(str(directory / row["video"])) for row in rows}


def option_direction(row) -> tuple[int, int]:
    """(x, y) direction of the answer, read from the question text (x rightwards, y downwards)."""
    question = row["conversations"][0]["value"]
    option = next(line[3:] for line in question.split("\n") if line.startswith(row["answer"] + ". "))
    return (int("right" in option) - int("left" in option), int("down" in option or "bottom" in option)
            - int("up" in option or "top" in option))


def content_shift(first: np.ndarray, later: np.ndarray, largest: int = 24) -> tuple[int, int]:
    """(dx, dy) minimising the mean |later[y, x] - first[y - dy, x - dx]| over the overlap: brute force."""
    height, width = first.shape[:2]

    def error(dx, dy):
        moved = later[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)]
        return np.abs(moved - first[max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]).mean()

    shifts = [(dx, dy) for dx in range(-largest, largest + 1) for dy in range(-largest, largest + 1)]
    return min(shifts, key=lambda shift: error(*shift))


def square_at(frame: np.ndarray, square: np.ndarray) -> tuple[int, int]:
    """(x, y) of the top-left corner where `square` matches `frame` best (every position searched)."""
    errors = np.abs(sliding_window_view(frame, square.shape)[:, :, 0] - square).mean(axis=(2, 3, 4))
    y, x = np.unravel_index(np.argmin(errors), errors.shape)
    return int(x), int(y)


def test_rows_are_well_formed_and_flat(motion):
    directory, rows, _ = motion
    assert sorted(os.listdir(directory)) == sorted(row["video"] for row in rows)
    for index, row in enumerate(rows):
        human, gpt = row["conversations"]
        assert set(row) == {"id", "video", "conversations", "data_source", "answer", "task"}
        assert row["video"] == row["id"] + ".mp4" and row["data_source"] == "demo_motion"
        assert row["task"] == ("camera", "corner")[index % 2] and row["id"].startswith(("pan_", "corner_")[index % 2])
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert sum(turn["value"].count("<image>") for turn in row["conversations"]) == 1
        assert gpt == {"from": "gpt", "value": row["answer"]} and row["answer"] in "ABCD"
        assert [line[:3] for line in human["value"].split("\n")[2:6]] == ["A. ", "B. ", "C. ", "D. "]


def test_answers_balanced_per_task_and_seeded(motion, tmp_path):
    _, rows, _ = motion
    assert collections.Counter((row["task"], row["answer"]) for row in rows) == {
        (task, letter): COUNT // 8 for task in ("camera", "corner") for letter in "ABCD"}
    other = synthetic.motion_questions(str(tmp_path), COUNT, size=SIZE, seconds=0.1, seed=1)
    assert [row["answer"] for row in other] != [row["answer"] for row in rows]


def test_camera_answer_matches_content_motion(motion):
    _, rows, frames = motion
    for row in rows[0::2]:
        # The camera moving right makes the content move left: content shift = -speed * direction.
        x, y = option_direction(row)
        dx, dy = content_shift(frames[row["id"]][0], frames[row["id"]][10])
        assert (np.sign(-dx), np.sign(-dy)) == (x, y) and abs(dx) + abs(dy) in (10, 20), (row["id"], dx, dy)


def test_square_moves_from_centre_towards_answer_corner_without_bouncing(motion):
    _, rows, frames = motion
    for row in rows[1::2]:
        clip = frames[row["id"]]
        square = clip[0, CENTRE:CENTRE + SIDE, CENTRE:CENTRE + SIDE]
        assert square_at(clip[0], square) == (CENTRE, CENTRE)
        positions = np.array([square_at(frame, square) for frame in clip[::20]] + [square_at(clip[-1], square)])
        direction = np.array(option_direction(row))
        travelled = (positions - CENTRE) * direction  # along the answer's diagonal; grows every step, never back
        assert (np.diff(travelled, axis=0) >= 0).all() and (travelled[-1] >= CENTRE - 4).all(), (row["id"], positions)


def test_first_frames_are_all_different_textures(motion):
    _, rows, frames = motion
    first = np.stack([frames[row["id"]][0] for row in rows])
    distances = np.abs(first[:, None] - first[None]).mean(axis=(2, 3, 4))
    assert (distances + np.eye(len(rows)) * 1e9).min() > 20
