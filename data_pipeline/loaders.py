"""grain data sources and loaders over the preprocessing output.

`PairSource` serves stage-1 pretraining examples (paper §3.3): for every P step t of every video,
(rgb[t-1], mv[t], residual[t], rgb[t]). Its index is built from manifest.json alone (a step t is a
GOP start by `sampler.gop_starts`), so no record is read until it is used.
`pair_loader` shuffles globally with the seed, gives every JAX process its slice of each global
batch, and batches; batch n is a function of n alone, so training resumes at batch = step.
"""

from __future__ import annotations

import os

import grain.python as grain
from absl import flags
import numpy as np

from data_pipeline import records, sampler


class PairSource(grain.RandomAccessDataSource):
    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self.records = records.open(data_dir)
        manifest = records.read_manifest(data_dir)
        self.settings = manifest["settings"]  # what preprocess wrote: size, fps, gop, fusion, ...
        listed, on_disk = {s["name"] for s in manifest["shards"]}, {os.path.basename(p) for p in self.records.paths}
        if listed != on_disk:  # record indices below would shift silently
            raise records.RecordError(
                f"{data_dir}/{records.MANIFEST_FILE}: lists {len(listed)} shards but {len(on_disk)} are on disk (tasks of a split run that "
                "finished together, or still running); when all are done, rerun the preprocessing command once "
                "(finished shards are skipped) to rewrite the manifest")
        gop, fusion = self.settings["gop"], self.settings["fusion"]
        offsets, total = {}, 0
        for path in self.records.paths:  # records.open's order: sorted shards, records in write order
            offsets[os.path.basename(path)] = total
            total += next((s["videos"] for s in manifest["shards"] if s["name"] == os.path.basename(path)), 0)
        pairs = []
        for video in manifest["videos"]:
            index = offsets[video["shard"]] + video["index"]
            steps = np.arange(1, video["steps"])
            pairs += [(index, int(t)) for t in steps[~sampler.gop_starts(steps, gop, fusion)]]
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


class GlobalBatchSampler:
    """One global shuffle per epoch, the same on every process; the n-th batch process p's loader
    yields is rows p * L .. p * L + L - 1 (L = global batch / processes) of global batch n, whatever
    the number of grain workers. So the processes' slices of a step are disjoint, their union is
    exactly the global batch one process would read, and the order does not depend on the number of
    processes or workers.

    (grain's own `ShardOptions` splits the records into one contiguous range per process and
    shuffles inside each range: every process count would see other data in another order.)
    `start_batch` makes a new iterator begin at that global batch: how training resumes at its
    checkpoint's step, whatever the number of processes or workers that wrote it."""

    def __init__(self, num_records: int, global_batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1, workers: int = 0, start_batch: int = 0):
        if global_batch_size % process_count:
            raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} processes")
        self.global_batch, self.local_batch = global_batch_size, global_batch_size // process_count
        self.process_index, self.process_count, self.start_batch = process_index, process_count, start_batch
        self.workers = max(workers, 1)
        self._shuffled = grain.IndexSampler(num_records=num_records, shuffle=True, seed=seed, num_epochs=None,
                                            shard_options=grain.NoSharding())

    def global_index(self, index: int) -> int:
        # grain's worker w reads indices w, w + W, ... and batches them; the loader hands out the
        # workers' batches in turn. So local index i is row r of worker w's batch b = output batch n.
        worker, k = index % self.workers, index // self.workers
        b, row = divmod(k, self.local_batch)
        n = self.start_batch + b * self.workers + worker
        return n * self.global_batch + self.process_index * self.local_batch + row

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        shuffled = self._shuffled[self.global_index(index)]
        return grain.RecordMetadata(index=index, record_key=shuffled.record_key, rng=shuffled.rng)

    def __repr__(self) -> str:
        return (f"GlobalBatchSampler({self._shuffled!r}, global_batch={self.global_batch}, "
                f"process {self.process_index} of {self.process_count})")


def pair_loader(source, *, global_batch_size: int, seed: int, workers: int, process_index: int = 0,
                process_count: int = 1) -> grain.DataLoader:
    """Infinite, deterministic given the seed: a global permutation per epoch, every process its
    slice of each global batch (`GlobalBatchSampler`), in batches of global_batch_size /
    process_count. Any random-access source: stage 2 uses it too."""
    if workers and not flags.FLAGS.is_parsed():
        # grain's worker processes read absl flags; outside an absl app (a notebook, pytest) nobody
        # parsed them, so take the defaults instead of failing.
        flags.FLAGS.mark_as_parsed()
    sampler = GlobalBatchSampler(len(source), global_batch_size, seed, process_index, process_count, workers)
    return grain.DataLoader(data_source=source, sampler=sampler, worker_count=workers, shard_options=grain.NoSharding(),
                            operations=[grain.Batch(global_batch_size // process_count, drop_remainder=True)])


def start_at_batch(loader: grain.DataLoader, batch: int) -> None:
    """The loader's next iterator starts at global batch `batch` (see GlobalBatchSampler)."""
    loader._sampler.start_batch = batch  # grain 0.2 keeps the sampler it was given here
