"""Peak memory of `petseg verify`'s data check as the data set grows: it must not grow with it.

Writes warehouse shards of 1x, 4x and 16x ``--samples`` synthetic samples
(128x128 images and trimaps, 128 records a shard, about 64 KB a record, the
size petseg's ingest writes) into a blob store directory, with their split
shards, and runs the shard and data set fingerprint check of `petseg.lineage.verify`
on each in a fresh process, reading that process's peak resident memory
(VmHWM of ``/proc/self/status``; ``ru_maxrss`` would carry the parent's
peak across the fork and exec). With ``--before DIR`` the same runs use that checkout's
`petseg.lineage.verify` too (one that holds every shard in memory), side by side.

Prints, per checkout and size: samples, data set bytes, peak MiB, and the
growth of the peak from the smallest to the largest set. Usage:

    python bench/verify_memory.py [--samples 512] [--before /path/to/older/checkout]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARD_SIZE = 128


def make_store(folder: Path, samples: int) -> dict:
    """A blob store with warehouse and split shards of ``samples`` samples; what verify reads."""
    import numpy as np

    from petseg import storage
    from petseg.data import shards
    from petseg.data.split import split_of

    rng = np.random.default_rng(samples)
    store = storage.BlobStore(str(folder / "blobs"))
    hashes, splits = [], {}
    with shards.ShardWriter(folder / "warehouse", "samples", SHARD_SIZE) as writer:
        for index in range(samples):
            sample_id = f"pug_{index}"
            digest = f"{index:064x}"
            image = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
            mask = rng.integers(1, 4, (128, 128), dtype=np.uint8)
            writer.write(shards.encode(sample_id, image, mask, digest))
            hashes.append(digest)
            splits.setdefault(split_of(sample_id), []).append((sample_id, image, mask, digest))
    report = {"shards": [{"name": name, "sha256": store.put(folder / "warehouse" / name)} for name in writer.names],
              "fingerprint": shards.fingerprint(hashes)}
    split_records = {}
    for split, members in splits.items():
        with shards.ShardWriter(folder / split, split, SHARD_SIZE) as writer:
            for member in members:
                writer.write(shards.encode(*member))
        split_records[split] = [{"name": name, "sha256": store.put(folder / split / name)} for name in writer.names]
    graph = {"pathspec": "PetSegFlow/bench", "dataset_fingerprint": report["fingerprint"], "stages": {}}
    return {"root": str(folder / "blobs"), "report": report, "splits": {"splits": split_records}, "graph": graph}


def worker(spec_file: str) -> None:
    """Runs one checkout's data check on one store; prints the peak RSS in bytes."""
    spec = json.loads(Path(spec_file).read_text())
    from petseg import storage
    from petseg.lineage import verify

    store, tally = storage.BlobStore(spec["root"]), verify.Tally()
    if hasattr(verify, "check_data"):
        found = verify.check_data(store, spec["report"], spec["splits"], spec["graph"], tally)
    else:  # a checkout that reads every shard into memory
        warehouse = verify._check_shards(store, spec["report"]["shards"], spec["graph"], "warehouse", tally)
        for records in spec["splits"]["splits"].values():
            verify._check_shards(store, records, spec["graph"], "transform", tally)
        found = verify._dataset_fingerprint(warehouse)
    assert found == spec["report"]["fingerprint"], "the data set fingerprint does not match"
    peak = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    print(int(peak.split()[1]) * 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=512, help="samples of the smallest set (x4, x16 follow)")
    parser.add_argument("--before", help="another checkout to measure in the same run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    sys.path.insert(0, str(ROOT))
    checkouts = ([args.before] if args.before else []) + [str(ROOT)]
    sizes = [args.samples, 4 * args.samples, 16 * args.samples]
    peaks = {checkout: [] for checkout in checkouts}
    with tempfile.TemporaryDirectory(prefix="petseg-verify-bench-") as tmp:
        for samples in sizes:
            folder = Path(tmp, str(samples))
            spec = make_store(folder, samples)
            spec_file = folder / "spec.json"
            spec_file.write_text(json.dumps(spec))
            data_bytes = sum(p.stat().st_size for p in (folder / "blobs").rglob("*") if p.is_file())
            for checkout in checkouts:
                out = subprocess.run([sys.executable, __file__, "--worker", str(spec_file)], check=True, text=True,
                                     stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": checkout}).stdout
                peak = int(out.split()[-1]) / 2**20
                peaks[checkout].append(peak)
                print(f"{checkout}  {samples:6d} samples  {data_bytes / 2**20:7.0f} MiB of shards  "
                      f"peak {peak:6.0f} MiB", flush=True)
            for path in (folder / "blobs").rglob("*"):
                if path.is_file():
                    path.unlink()
    for checkout in checkouts:
        print(f"{checkout}: peak at {sizes[-1]} samples / at {sizes[0]}: {peaks[checkout][-1] / peaks[checkout][0]:.2f}")
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    print(f"machine: {model}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}")


if __name__ == "__main__":
    main()
