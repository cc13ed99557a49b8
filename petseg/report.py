"""The evaluate step's report card: metrics, training curves, tuning trials,
the reliability diagram and a grid of sample predictions."""

from __future__ import annotations

import numpy as np

METRIC_ORDER = ("iou", "f1", "mean_iou", "accuracy", "precision", "loss")


def metrics_rows(metrics: dict) -> list[list[str]]:
    """The original's evaluation table: one row per metric, raw and calibrated side by side."""
    return [[name, f"{metrics['raw'][name]:.4f}", f"{metrics['calibrated'][name]:.4f}"] for name in METRIC_ORDER]


def trial_rows(trials: list[dict]) -> list[list[str]]:
    """One row per tuning trial: its configuration and validation results."""
    return [[str(t["index"]), f"{t['config']['learning_rate']:.2e}", str(t["config"]["batch_size"]),
             str(t["config"].get("augment", "")), f"{t['val_loss']:.4f}", f"{t['val_iou']:.4f}"] for t in trials]


def _pyplot():
    """matplotlib's pyplot on the file-only backend (steps and servers have no screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_figure(history: dict):
    """Training and validation curves, one panel per metric."""
    plt = _pyplot()

    names = [k for k in history if not k.startswith("val_")]
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


def predictions_figure(samples: dict):
    """Input | truth | predicted | thresholded, one row per test image (pet channel)."""
    plt = _pyplot()

    images, truths, probs = samples["images"], samples["truths"], samples["probs"]
    fig, axes = plt.subplots(len(images), 4, figsize=(8, 2 * len(images)), squeeze=False)
    for row, (image, truth, prob) in enumerate(zip(images, truths, probs)):
        panels = (image, truth[..., 0], prob[..., 0], (prob[..., 0] > 0.5).astype(np.float32))
        for ax, panel, title in zip(axes[row], panels, ("input", "truth", "predicted", "thresholded")):
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
    card.append(Markdown(f"## Test metrics ({metrics['test_samples']} images)"))
    card.append(Table(metrics_rows(metrics) + [["expected calibration error", f"{metrics['ece']['raw']:.4f}",
                                                 f"{metrics['ece']['calibrated']:.4f}"]],
                      headers=["metric", "raw", "calibrated"]))
    card.append(Markdown("## Training curves"))
    card.append(Image.from_matplotlib(curves_figure(history)))
    card.append(Markdown("## Tuning trials"))
    card.append(Table(trial_rows(trials), headers=["trial", "learning rate", "batch", "augment",
                                                   "val loss", "val IoU"]))
    card.append(Markdown("## Reliability (calibration split)"))
    card.append(Image.from_matplotlib(reliability_figure(calibration_report)))
    card.append(Markdown("## Sample predictions (pet channel, calibrated)"))
    card.append(Image.from_matplotlib(predictions_figure(samples)))
