"""The evaluate step's report card: metrics beside the baselines and the serving champion, the served mask
and why, training curves, tuning trials, the reliability diagram and a grid of sample predictions; and the
run's summary and closing words."""

from __future__ import annotations

import numpy as np

from petseg.model.metrics import HEADLINE
from petseg.oxford import CLASSES
from petseg.release.gate import served

# Class colours of the mask panels: pet red, background dark blue, border yellow.
CLASS_COLOURS = np.array([[0.85, 0.15, 0.15], [0.10, 0.10, 0.35], [0.95, 0.85, 0.10]], dtype=np.float32)
LABELS = {"pet_iou": "pet IoU", "background_iou": "background IoU", "border_iou": "border IoU", "miou": "mIoU",
          "pixel_accuracy": "pixel accuracy"}


QUALITY_TARGETS = {"pet_iou": 0.90, "miou": 0.75, "pet_lead": 0.25}
"""What the embedded data set's model should reach on the test split: pet IoU, mIoU, and the lead of its
pet IoU over the best baseline's (bench/quality.py checks them over several seeds)."""


def target_rows(metrics: dict) -> list[list[str]]:
    """Each quality target, this run's figure (the served mask), and whether it is met."""
    model = served(metrics)
    best_pet = max(scored["pet_iou"] for scored in metrics["baselines"].values())
    figures = {"pet_iou": model["pet_iou"], "miou": model["miou"], "pet_lead": model["pet_iou"] - best_pet}
    names = {"pet_iou": "pet IoU", "miou": "mIoU", "pet_lead": "pet IoU lead over the best baseline"}
    return [[names[key], f">= {target:.2f}", f"{figures[key]:.4f}", "met" if figures[key] >= target else "missed"]
            for key, target in QUALITY_TARGETS.items()]


def _with_interval(metrics: dict, name: str) -> str:
    interval = metrics.get("intervals", {}).get(name)
    if interval is None:
        return f"{metrics[name]:.4f}"
    return f"{metrics[name]:.4f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def metrics_rows(metrics: dict) -> list[list[str]]:
    """Model (raw and calibrated) beside every baseline on the test split, with 95 % intervals."""
    columns = [metrics["raw"], metrics["calibrated"], *metrics["baselines"].values()]
    rows = [[LABELS[name], *(_with_interval(column, name) for column in columns)] for name in HEADLINE]
    rows += [[label, *(f"{column[name]:.4f}" for column in columns)]
             for name, label in (("soft_iou", "soft IoU (per image)"), ("soft_f1", "soft F1 (per image)"),
                                 ("binary_accuracy", "binary accuracy"), ("loss", "loss"))]
    return rows


def metrics_headers(metrics: dict) -> list[str]:
    """The columns of `metrics_rows`; the served mask's is marked."""
    source = metrics.get("mask", {}).get("source", "calibrated")
    models = [f"model, {name}{' (served)' if name == source else ''}" for name in ("raw", "calibrated")]
    return ["metric (test)", *models, *metrics["baselines"]]


def confusion_rows(metrics: dict) -> list[list[str]]:
    """The served mask's test confusion matrix, as shares of each true class."""
    rows = []
    for name, counts in zip(CLASSES, served(metrics)["confusion"]):
        total = sum(counts) or 1
        rows.append([f"true {name}", *(f"{count / total:.3f}" for count in counts)])
    return rows


def validation_rows(metrics: dict) -> list[list[str]]:
    """What the served-mask choice and the release gate saw: validation mIoU of the model (raw and calibrated),
    of each baseline and of the champion."""
    validation = metrics["validation"]
    rows = [[f"model, {name}", f"{validation[name]['miou']:.4f}"] for name in ("raw", "calibrated")
            if name in validation]
    rows += [[name, f"{scored['miou']:.4f}"] for name, scored in validation["baselines"].items()]
    champion = metrics.get("champion")
    if champion and champion["comparable"]:
        rows.append([f"champion {champion['version']}", f"{champion['validation']['miou']:.4f}"])
    return rows


def champion_rows(metrics: dict) -> list[list[str]]:
    """The served mask minus the champion's, per headline figure and split, with 95 % paired intervals."""
    champion = metrics["champion"]
    rows = []
    for name in HEADLINE:
        cells = [LABELS[name]]
        for split in ("validation", "test"):
            ours, theirs = served(metrics, split)[name], champion[split][name]
            difference = champion[split]["difference"][name]
            low, high = difference["interval"]
            cells += [f"{ours:.4f}", f"{theirs:.4f}", f"{difference['difference']:+.4f} [{low:+.3f}, {high:+.3f}]"]
        rows.append(cells)
    return rows


CHAMPION_HEADERS = ["metric", "validation: candidate", "champion", "difference [95 %]", "test: candidate",
                    "champion", "difference [95 %]"]


def champion_text(metrics: dict) -> str:
    """A paragraph on the champion: none, not comparable (and why), or how it was scored."""
    champion = metrics.get("champion")
    if champion is None:
        return "No release serves this endpoint yet: this is a first release, judged against the baselines alone."
    if not champion["comparable"]:
        return (f"The serving release was not compared: {champion['note'].rstrip('.')}. The gate judged against "
                "the baselines alone.")
    return (f"The serving release {champion['version']} ({champion['mask_source']} mask), scored on the same images "
            "as this model's served mask; differences are this model minus the champion, with 95 % intervals from "
            "a paired bootstrap over the images. The gate reads the validation difference only."
            + (f" Note: {champion['note']}." if champion["note"] else ""))


def served_text(metrics: dict) -> str:
    """Which probabilities the served mask comes from, and why (decided on validation data only)."""
    mask = metrics.get("mask")
    if mask is None:
        return "The served mask comes from the calibrated probabilities."
    return f"The {mask['reason']}; decided on the validation split only."


def trial_rows(trials: list[dict]) -> list[list[str]]:
    """One row per tuning trial: its configuration and validation results."""
    return [[str(t["index"]), f"{t['config']['learning_rate']:.2e}", str(t["config"]["batch_size"]),
             f"{t['val_loss']:.4f}", f"{t['val_miou']:.4f}"] for t in trials]


def run_summary(*, metrics: dict, dataset_fingerprint: str, model_fingerprint: str, released: bool,
                manifest: dict | None, deployment: dict | None) -> dict:
    """The one-line-per-run facts `petseg runs` lists (test split, the served mask)."""
    figures = served(metrics)
    name, best = max(metrics["baselines"].items(), key=lambda item: item[1]["miou"])
    return {
        "dataset_fingerprint": dataset_fingerprint,
        "model_fingerprint": model_fingerprint,
        "test_pet_iou": figures["pet_iou"],
        "test_miou": figures["miou"],
        "best_baseline": name,
        "best_baseline_pet_iou": best["pet_iou"],
        "best_baseline_miou": best["miou"],
        "released": bool(released),
        "version": manifest["version"] if manifest else None,
        "deployment": deployment,
    }


def closing_words(facts: dict, *, metrics: dict, gate_message: str, flow_name: str, run_id: str) -> str:
    """The run's quality and where to look next, printed at the end of a run."""
    figures = served(metrics)
    lines = [
        f"Run {flow_name}/{run_id} finished.",
        f"  test IoU:     pet {figures['pet_iou']:.3f}  background {figures['background_iou']:.3f}  "
        f"border {figures['border_iou']:.3f}  mIoU {figures['miou']:.3f}  "
        f"(pixel accuracy {figures['pixel_accuracy']:.3f}, {figures['images']} images)",
        f"  best baseline: {facts['best_baseline']}: pet {facts['best_baseline_pet_iou']:.3f}  "
        f"mIoU {facts['best_baseline_miou']:.3f}",
        f"  {gate_message}",
        f"  report card:  python flows/seg_flow.py card get {run_id}/evaluate --id report report.html",
        f"  details:      petseg show {run_id}   (prove it: petseg verify {run_id})",
    ]
    deployment = facts["deployment"]
    if deployment and deployment.get("url"):
        url = deployment["url"]
        tokens = f" (bearer tokens: {deployment['tokens_file']})" if deployment.get("tokens_file") else ""
        name = deployment.get("endpoint")
        lines += [f"  serving at:   {url}{tokens}" + (f", endpoint {name}" if name else ""),
                  f"  query it:     petseg predict --url {url} IMAGE.jpg --out mask.png"]
        lines += ([f"  watch it:     petseg status {name}   (back: petseg rollback {name}; stop: petseg stop {name})"]
                  if name else [f"  stop it:      petseg stop {run_id}"])
    return "\n".join(lines)


def _pyplot():
    """matplotlib's pyplot on the file-only backend (steps and servers have no screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_figure(history: dict):
    """Training and validation curves, one panel per metric."""
    plt = _pyplot()

    names = [k for k in history if not k.startswith("val_") and isinstance(history[k], list)]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.plot(history[name], label="training")
        if f"val_{name}" in history:
            ax.plot(history[f"val_{name}"], label="validation")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    return fig


def reliability_figure(report: dict):
    """Reliability diagram before and after calibration, with the ECE of each."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k:", label="perfect")
    for key, label in (("reliability_before", f"raw (ECE {report['ece_before']:.4f})"),
                       ("reliability_after", f"calibrated (ECE {report['ece_after']:.4f})")):
        curve = report[key]
        points = [(p, o) for p, o in zip(curve["mean_predicted"], curve["observed_frequency"]) if p is not None]
        ax.plot([p for p, _ in points], [o for _, o in points], marker="o", label=label)
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency")
    ax.legend()
    fig.tight_layout()
    return fig


def colour_mask(classes: np.ndarray) -> np.ndarray:
    """(H, W) class indices to an (H, W, 3) picture in CLASS_COLOURS."""
    return CLASS_COLOURS[classes]


def predictions_figure(samples: dict):
    """Input | true classes | predicted classes | pet probability, one row per test image."""
    plt = _pyplot()

    images, truths, probs = samples["images"], samples["truths"], samples["probs"]
    fig, axes = plt.subplots(len(images), 4, figsize=(8, 2 * len(images)), squeeze=False)
    for row, (image, truth, prob) in enumerate(zip(images, truths, probs)):
        panels = (image, colour_mask(np.argmax(truth, -1)), colour_mask(np.argmax(prob, -1)), prob[..., 0])
        for ax, panel, title in zip(axes[row], panels, ("input", "truth", "predicted", "pet probability")):
            ax.imshow(panel, vmin=0, vmax=1, cmap=None if panel.ndim == 3 else "gray")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title)
    fig.tight_layout()
    return fig


def fill_card(card, *, metrics: dict, history: dict, trials: list[dict], calibration_report: dict,
              samples: dict) -> None:
    """Append the report's components to a Metaflow card."""
    from metaflow.cards import Image, Markdown, Table

    card.append(Markdown("# Pet segmentation report"))
    card.append(Markdown(f"## Test split ({metrics['test_samples']} images): the model beside the baselines\n\n"
                         "Per-class IoU of the argmax class, their mean (mIoU) and pixel accuracy, with 95 % "
                         "bootstrap intervals over test images. Baselines are fitted on the training split and "
                         "learn nothing about shape: all-background, the mean training mask, and a lookup from "
                         "colour and position."))
    card.append(Table(metrics_rows(metrics), headers=metrics_headers(metrics)))
    card.append(Markdown("## Quality targets (test, served mask)"))
    card.append(Table(target_rows(metrics), headers=["figure", "target", "this run", ""]))
    card.append(Markdown("## Confusion (test, served mask; rows: true class, shares of it)"))
    card.append(Table(confusion_rows(metrics), headers=["", *(f"predicted {name}" for name in CLASSES)]))
    card.append(Markdown("## Champion"))
    card.append(Markdown(champion_text(metrics)))
    if metrics.get("champion", {}).get("comparable"):
        card.append(Table(champion_rows(metrics), headers=CHAMPION_HEADERS))
    card.append(Markdown("## What the served-mask choice and the release gate saw (validation mIoU)"))
    card.append(Table(validation_rows(metrics), headers=["predictor", "validation mIoU"]))
    card.append(Markdown(f"## Served mask and calibration\n\n{served_text(metrics)}\n\n"
                         f"Expected calibration error on held-out test pixels: "
                         f"{metrics['ece']['raw']:.4f} raw, {metrics['ece']['calibrated']:.4f} calibrated; the "
                         "calibrated probabilities are served on request whichever mask is served. "
                         "The diagram: the calibration split, before and after."))
    card.append(Image.from_matplotlib(reliability_figure(calibration_report)))
    card.append(Markdown("## Training curves"))
    card.append(Image.from_matplotlib(curves_figure(history)))
    card.append(Markdown("## Tuning trials"))
    card.append(Table(trial_rows(trials), headers=["trial", "learning rate", "batch", "val loss", "val mIoU"]))
    card.append(Markdown("## Sample predictions (served mask; red pet, blue background, yellow border)"))
    card.append(Image.from_matplotlib(predictions_figure(samples)))
