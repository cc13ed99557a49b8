"""How much the flow costs over doing the same work in one process.

Runs, alternated in one session (the machine is shared and noisy):
  - the flow: `python flows/seg_flow.py run` (every step a process, foreach trials in parallel);
  - a plain script: the same stage functions called in one process, each timed.
Prints the flow's wall time, the plain script's wall time, the sum of the
stages' own compute (from the plain script), and the overheads as ratios.

Usage: python bench/flow_overhead.py [--rounds 2] [--source synth:1200] [--epochs 12] ...  (defaults: the flow's)
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLAIN = r'''
import json, sys, tempfile, time
from petseg.release import report
from petseg.flow import stages
from petseg.model import tune
args = json.loads(sys.argv[1])
timings = {}
def timed(name, fn, *a, **k):
    t = time.perf_counter(); out = fn(*a, **k); timings[name] = timings.get(name, 0) + time.perf_counter() - t
    return out
wall = time.perf_counter()
settings = {"seed": args["seed"], "strict": True, "threads": 2, "image_size": 128, "code_version": "bench"}
store = tempfile.mkdtemp(prefix="petseg-bench-store-")
ingested = timed("ingest", stages.ingest, source=args["source"], feedback="", skip_bad=False, settings=settings,
                 store=store)
splits = timed("transform", stages.transform, ingested, store=store, rule="md5")
configs = tune.sample_trials(args["trials"], seed=args["seed"])
results = [timed("trial", stages.run_trial, c, splits=splits, store=store, arch="small", epochs=args["tune_epochs"],
                 settings=settings) for c in configs]
trials, best = timed("tune", stages.select, results)
trained = timed("train", stages.train, best, splits=splits, store=store, arch="small", epochs=args["epochs"],
                batch_size=0, settings=settings)
calibration, calibration_report = timed("calibrate", stages.calibrate, trained["model_keras"], splits=splits,
                                        store=store, settings=settings)
def evaluate():
    metrics, samples = stages.evaluate(trained["model_keras"], calibration, splits=splits, store=store,
                                       settings=settings)
    # The card's components, as the flow's evaluate step makes them (Metaflow renders them after the step).
    report.fill_card([], metrics=metrics, history=trained["history"], trials=trials,
                     calibration_report=calibration_report, samples=samples)
timed("evaluate", evaluate)
print(json.dumps({"wall": time.perf_counter() - wall, "stages": timings}))
'''


STEP_TIMES = r'''
import json, sys
from metaflow import Flow, namespace
namespace(None)
run = Flow("PetSegFlow").latest_run
times = {}
for step in run:
    for task in step:
        times.setdefault(step.id, []).append(round((task.finished_at - task.created_at).total_seconds(), 1))
print(json.dumps(dict(reversed(list(times.items())))))
'''


def step_times(datastore: str) -> dict:
    """Wall time of each task of the latest flow run, by step (from the Metaflow Client)."""
    env = {**os.environ, "METAFLOW_DATASTORE_SYSROOT_LOCAL": datastore}
    out = subprocess.run([sys.executable, "-c", STEP_TIMES], env=env, cwd=REPO, check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_flow(args, datastore: str) -> float:
    env = {**os.environ, "METAFLOW_DATASTORE_SYSROOT_LOCAL": datastore, "USERNAME": os.environ.get("USERNAME", "bench"),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "flows" / "seg_flow.py"), "run", "--source", args.source,
                    "--trials", str(args.trials), "--tune_epochs", str(args.tune_epochs), "--epochs", str(args.epochs),
                    "--seed", str(args.seed), "--deploy", "none", "--min_miou", "0", "--min_margin", "-1",
                    "--max-workers", str(args.max_workers)],
                   env=env, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def run_plain(args) -> dict:
    start = time.perf_counter()
    params = {"source": args.source, "seed": args.seed, "trials": args.trials, "tune_epochs": args.tune_epochs,
              "epochs": args.epochs}
    out = subprocess.run([sys.executable, "-c", PLAIN, json.dumps(params)], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if out.returncode:
        sys.exit(f"the plain script failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_wall"] = time.perf_counter() - start
    return result


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--source", default="synth:1200")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--tune_epochs", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max_workers", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="parallel flow tasks; as `make run`: cores / 2 threads per task")
    args = parser.parse_args()

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"1-minute load {os.getloadavg()[0]:.1f}")
    print(f"work: source {args.source}, {args.trials} trials x {args.tune_epochs} epochs, {args.epochs} epochs, "
          f"flow --max-workers {args.max_workers}")
    flows, plains, computes = [], [], []
    with tempfile.TemporaryDirectory(prefix="petseg-bench-") as datastore:
        for round_ in range(args.rounds):
            flow = run_flow(args, datastore)
            print(f"flow tasks (s): {json.dumps(step_times(datastore))}")
            plain = run_plain(args)
            flows.append(flow)
            plains.append(plain["process_wall"])
            computes.append(sum(plain["stages"].values()))
            print(f"round {round_ + 1} (1-minute load {os.getloadavg()[0]:.1f}): flow {flow:.1f} s, "
                  f"plain script {plain['process_wall']:.1f} s, "
                  f"stage compute {computes[-1]:.1f} s  {json.dumps({k: round(v, 1) for k, v in plain['stages'].items()})}")
    flow, plain, compute = median(flows), median(plains), median(computes)
    print(f"median: flow {flow:.1f} s, plain script {plain:.1f} s, sum of stage compute {compute:.1f} s")
    print(f"flow / plain script = {flow / plain:.3f}  (overhead {100 * (flow / plain - 1):.1f}%)")
    print(f"flow / stage compute = {flow / compute:.3f}  (overhead {100 * (flow / compute - 1):.1f}%)")


if __name__ == "__main__":
    main()
