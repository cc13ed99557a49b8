"""Model quality against the baselines, over several seeds, with the flow's wall time.

For each profile and seed, runs the whole flow (`--deploy none`, `--champion none`, strict mode,
`--max-workers` = cores / 2 as `make run`) in a private datastore, then reads
the evaluate step's test metrics of the served mask through the Metaflow Client. Prints one line
per run (which mask was served, calibrated or raw, chosen on validation, and the other one's pet
IoU and mIoU beside it), then per profile the mean and spread (min-max) of each figure and the
targets:

  pet IoU >= 0.90, mIoU >= 0.75, pet IoU - best baseline's pet IoU >= 0.25,
  flow wall time <= 5 min (at most 8 if quality needs it).

Quality figures are deterministic for a seed (strict mode); wall times vary
with the machine's load, which is printed beside them.

Profiles (flow parameters on top of the defaults):
  short    --source synth:800 --epochs 8
  default  (the flow's defaults: what `make run` does)
  long     --source synth:2000 --epochs 16
  xl       --source synth:2000 --epochs 24

Usage: python bench/quality.py [--profiles default long xl] [--seeds 42 7]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # petseg.release.report imports Keras: no start-up notices

from petseg.lineage.runs import flow_environment  # noqa: E402
from petseg.release.gate import served  # noqa: E402
from petseg.release.report import QUALITY_TARGETS  # noqa: E402

PROFILES = {
    "short": ["--source", "synth:800", "--epochs", "8"],
    "default": [],
    "long": ["--source", "synth:2000", "--epochs", "16"],
    "xl": ["--source", "synth:2000", "--epochs", "24"],
}
FIGURES = ("wall_s", "pet_iou", "background_iou", "border_iou", "miou", "pixel_accuracy", "baseline_pet_iou",
           "baseline_miou", "pet_lead")

READ_METRICS = r'''
import json
from metaflow import Flow, namespace
namespace(None)
run = Flow("PetSegFlow").latest_run
metrics = run["evaluate"].task.data.metrics
print(json.dumps({"run": run.pathspec, "metrics": metrics}))
'''


def run_once(profile: str, seed: int, datastore: str, workers: int) -> dict:
    env = {**flow_environment(), "METAFLOW_DATASTORE_SYSROOT_LOCAL": datastore}
    # Each run measured alone: no champion (the seeds draw different data sets), no deployment.
    command = [sys.executable, str(REPO / "flows" / "seg_flow.py"), "run", "--seed", str(seed), "--deploy", "none",
               "--champion", "none", "--max-workers", str(workers), *PROFILES[profile]]
    start = time.perf_counter()
    subprocess.run(command, env=env, cwd=datastore, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - start
    out = subprocess.run([sys.executable, "-c", READ_METRICS], env=env, cwd=datastore, check=True,
                         capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    model = served(result["metrics"])  # the mask the release serves
    source = result["metrics"].get("mask", {}).get("source", "calibrated")
    other = "raw" if source == "calibrated" else "calibrated"
    name, best = max(result["metrics"]["baselines"].items(), key=lambda item: item[1]["pet_iou"])
    return {"profile": profile, "seed": seed, "run": result["run"], "wall_s": wall,
            **{key: model[key] for key in FIGURES[1:6]}, "pet_interval": model["intervals"]["pet_iou"],
            "baseline": name, "baseline_pet_iou": best["pet_iou"],
            "baseline_miou": max(b["miou"] for b in result["metrics"]["baselines"].values()),
            "pet_lead": model["pet_iou"] - best["pet_iou"], "load": os.getloadavg()[0], "mask": source,
            "other": other, "other_pet_iou": result["metrics"][other]["pet_iou"],
            "other_miou": result["metrics"][other]["miou"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", nargs="+", default=["default"], choices=sorted(PROFILES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 7])
    args = parser.parse_args()
    workers = max(1, (os.cpu_count() or 2) // 2)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}; --max-workers {workers}")
    results = []
    for profile in args.profiles:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory(prefix="petseg-quality-") as datastore:
                r = run_once(profile, seed, datastore, workers)
            results.append(r)
            print(f"{profile:<8} seed {seed:<4} {r['wall_s']:6.0f} s (load {r['load']:.1f})  pet {r['pet_iou']:.4f} "
                  f"[{r['pet_interval'][0]:.3f}, {r['pet_interval'][1]:.3f}]  background {r['background_iou']:.4f}  "
                  f"border {r['border_iou']:.4f}  mIoU {r['miou']:.4f} ({r['mask']} mask; {r['other']}: pet "
                  f"{r['other_pet_iou']:.4f}, mIoU {r['other_miou']:.4f})  | best baseline ({r['baseline']}) "
                  f"pet {r['baseline_pet_iou']:.4f}, mIoU {r['baseline_miou']:.4f}  | pet lead {r['pet_lead']:+.4f}",
                  flush=True)
    print()
    for profile in args.profiles:
        rows = [r for r in results if r["profile"] == profile]
        summary = {key: (statistics.mean(r[key] for r in rows), min(r[key] for r in rows), max(r[key] for r in rows))
                   for key in FIGURES}
        print(f"{profile} ({len(rows)} seeds): " + ", ".join(
            f"{key} {mean:.4g} [{low:.4g}, {high:.4g}]" for key, (mean, low, high) in summary.items()))
        mean = {key: value[0] for key, value in summary.items()}
        checks = {f"{key} >= {target}": mean[key] >= target for key, target in QUALITY_TARGETS.items()}
        checks.update({"wall <= 5 min": mean["wall_s"] <= 300, "wall <= 8 min": mean["wall_s"] <= 480})
        print("  targets (means): " + ", ".join(f"{name}: {'met' if ok else 'MISSED'}" for name, ok in checks.items()))


if __name__ == "__main__":
    main()
