"""The evaluate step's report card: metrics, training curves, tuning trials,
the reliability diagram and a grid of sample predictions."""

from __future__ import annotations

import numpy as np

from petseg.metrics import HEADLINE
from petseg.oxford import CLASSES

# Class colours of the mask panels: pet red, background dark blue, border yellow.
CLASS_COLOURS = np.array([[0.85, 0.15, 0.15], [0.10, 0.10, 0.35], [0.95, 0.85, 0.10]], dtype=np.float32)
LABELS = {"pet_iou": "pet IoU", "background_iou": "background IoU", "border_iou": "border IoU", "miou": "mIoU",
          "pixel_accuracy": "pixel accuracy"}


QUALITY_TARGETS = {"pet_iou": 0.90, "miou": 0.75, "pet_lead": 0.25}
"""What the embedded data set's model should reach on the test split: pet IoU, mIoU, and the lead of its
pet IoU over the best baseline's (bench/quality.py checks them over several seeds)."""


def target_rows(metrics: dict) -> list[list[str]]:
    """Each quality target, this run's figure, and whether it is met."""
    model = metrics["calibrated"]
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
    return ["metric (test)", "model", "model, calibrated", *metrics["baselines"]]


def confusion_rows(metrics: dict) -> list[list[str]]:
    """The calibrated model's test confusion matrix, as shares of each true class."""
    rows = []
    for name, counts in zip(CLASSES, metrics["calibrated"]["confusion"]):
        total = sum(counts) or 1
        rows.append([f"true {name}", *(f"{count / total:.3f}" for count in counts)])
    return rows


def validation_rows(metrics: dict) -> list[list[str]]:
    """What the release gate saw: validation mIoU of the model and of each baseline."""
    validation = metrics["validation"]
    return [["model, calibrated", f"{validation['calibrated']['miou']:.4f}"],
            *([name, f"{scored['miou']:.4f}"] for name, scored in validation["baselines"].items())]


def trial_rows(trials: list[dict]) -> list[list[str]]:
    """One row per tuning trial: its configuration and validation results."""
    return [[str(t["index"]), f"{t['config']['learning_rate']:.2e}", str(t["config"]["batch_size"]),
             f"{t['val_loss']:.4f}", f"{t['val_miou']:.4f}"] for t in trials]


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
    card.append(Markdown("## Quality targets (test, calibrated)"))
    card.append(Table(target_rows(metrics), headers=["figure", "target", "this run", ""]))
    card.append(Markdown("## Confusion (test, calibrated; rows: true class, shares of it)"))
    card.append(Table(confusion_rows(metrics), headers=["", *(f"predicted {name}" for name in CLASSES)]))
    card.append(Markdown("## What the release gate saw (validation mIoU)"))
    card.append(Table(validation_rows(metrics), headers=["predictor", "validation mIoU"]))
    card.append(Markdown(f"## Calibration\n\nExpected calibration error on held-out test pixels: "
                         f"{metrics['ece']['raw']:.4f} raw, {metrics['ece']['calibrated']:.4f} calibrated. "
                         "The diagram: the calibration split, before and after."))
    card.append(Image.from_matplotlib(reliability_figure(calibration_report)))
    card.append(Markdown("## Training curves"))
    card.append(Image.from_matplotlib(curves_figure(history)))
    card.append(Markdown("## Tuning trials"))
    card.append(Table(trial_rows(trials), headers=["trial", "learning rate", "batch", "val loss", "val mIoU"]))
    card.append(Markdown("## Sample predictions (calibrated; red pet, blue background, yellow border)"))
    card.append(Image.from_matplotlib(predictions_figure(samples)))
