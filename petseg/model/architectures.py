"""The model architectures by name, without TensorFlow: what ``--arch`` accepts and `petseg.model.unet` builds.

- ``small``: a U-Net sized for CPU training (the default);
- ``mobilenetv2``: a U-Net with a MobileNetV2 encoder, for real data on a GPU.
"""

ARCHITECTURES = ("small", "mobilenetv2")
