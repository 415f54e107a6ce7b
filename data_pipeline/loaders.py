"""grain data sources and loaders over the preprocessing output.

`PairSource` serves stage-1 pretraining examples (paper §3.3): for every P step t of every video,
(rgb[t-1], mv[t], residual[t], rgb[t]). Its index is built from manifest.json alone (a step t is a
GOP start iff t * fusion is a multiple of gop), so no record is read until it is used.
`pair_loader` shuffles globally with the seed, then shards by JAX process, and batches; its
iterator state is what training checkpoints store next to the model.
"""

from __future__ import annotations

import json
import os

import grain.python as grain
from absl import flags
import numpy as np

from data_pipeline import records


class PairSource(grain.RandomAccessDataSource):
    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self.records = records.open(data_dir)
        manifest_path = os.path.join(data_dir, "manifest.json")
        if not os.path.exists(manifest_path):
            raise records.RecordError(f"{data_dir}: no manifest.json (not a finished preprocessing output)")
        with open(manifest_path) as f:
            manifest = json.load(f)
        self.settings = manifest["settings"]  # what preprocess wrote: size, fps, gop, fusion, ...
        gop, fusion = self.settings["gop"], self.settings["fusion"]
        offsets, total = {}, 0
        for path in self.records.paths:  # records.open's order: sorted shards, records in write order
            offsets[os.path.basename(path)] = total
            total += next((s["videos"] for s in manifest["shards"] if s["name"] == os.path.basename(path)), 0)
        pairs = []
        for video in manifest["videos"]:
            index = offsets[video["shard"]] + video["index"]
            pairs += [(index, t) for t in range(1, video["steps"]) if (t * fusion) % gop]
        self.pairs = np.asarray(sorted(pairs), np.int64).reshape(-1, 2)
        if len(self.pairs) == 0:
            raise records.RecordError(f"{data_dir}: no P steps to train on (videos shorter than two steps?)")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> dict:
        index, t = (int(v) for v in self.pairs[k])
        record = self.records.read(index, [t - 1, t])
        return {"prev_rgb": record["rgb"][0], "rgb": record["rgb"][1], "mv": record["mv"][1],
                "residual": record["residual"][1], "video": np.int64(index), "step": np.int64(t)}

    def __repr__(self) -> str:
        return f"PairSource({self.data_dir!r}, {len(self)} pairs)"


def pair_loader(source: PairSource, *, global_batch_size: int, seed: int, workers: int, process_index: int = 0,
                process_count: int = 1) -> grain.DataLoader:
    """Infinite, deterministic given the seed and `workers`: a global permutation per epoch, then
    every process takes its own slice, in batches of global_batch_size / process_count. (grain
    batches inside each worker process, so a different `workers` gives another, equally
    shuffled, order; resuming needs the same value, which the config fixes.)"""
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} processes")
    if workers and not flags.FLAGS.is_parsed():
        # grain's worker processes read absl flags; outside an absl app (a notebook, pytest) nobody
        # parsed them, so take the defaults instead of failing.
        flags.FLAGS.mark_as_parsed()
    sampler = grain.IndexSampler(
        num_records=len(source), shuffle=True, seed=seed, num_epochs=None,
        shard_options=grain.ShardOptions(shard_index=process_index, shard_count=process_count, drop_remainder=True))
    return grain.DataLoader(data_source=source, sampler=sampler, worker_count=workers,
                            operations=[grain.Batch(global_batch_size // process_count, drop_remainder=True)])
