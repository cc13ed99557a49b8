"""The model: the U-Net, its seeds, threads and CPU kernels, training, trials, calibration, metrics,
baselines and the evaluate step's figures."""
