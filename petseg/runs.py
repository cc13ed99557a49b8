"""Inspect past runs of PetSegFlow through the Metaflow Client.

`petseg runs`, `show`, `diff`, `reproduce` and `tensorboard`. RUN is a run id,
``PetSegFlow/<id>`` or ``latest``. A run that is unknown, of another flow or
still running is a one-line error, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from petseg.errors import RunError

FLOW = "PetSegFlow"
FLOW_FILE = Path(__file__).resolve().parent.parent / "flows" / "seg_flow.py"
# Environment facts that change results; a difference is worth a warning.
ENVIRONMENT_KEYS_THAT_MATTER = ("packages", "tensorflow_build", "cpu", "devices", "settings", "python")


def resolve_run(spec: str, *, finished: bool = True):
    """Return the Metaflow Run named by ``spec`` (id, ``PetSegFlow/<id>`` or ``latest``).

    Raises:
        RunError: the run does not exist, belongs to another flow, or is still running.
    """
    from metaflow import Flow, Run, namespace
    from metaflow.exception import MetaflowNamespaceMismatch, MetaflowNotFound

    namespace(None)  # runs of every user and production namespace
    try:
        if spec == "latest":
            run = Flow(FLOW).latest_run
            if run is None:
                raise RunError(f"no {FLOW} runs found: run `python flows/seg_flow.py run` first")
        else:
            flow, _, run_id = spec.rpartition("/")
            if flow and flow != FLOW:
                raise RunError(f"run {spec!r} belongs to flow {flow!r}: petseg inspects {FLOW} runs only")
            run = Run(f"{FLOW}/{run_id}")
    except (MetaflowNotFound, MetaflowNamespaceMismatch):
        raise RunError(f"run {spec!r} not found: expected a run id, {FLOW}/<id> or latest "
                       f"(see `petseg runs`)") from None
    if finished and _status(run) == "running":
        raise RunError(f"run {run.pathspec} is still running: wait for it to finish")
    return run


def _data(run, step: str, name: str, default=None):
    try:
        return getattr(run[step].task.data, name)
    except (KeyError, AttributeError):
        return default


def _status(run) -> str:
    """successful, failed (a task failed, so the run cannot finish) or running."""
    if run.successful:
        return "successful"
    if run.finished or any(task.finished and not task.successful for step in run for task in step):
        return "failed"
    return "running"


def _started(run):
    try:
        return run["start"].task.created_at
    except KeyError:
        return run.created_at


def _seconds(start, end) -> float | None:
    return round((end - start).total_seconds(), 1) if start and end else None


def _tag(run, key: str) -> str | None:
    for tag in run.tags:
        if tag.startswith(f"{key}:"):
            return tag.split(":", 1)[1]
    return None


def run_row(run) -> dict:
    """The facts `petseg runs` lists for one run."""
    summary = _data(run, "end", "summary", {}) if run.successful else {}
    started = _started(run)
    return {
        "id": run.id,
        "status": _status(run),
        "start": started.isoformat(sep=" ", timespec="seconds") if started else None,
        "duration_s": _seconds(started, run.finished_at),
        "dataset_fingerprint": summary.get("dataset_fingerprint") or _tag(run, "dataset"),
        "model_fingerprint": summary.get("model_fingerprint") or _tag(run, "model"),
        "test_pet_iou": summary.get("test_pet_iou"),
        "test_miou": summary.get("test_miou"),
        "best_baseline": summary.get("best_baseline"),
        "best_baseline_miou": summary.get("best_baseline_miou"),
        "release": _tag(run, "release"),
    }


def describe(run) -> dict:
    """Everything `petseg show` prints about one run."""
    steps = {}
    for step in run:
        tasks = list(step)
        starts = [t.created_at for t in tasks if t.created_at]
        ends = [t.finished_at for t in tasks if t.finished_at]
        steps[step.id] = {"tasks": len(tasks), "duration_s": _seconds(min(starts, default=None),
                                                                      max(ends, default=None))}
    return {
        **run_row(run),
        "pathspec": run.pathspec,
        "tags": sorted(run.tags),
        "parameters": _data(run, "start", "parameters", {}),
        "environment": _data(run, "train", "environment", {}),
        "steps": dict(reversed(list(steps.items()))),
        "ingest_report": {k: v for k, v in (_data(run, "ingest", "ingest_report", {}) or {}).items()
                          if k != "shards"},
        "trials": _data(run, "select", "trial_results"),
        "selected": _data(run, "select", "best"),
        "metrics": _data(run, "evaluate", "metrics"),
        "calibration": {k: v for k, v in (_data(run, "calibrate", "calibration_report", {}) or {}).items()
                        if k.startswith("ece")},
        "release_decision": _data(run, "release", "gate_message"),
        "manifest": _data(run, "release", "manifest"),
        "deployment": _data(run, "release", "deployment"),
    }


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def differences(a: dict, b: dict) -> list[tuple[str, object, object]]:
    """Keys (flattened with dots) whose values differ between two nested dicts."""
    fa, fb = _flatten(a), _flatten(b)
    return [(key, fa.get(key), fb.get(key)) for key in sorted(set(fa) | set(fb)) if fa.get(key) != fb.get(key)]


def diff_runs(run_a, run_b) -> dict:
    """What differs between two runs, by section."""
    da, db = describe(run_a), describe(run_b)
    sections = {
        "parameters": (da["parameters"], db["parameters"]),
        "data": ({"dataset_fingerprint": da["dataset_fingerprint"]}, {"dataset_fingerprint": db["dataset_fingerprint"]}),
        "fingerprints": ({"model": da["model_fingerprint"]}, {"model": db["model_fingerprint"]}),
        "environment": (da["environment"], db["environment"]),
        "metrics": (da["metrics"] or {}, db["metrics"] or {}),
    }
    return {name: differences(a, b) for name, (a, b) in sections.items()}


# -- commands -----------------------------------------------------------------------------------------

def _print_json(value) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def cmd_runs(args) -> int:
    from metaflow import Flow, namespace
    from metaflow.exception import MetaflowNotFound

    namespace(None)
    try:
        rows = [run_row(run) for run in Flow(FLOW).runs()]
    except MetaflowNotFound:
        rows = []
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print(f"no {FLOW} runs yet: run `python flows/seg_flow.py run`")
        return 0
    print(f"{'id':<18} {'status':<10} {'start':<19} {'dur s':>7} {'dataset':<12} {'model':<12} "
          f"{'pet':>5} {'mIoU':>5} {'base':>5} release")
    for r in rows:
        figures = [f"{r[key]:.3f}" if r[key] is not None else "-"
                   for key in ("test_pet_iou", "test_miou", "best_baseline_miou")]
        print(f"{r['id']:<18} {r['status']:<10} {r['start'] or '-':<19} {r['duration_s'] or '-':>7} "
              f"{(r['dataset_fingerprint'] or '-')[:12]:<12} {(r['model_fingerprint'] or '-')[:12]:<12} "
              f"{figures[0]:>5} {figures[1]:>5} {figures[2]:>5} {r['release'] or '-'}")
    print("pet, mIoU: the calibrated model on the test split; base: the best baseline's test mIoU")
    return 0


def cmd_show(args) -> int:
    info = describe(resolve_run(args.run, finished=False))
    if args.json:
        _print_json(info)
        return 0
    print(f"{info['pathspec']}  {info['status']}  started {info['start']}  ({info['duration_s']} s)")
    print(f"dataset {info['dataset_fingerprint']}\nmodel   {info['model_fingerprint']}")
    print("\nparameters:")
    for key, value in sorted(info["parameters"].items()):
        print(f"  {key} = {value}")
    print("\nsteps (seconds):")
    for name, step in info["steps"].items():
        print(f"  {name:<10} {step['duration_s']}  ({step['tasks']} task{'s' if step['tasks'] != 1 else ''})")
    if info["trials"]:
        print("\ntrials:")
        for t in info["trials"]:
            print(f"  #{t['index']} lr={t['config']['learning_rate']:.2e} batch={t['config']['batch_size']} "
                  f"val_loss={t['val_loss']:.4f} val_miou={t['val_miou']:.4f}")
    if info["metrics"]:
        print_metrics(info["metrics"])
    env = info["environment"] or {}
    print(f"\nenvironment: python {env.get('python')}, settings {env.get('settings')}")
    print(f"\nrelease: {info['release_decision']}")
    if info["manifest"]:
        print(f"  version {info['manifest']['version']} at {info['manifest']['location']}")
    if info["deployment"]:
        print(f"  deployment {info['deployment']}")
    return 0


def print_metrics(metrics: dict) -> None:
    """The test figures of the model (raw, calibrated) beside every baseline."""
    columns = {"raw": metrics["raw"], "calibrated": metrics["calibrated"], **metrics["baselines"]}
    print(f"\ntest metrics ({metrics['test_samples']} images): model beside baselines fitted on training")
    print(f"  {'':<16}" + "".join(f"{name:>17}" for name in columns))
    for name in ("pet_iou", "background_iou", "border_iou", "miou", "pixel_accuracy", "soft_iou", "soft_f1"):
        print(f"  {name:<16}" + "".join(f"{column[name]:17.4f}" for column in columns.values()))
    for name in ("pet_iou", "miou"):
        low, high = metrics["calibrated"]["intervals"][name]
        print(f"  calibrated {name} 95 % interval: [{low:.4f}, {high:.4f}]")
    print(f"  ECE raw {metrics['ece']['raw']:.4f}, calibrated {metrics['ece']['calibrated']:.4f}")


def cmd_diff(args) -> int:
    result = diff_runs(resolve_run(args.run_a), resolve_run(args.run_b))
    if not any(result.values()):
        print(f"runs {args.run_a} and {args.run_b} do not differ")
        return 0
    for section, rows in result.items():
        if rows:
            print(f"{section}:")
            for key, a, b in rows:
                print(f"  {key}: {a!r} -> {b!r}")
    return 0


def flow_environment() -> dict:
    """This process's environment, plus a user name Metaflow accepts when it would find none.

    Metaflow records who ran a flow and refuses to start as "root" or with no
    user name, so a root shell (a container, CI) needs a fallback.
    """
    env = dict(os.environ)
    if not any(env.get(name) not in (None, "", "root") for name in ("METAFLOW_USER", "SUDO_USER", "USERNAME", "USER")):
        env["USERNAME"] = "petseg"
    return env


def cpu_flag_changes(old: dict, new: dict) -> str | None:
    """A one-line account of CPU instruction-set flags present in one environment record only."""
    before = set((old.get("cpu") or {}).get("flags") or [])
    after = set((new.get("cpu") or {}).get("flags") or [])
    if before == after:
        return None
    return (f"CPU instruction sets differ (only in the original: {' '.join(sorted(before - after)) or '-'}; "
            f"only here: {' '.join(sorted(after - before)) or '-'}): bitwise equality is guaranteed only on "
            "the same CPU instruction set, software and thread count")


def reproduce(run, *, echo=print, show_output: bool = True) -> dict:
    """Re-run a past run's flow with the same parameters and compare fingerprints.

    Returns:
        {"identical": bool, "new_run": pathspec, "differences": [...], "environment": [...]}.
    """
    from metaflow import Runner

    params = dict(_data(run, "start", "parameters", {}) or {})
    if not params:
        raise RunError(f"run {run.pathspec} recorded no parameters: it cannot be reproduced")
    params["deploy"] = "none"  # reproducing a run checks it; it does not deploy it again
    echo(f"re-running {run.pathspec} with {params}")
    with Runner(str(FLOW_FILE), show_output=show_output, env=flow_environment()).run(**params) as result:
        if result.status != "successful":
            raise RunError(f"the re-run {result.run.pathspec} failed ({result.status}); "
                           f"see `python {FLOW_FILE} logs {result.run.id}`")
        new = result.run
    old_info, new_info = describe(run), describe(new)
    checks = [(key, old_info[key], new_info[key]) for key in ("dataset_fingerprint", "model_fingerprint")
              if old_info[key] != new_info[key]]
    old_env, new_env = old_info["environment"] or {}, new_info["environment"] or {}
    env = [row for row in differences({k: old_env.get(k) for k in ENVIRONMENT_KEYS_THAT_MATTER},
                                      {k: new_env.get(k) for k in ENVIRONMENT_KEYS_THAT_MATTER})
           if row[0] != "cpu.flags"]
    return {"identical": not checks, "new_run": new.pathspec, "differences": checks, "environment": env,
            "cpu_flags": cpu_flag_changes(old_env, new_env)}


def cmd_reproduce(args) -> int:
    run = resolve_run(args.run)
    outcome = reproduce(run, echo=lambda line: print(line, file=sys.stderr))
    for key, a, b in outcome["environment"]:
        print(f"warning: environment differs at {key}: {a!r} -> {b!r}", file=sys.stderr)
    if outcome["cpu_flags"]:
        print(f"warning: {outcome['cpu_flags']}", file=sys.stderr)
    if outcome["identical"]:
        print(f"reproduced: {outcome['new_run']} has the same dataset and model fingerprints as {run.pathspec}")
        return 0
    print(f"NOT reproduced: {outcome['new_run']} differs from {run.pathspec}:")
    for key, a, b in outcome["differences"]:
        print(f"  {key}: {a} (original) vs {b} (re-run)")
    return 1


def cmd_tensorboard(args) -> int:
    from petseg.archive import safe_extract

    run = resolve_run(args.run)
    logs = _data(run, "train", "tensorboard_logs")
    if not logs:
        raise RunError(f"run {run.pathspec} has no training logs (its train step did not finish)")
    with tempfile.TemporaryDirectory(prefix="petseg-tb-") as work:
        archive = Path(work) / "logs.tar.gz"
        archive.write_bytes(logs)
        safe_extract(archive, Path(work) / "out")
        command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(Path(work) / "out" / "logs"),
                   "--port", str(args.port), "--host", args.host]
        print(f"serving {run.pathspec} training logs at http://{args.host}:{args.port} (Ctrl-C stops)")
        return subprocess.call(command)


def add_parser(subparsers) -> None:
    """Register runs, show, diff, reproduce and tensorboard."""
    p = subparsers.add_parser("runs", help="list past runs")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_runs)

    p = subparsers.add_parser("show", help="parameters, environment, steps, metrics and release of a run")
    p.add_argument("run", metavar="RUN", help="run id, PetSegFlow/<id> or latest")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_show)

    p = subparsers.add_parser("diff", help="what differs between two runs")
    p.add_argument("run_a", metavar="RUN_A")
    p.add_argument("run_b", metavar="RUN_B")
    p.set_defaults(handler=cmd_diff)

    p = subparsers.add_parser("reproduce", help="re-run a run and verify its fingerprints (exit 1 if they differ)")
    p.add_argument("run", metavar="RUN")
    p.set_defaults(handler=cmd_reproduce)

    p = subparsers.add_parser("tensorboard", help="serve a run's training logs with TensorBoard")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--port", type=int, default=6006)
    p.add_argument("--host", default="127.0.0.1")
    p.set_defaults(handler=cmd_tensorboard)
