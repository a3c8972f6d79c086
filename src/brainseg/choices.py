"""The allowed values of the model and training settings, once (no torch import).

config.py validates against them, model.py checks its arguments with them, and the CLI help
lists them.
"""

from __future__ import annotations

LOSSES = ("bce", "dice", "bce+dice")
SCHEDULERS = ("none", "cosine", "plateau")
AMP_MODES = ("auto", "bf16", "fp16", "off")
ENCODERS = ("vgg16", "vgg16_bn")
UPSAMPLE_MODES = ("transpose", "bilinear")
NORMALIZATIONS = ("imagenet", "zscore")
MASK_MODES = ("nearest", "bilinear")
PRESETS = ("seed", "best")
DEFAULT_DECODER_CHANNELS = (512, 256, 128, 64, 32)
#: ``--runtime`` of predict / eval: which library runs the model (brainseg.inference.runtimes).
RUNTIMES = ("auto", "onnxruntime", "openvino", "torch")
#: ``--precision``: OpenVINO's inference precision for an fp32 .onnx file
#: (brainseg.inference.runtimes).
PRECISIONS = ("auto", "fp32", "bf16")

#: The loggers ``--logger`` offers, with the module each needs and its extra.
LOGGERS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
