"""`petseg runs`, `show`, `diff`, `reproduce` and `tensorboard`: inspect past runs of PetSegFlow.

RUN is a run id, ``PetSegFlow/<id>`` or ``latest``; the look-ups are in petseg.lineage.runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from petseg.data.archive import safe_extract
from petseg.lineage import runs


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register runs, show, diff, reproduce and tensorboard."""
    p = subparsers.add_parser("runs", help="list past runs")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=runs_command)

    p = subparsers.add_parser("show", help="parameters, environment, steps, metrics and release of a run")
    p.add_argument("run", metavar="RUN", help="run id, PetSegFlow/<id> or latest")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=show_command)

    p = subparsers.add_parser("diff", help="what differs between two runs")
    p.add_argument("run_a", metavar="RUN_A")
    p.add_argument("run_b", metavar="RUN_B")
    p.set_defaults(handler=diff_command)

    p = subparsers.add_parser("reproduce", help="re-run a run and verify its fingerprints (exit 1 if they differ)")
    p.add_argument("run", metavar="RUN")
    p.set_defaults(handler=reproduce_command)

    p = subparsers.add_parser("tensorboard", help="serve a run's training logs with TensorBoard")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--port", type=int, default=6006)
    p.add_argument("--host", default="127.0.0.1")
    p.set_defaults(handler=tensorboard_command)


def runs_command(args: argparse.Namespace) -> int:
    """List every run: status, start, duration, fingerprints, test figures and release."""
    rows = runs.run_rows()
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print(f"no {runs.FLOW} runs yet: run `python flows/seg_flow.py run`")
        return 0
    print(f"{'id':<18} {'status':<10} {'start':<19} {'dur s':>7} {'dataset':<12} {'model':<12} "
          f"{'pet':>5} {'mIoU':>5} {'base':>5} release")
    for r in rows:
        figures = [f"{r[key]:.3f}" if r[key] is not None else "-"
                   for key in ("test_pet_iou", "test_miou", "best_baseline_miou")]
        print(f"{r['id']:<18} {r['status']:<10} {r['start'] or '-':<19} {r['duration_s'] or '-':>7} "
              f"{(r['dataset_fingerprint'] or '-')[:12]:<12} {(r['model_fingerprint'] or '-')[:12]:<12} "
              f"{figures[0]:>5} {figures[1]:>5} {figures[2]:>5} {r['release'] or '-'}")
    print("pet, mIoU: the served mask on the test split; base: the best baseline's test mIoU")
    return 0


def show_command(args: argparse.Namespace) -> int:
    """Print one run: parameters, steps, trials, metrics, environment and release."""
    info = runs.describe(runs.resolve_run(args.run, finished=False))
    if args.json:
        _print_json(info)
        return 0
    print(f"{info['pathspec']}  {info['status']}  started {info['start']}  ({info['duration_s']} s)")
    print(f"dataset {info['dataset_fingerprint']}\nmodel   {info['model_fingerprint']}")
    print(f"code    {info.get('code_version') or '-'}")
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
        _print_metrics(info["metrics"])
    env = info["environment"] or {}
    print(f"\nenvironment: python {env.get('python')}, settings {env.get('settings')}")
    print(f"\nrelease: {info['release_decision']}")
    if info["manifest"]:
        print(f"  version {info['manifest']['version']} at {info['manifest']['location']}")
        replaced = info["manifest"].get("replaces")
        print(f"  replaces {replaced['version']}" if replaced else "  replaces no release (a first release)")
    if info["deployment"]:
        print(f"  deployment {info['deployment']}")
    return 0


def diff_command(args: argparse.Namespace) -> int:
    """Print what differs between two runs, by section."""
    result = runs.diff_runs(runs.resolve_run(args.run_a), runs.resolve_run(args.run_b))
    if not any(result.values()):
        print(f"runs {args.run_a} and {args.run_b} do not differ")
        return 0
    for section, rows in result.items():
        if rows:
            print(f"{section}:")
            for key, a, b in rows:
                print(f"  {key}: {a!r} -> {b!r}")
    return 0


def reproduce_command(args: argparse.Namespace) -> int:
    """Re-run a run with its parameters; 0 when the fingerprints match, 1 when they differ."""
    run = runs.resolve_run(args.run)
    outcome = runs.reproduce(run, echo=lambda line: print(line, file=sys.stderr))
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


def tensorboard_command(args: argparse.Namespace) -> int:
    """Serve a run's training logs with TensorBoard until it stops; its exit status."""
    run = runs.resolve_run(args.run)
    logs = runs.training_logs(run)
    with tempfile.TemporaryDirectory(prefix="petseg-tb-") as work:
        archive = Path(work) / "logs.tar.gz"
        archive.write_bytes(logs)
        safe_extract(archive, Path(work) / "out")
        command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(Path(work) / "out" / "logs"),
                   "--port", str(args.port), "--host", args.host]
        print(f"serving {run.pathspec} training logs at http://{args.host}:{args.port} (Ctrl-C stops)")
        return subprocess.call(command)


def _print_json(value) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def _print_metrics(metrics: dict) -> None:
    """The test figures of the model (raw, calibrated) beside every baseline, the served mask and the champion."""
    source = metrics.get("mask", {}).get("source", "calibrated")
    columns = {"raw": metrics["raw"], "calibrated": metrics["calibrated"], **metrics["baselines"]}
    print(f"\ntest metrics ({metrics['test_samples']} images): model beside baselines fitted on training")
    print(f"  {'':<16}" + "".join(f"{name + ('*' if name == source else ''):>17}" for name in columns))
    for name in ("pet_iou", "background_iou", "border_iou", "miou", "pixel_accuracy", "soft_iou", "soft_f1"):
        print(f"  {name:<16}" + "".join(f"{column[name]:17.4f}" for column in columns.values()))
    for name in ("pet_iou", "miou"):
        low, high = metrics[source]["intervals"][name]
        print(f"  {source} {name} 95 % interval: [{low:.4f}, {high:.4f}]")
    print(f"  ECE raw {metrics['ece']['raw']:.4f}, calibrated {metrics['ece']['calibrated']:.4f}")
    print(f"  * {metrics['mask']['reason'] if 'mask' in metrics else 'served mask: calibrated'}")
    _print_champion(metrics.get("champion"))


def _print_champion(champion: dict | None) -> None:
    """The champion the run was compared with: the served mask minus the champion's, per split."""
    if champion is None:
        print("\nchampion: none (a first release, judged against the baselines alone)")
        return
    print(f"\nchampion: {champion['version']} ({champion['mask_source']} mask)")
    if not champion["comparable"]:
        print(f"  not compared: {champion['note']}")
        return
    if champion["note"]:
        print(f"  {champion['note']}")
    for split in ("validation", "test"):
        for name in ("pet_iou", "miou"):
            difference = champion[split]["difference"][name]
            low, high = difference["interval"]
            print(f"  {split} {name}: champion {champion[split][name]:.4f}, this run minus champion "
                  f"{difference['difference']:+.4f} (paired 95 % interval [{low:+.4f}, {high:+.4f}])")
