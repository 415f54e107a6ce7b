"""The built-in demo data a tiny config trains on when it is given none (`make run`).

Stage 1 gets generated clips (`stage1_data`). Stage 2 gets clips whose questions need motion (which
way the camera pans, which corner a square heads to), split into training and held-out questions
(`stage2_data`). Everything is written by process 0 under the workdir once; reruns find it there.
"""

from __future__ import annotations

import json
import os

import jax

from cope_jax.distributed import wait_for_process_0
from cope_jax.training.loop import log
from data_pipeline import preprocess, records, synthetic

DATA_DIR, VIDEOS_DIR = "demo_data", "demo_videos"


def _preprocess(videos: str, data_dir: str, size: int) -> None:
    code = preprocess.main(["--videos", videos, "--output", data_dir, "--size", str(size), "--gop", "120",
                            "--fusion", "10", "--num-shards", "2", "--workers", "1", "--quiet"])
    if code:
        raise RuntimeError("preprocessing the demo clips failed")


def stage1_data(config, workdir: str) -> str:
    """<workdir>/demo_data: config.demo_clips generated clips, preprocessed at config.model.image_size."""
    data_dir, size = os.path.join(workdir, DATA_DIR), config.model.image_size
    if jax.process_index() == 0 and not os.path.exists(os.path.join(data_dir, records.MANIFEST_FILE)):
        log(f"config.data_dir is empty: generating {config.demo_clips} demo clips ({size}x{size}) and preprocessing them")
        synthetic.demo_clips(os.path.join(workdir, VIDEOS_DIR), count=config.demo_clips, size=size)
        _preprocess(os.path.join(workdir, VIDEOS_DIR), data_dir, size)
    wait_for_process_0("demo data")
    return data_dir


def stage2_data(config, workdir: str) -> tuple[str, str, str]:
    """Demo clips whose questions need motion, preprocessed at the tower's size -> (training
    annotations, held-out annotations, data_dir)."""
    data_dir = os.path.join(workdir, DATA_DIR)
    train_file, eval_file = os.path.join(data_dir, "train.json"), os.path.join(data_dir, "eval.json")
    size = config.pretrain.model.image_size if config.run_pretrain else config.model.vision.image_size
    if jax.process_index() == 0 and not os.path.exists(eval_file):
        videos = os.path.join(workdir, VIDEOS_DIR)
        total = config.demo_clips + config.demo_eval_clips
        log(f"config.data_dir is empty: writing {total} demo clips ({size}x{size}, questions that need motion) "
            "and preprocessing them")
        rows = synthetic.motion_questions(videos, total, size=size, seed=config.seed)
        _preprocess(videos, data_dir, size)
        for path, part in ((train_file, rows[:config.demo_clips]), (eval_file, rows[config.demo_clips:])):
            with open(path + ".tmp", "w") as f:
                json.dump(part, f, indent=1)
            os.replace(path + ".tmp", path)
    wait_for_process_0("demo data")
    return train_file, eval_file, data_dir
