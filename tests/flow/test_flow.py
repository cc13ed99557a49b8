"""The workflow end to end: tiny runs through metaflow.Runner, checked through the Metaflow Client."""

import json
import subprocess
import sys

import pytest

from harness import FLOW_FILE, REPO, TINY, run_flow, session_root
from petseg.model import determinism

ARTIFACTS = {
    "start": ["settings", "parameters", "blob_root", "lineage_target", "lineage_graph"],
    "ingest": ["ingest_report", "dataset_fingerprint"],
    "transform": ["splits", "trial_configs"],
    "tune": ["trial_results", "best"],
    "train": ["model_keras", "model_fingerprint", "history", "tensorboard_logs", "environment"],
    "calibrate": ["calibration", "calibration_report"],
    "evaluate": ["metrics"],
    "release": ["released", "gate_message", "manifest", "signatures", "deployment"],
    "end": ["summary", "lineage_graph"],
}


def petseg(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "petseg", *args], capture_output=True, text=True, cwd=REPO)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_every_artifact_is_present(released_run):
    for step, names in ARTIFACTS.items():
        data = released_run[step].task.data
        for name in names:
            assert hasattr(data, name), f"{step} lacks artifact {name}"
    trial_tasks = list(released_run["trial"])
    assert len(trial_tasks) == TINY["trials"]


def test_report_card(released_run, monkeypatch):
    import base64
    import re

    from metaflow.cards import get_cards

    monkeypatch.chdir(session_root())  # where the flow ran: Metaflow finds cards from the working directory
    html = get_cards(released_run["evaluate"].task, id="report")[0].get()
    # A Metaflow card carries its components as base64 JSON inside the page.
    data = base64.b64decode(re.search(r'__MF_DATA__\["[^"]+"\] = "([^"]+)"', html).group(1)).decode()
    for section in ("beside the baselines", "Quality targets", "Confusion", "the release gate saw", "Champion",
                    "Served mask and calibration", "Training curves", "Tuning trials", "Sample predictions"):
        assert section in data
    metrics = released_run["evaluate"].task.data.metrics
    assert metrics["mask"]["reason"] in data and "decided on the validation split only" in data
    assert "this is a first release" in data
    for figure in ("pet IoU", "border IoU", "mIoU", "all-background", "mean-mask", "colour-position"):
        assert figure in data
    assert data.count("data:image/png;base64") >= 3


def test_metrics_are_within_unit_interval(released_run):
    metrics = released_run["evaluate"].task.data.metrics
    scored = [metrics["raw"], metrics["calibrated"], *metrics["baselines"].values(),
              metrics["validation"]["calibrated"], *metrics["validation"]["baselines"].values()]
    assert set(metrics["baselines"]) == {"all-background", "mean-mask", "colour-position"}
    for figures in scored:
        for name in ("pet_iou", "background_iou", "border_iou", "miou", "pixel_accuracy", "soft_iou", "soft_f1"):
            assert 0.0 <= figures[name] <= 1.0, (name, figures[name])
        assert figures["loss"] >= 0.0
    assert 0.0 <= metrics["validation"]["raw"]["miou"] <= 1.0
    for name, (low, high) in metrics["calibrated"]["intervals"].items():
        assert low <= metrics["calibrated"][name] <= high, name
    assert metrics["calibrated"]["images"] == metrics["test_samples"]
    report = released_run["calibrate"].task.data.calibration_report
    assert 0.0 <= report["ece_after"] <= 1.0 and 0.0 <= report["ece_before"] <= 1.0


# What the model must lead the best baseline by on the test split, in mIoU and in pet IoU.
QUALITY_MARGIN = 0.10


def test_the_model_beats_every_baseline_by_a_margin(learning_run):
    """A quality assertion: a model that learns nothing about shape fails it."""
    metrics = learning_run["evaluate"].task.data.metrics
    model = metrics["calibrated"]
    best_miou = max(scored["miou"] for scored in metrics["baselines"].values())
    best_pet = max(scored["pet_iou"] for scored in metrics["baselines"].values())
    assert model["miou"] - best_miou >= QUALITY_MARGIN, (model["miou"], metrics["baselines"])
    assert model["pet_iou"] - best_pet >= QUALITY_MARGIN, (model["pet_iou"], metrics["baselines"])
    assert "release:accepted" in learning_run.tags
    assert learning_run["release"].task.data.gate_message.startswith("Release gate passed")


def test_fingerprints_and_tags(released_run):
    data = released_run["end"].task.data
    assert len(data.dataset_fingerprint) == 64 and len(data.model_fingerprint) == 64
    assert f"dataset:{data.dataset_fingerprint}" in released_run.tags
    assert f"model:{data.model_fingerprint}" in released_run.tags
    assert "release:accepted" in released_run.tags
    parameters = released_run["start"].task.data.parameters
    env = released_run["train"].task.data.environment
    assert env["settings"] == {"seed": parameters["seed"], "mode": "strict" if parameters["deterministic"] else "fast",
                               "intra_op_threads": parameters["threads"], "inter_op_threads": parameters["threads"],
                               "portable": True, "pins": determinism.PORTABLE_PINS}
    assert env["cpu_kernels"] == {"openblas_core": "Haswell", "numpy_avx512": False, "onednn_rewrites": True,
                                  "onednn_max_isa": "AVX2"}
    assert released_run["start"].task.data.settings["pins"] == determinism.PORTABLE_PINS
    assert env["packages"]["tensorflow-cpu"] or env["packages"]["tensorflow"]


def test_the_served_mask_is_chosen_on_validation_and_never_below_the_raw_one(released_run, learning_run):
    for run in (released_run, learning_run):
        metrics = run["evaluate"].task.data.metrics
        validation, source = metrics["validation"], metrics["mask"]["source"]
        assert source == ("calibrated" if validation["calibrated"]["miou"] >= validation["raw"]["miou"] else "raw")
        assert validation[source]["miou"] >= validation["raw"]["miou"]
        assert f"{validation['raw']['miou']:.4f} raw" in metrics["mask"]["reason"]
        manifest = run["release"].task.data.manifest
        assert manifest["mask_source"] == source and manifest["metrics"]["mask"] == metrics["mask"]
        assert f"({source} mask;" in run["release"].task.data.gate_message
    from petseg.release import bundle

    assert bundle.load_release(released_run["release"].task.data.manifest["location"]).mask_source == \
        released_run["evaluate"].task.data.metrics["mask"]["source"]


def test_gate_passes_and_release_is_complete(released_run):
    data = released_run["release"].task.data
    assert data.released is True
    manifest = data.manifest
    assert manifest["version"] == f"petseg-{released_run.id}"
    assert manifest["model_fingerprint"] == released_run["train"].task.data.model_fingerprint
    assert manifest["image_size"] == released_run["start"].task.data.parameters["image_size"]
    from pathlib import Path

    location = Path(manifest["location"])
    assert sorted(p.name for p in location.iterdir()) == ["calibration.json", "manifest.json", "model.keras",
                                                          "model.sig", "provenance.sigstore.json"]
    assert {name: (location / name).read_bytes() for name in data.signatures} == data.signatures
    assert json.loads((location / "manifest.json").read_text()) == manifest
    assert manifest["replaces"] is None and "no champion (first release)" in data.gate_message
    from petseg.model import unet as models

    assert models.fingerprint(models.load(location / "model.keras")) == manifest["model_fingerprint"]


def test_gate_rejects_and_resume_reproduces_the_model(released_run, resumed_run):
    failed, resumed, output = resumed_run
    assert "train" not in [step.id for step in failed if all(t.successful for t in step)]
    data = resumed["release"].task.data
    assert data.released is False and data.manifest is None and data.deployment is None
    assert "floor 1.01" in data.gate_message and "failed" in data.gate_message
    assert "release:rejected" in resumed.tags
    # For the released run's endpoint: the released run is its champion, the same model on the same images.
    champion = resumed["evaluate"].task.data.metrics["champion"]
    assert champion["version"] == f"petseg-{released_run.id}" and champion["comparable"]
    assert champion["model_fingerprint"] == released_run["train"].task.data.model_fingerprint
    for split in ("validation", "test"):
        assert champion[split]["difference"]["miou"] == {"difference": 0.0, "interval": [0.0, 0.0]}
    assert f"against champion petseg-{released_run.id}" in data.gate_message
    # Strict mode: the resumed train step gives the same weights as the uninterrupted run.
    assert resumed["train"].task.data.model_fingerprint == released_run["train"].task.data.model_fingerprint
    assert resumed["ingest"].task.data.dataset_fingerprint == released_run["ingest"].task.data.dataset_fingerprint


def test_runs_lists_the_run(released_run):
    rows = json.loads(petseg("runs", "--json").stdout)
    row = next(r for r in rows if r["id"] == released_run.id)
    assert row["status"] == "successful"
    assert row["model_fingerprint"] == released_run["train"].task.data.model_fingerprint
    assert row["release"] == "accepted"
    assert 0 <= row["test_pet_iou"] <= 1 and 0 <= row["test_miou"] <= 1
    assert row["best_baseline"] in {"all-background", "mean-mask", "colour-position"}


def test_show_and_diff(released_run, resumed_run):
    info = json.loads(petseg("show", released_run.id, "--json").stdout)
    assert info["parameters"]["source"] == TINY["source"]
    assert set(info["steps"]) >= {"start", "ingest", "transform", "trial", "tune", "train", "evaluate", "end"}
    assert info["manifest"]["version"] == f"petseg-{released_run.id}"
    _, resumed, _ = resumed_run
    diff = petseg("diff", released_run.id, f"PetSegFlow/{resumed.id}").stdout
    assert "min_miou" in diff and "pachyderm" not in diff.split("metrics")[0].replace("pachyderm_address", "")
    assert f"compared_with: None -> 'petseg-{released_run.id}'" in diff.split("champion:")[1]
    shown = petseg("show", f"PetSegFlow/{resumed.id}").stdout
    assert f"champion: petseg-{released_run.id}" in shown and "this run minus champion +0.0000" in shown
    assert "champion: none (a first release" in petseg("show", released_run.id).stdout


def test_step_output_is_one_line_per_epoch_without_tensorflow_noise(released):
    run, output = released
    for noise in ("cpu_feature_guard", "local_rendezvous", "use_unbounded_threadpool", "oneDNN", "Traceback"):
        assert noise not in output, noise
    train_lines = [line for line in output.splitlines() if "/train/" in line]
    epochs = run["start"].task.data.parameters["epochs"]
    assert [line.split("] ", 1)[1].split()[1] for line in train_lines if "] epoch " in line] == [
        f"{n}/{epochs}" for n in range(1, epochs + 1)]
    assert "test IoU:" in output and "best baseline:" in output


def test_bad_run_names_are_one_line_errors(released_run):
    for args in (("show", "no-such-run"), ("show", "OtherFlow/1"), ("diff", "1", "2")):
        result = petseg(*args, check=False)
        assert result.returncode == 2
        assert result.stderr.startswith("petseg: error:") and "Traceback" not in result.stderr


def test_reproduce_gives_identical_fingerprints(released_run):
    result = petseg("reproduce", released_run.id, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reproduced" in result.stdout


def test_bad_parameter_is_reported(tmp_path):
    result = subprocess.run([sys.executable, str(FLOW_FILE), "run", "--deploy", "moon", "--source", "synth:8"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode != 0
    assert "--deploy 'moon' is unknown" in result.stdout + result.stderr


def test_serve_the_released_run_and_predict(released_run, tmp_path):
    """`petseg serve RUN` then `petseg predict --url ... IMAGE --out MASK` on the flow's own model."""
    import socket
    import tarfile
    import time

    import requests

    from petseg.data import synth

    images, _ = synth.write_archives(tmp_path / "data", count=2, seed=3)
    with tarfile.open(images) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        image = tmp_path / "pet.jpg"
        image.write_bytes(tar.extractfile(member).read())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "petseg", "serve", released_run.id, "--port", str(port)],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if requests.get(f"{url}/health/status", timeout=2).ok:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not listening, or still loading the model
                pass
            assert server.poll() is None, "petseg serve exited"
            time.sleep(0.5)
        result = petseg("predict", "--url", url, str(image), "--out", str(tmp_path / "mask.png"))
        assert (tmp_path / "mask.png").stat().st_size > 0
        assert (tmp_path / "mask.side_by_side.png").stat().st_size > 0
        assert f"petseg-{released_run.id}" in result.stdout
    finally:
        import os
        import signal

        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=60)


def test_official_split_flow():
    """`--split official` on a synthetic release with both split files: test.txt is the test split."""
    status, run, output = run_flow(**{**TINY, "trials": 1}, split="official", min_miou=0.0, min_margin=-1.0,
                                   endpoint="official")
    assert status == "successful", output[-4000:]
    official_test = set(run["ingest"].task.data.ingest_report["official_test"])
    manifest = run["transform"].task.data.splits["manifest"]
    assert official_test and {i for i, split in manifest.items() if split == "test"} == official_test
    assert run["evaluate"].task.data.metrics["test_samples"] == len(official_test)


def test_official_split_without_the_files_is_a_config_error():
    from petseg.flow import stages

    with pytest.raises(stages.StepError, match="--split official needs the source's annotations/trainval.txt"):
        stages.transform({"shards": [], "official_test": None}, store="unused", rule="official")


@pytest.fixture(scope="module")
def baseline_run():
    """The released run's flow again, in processes that present a CPU at the portable baseline: oneDNN capped
    at AVX2, TensorFlow's oneDNN rewrites off (its default on such a CPU), OpenBLAS on its Haswell kernels."""
    env = {"ONEDNN_MAX_CPU_ISA": "AVX2", "TF_ENABLE_ONEDNN_OPTS": "0", "OPENBLAS_CORETYPE": "Haswell"}
    status, run, output = run_flow(env=env, **TINY, min_miou=0.0, min_margin=-1.0, endpoint="baseline-cpu",
                                   portable=True)
    assert status == "successful", output[-4000:]
    return run


def test_a_run_at_the_portable_baseline_gives_the_same_model_and_calibration(released_run, baseline_run):
    assert baseline_run["start"].task.data.settings["portable"] is True
    for step, artifact in (("ingest", "dataset_fingerprint"), ("train", "model_fingerprint"), ("calibrate", "calibration")):
        assert getattr(baseline_run[step].task.data, artifact) == getattr(released_run[step].task.data, artifact), step
    assert baseline_run["train"].task.data.environment["cpu_kernels"]["onednn_max_isa"] == "AVX2"
