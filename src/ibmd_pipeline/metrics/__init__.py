"""Evaluation metrics: FID, LPIPS, classifier accuracy, PSNR/SSIM and sampling speed.

Pretrained backbones come from :mod:`ibmd_pipeline.metrics.weights` (official cache file when
present, else a checksum-verified offline copy from a registry package).
"""

from ibmd_pipeline.metrics.classifier import (
    ClassifierConfig,
    SmallClassifier,
    accuracy_or_reason,
    classifier_accuracy,
    load_classifier,
    predict,
    reference_accuracies,
    train_classifier,
)
from ibmd_pipeline.metrics.fid import (
    FIDScorer,
    activation_statistics,
    check_statistics,
    frechet_distance,
    inception_features,
    inception_input,
    statistics_from_features,
)
from ibmd_pipeline.metrics.image_quality import (
    psnr,
    psnr_per_image,
    ssim,
    ssim_per_image,
    to_rgb,
    to_unit_range,
)
from ibmd_pipeline.metrics.lpips import LPIPSScorer
from ibmd_pipeline.metrics.speed import SamplingSpeed, device_description, speedup, time_sampling
from ibmd_pipeline.metrics.weights import (
    WeightsSource,
    WeightsUnavailableError,
    build_fid_inception,
    build_lpips_alexnet,
    locate_fid_inception_weights,
    locate_lpips_alexnet_weights,
)

__all__ = [
    "ClassifierConfig",
    "FIDScorer",
    "LPIPSScorer",
    "SamplingSpeed",
    "SmallClassifier",
    "WeightsSource",
    "WeightsUnavailableError",
    "accuracy_or_reason",
    "activation_statistics",
    "build_fid_inception",
    "build_lpips_alexnet",
    "check_statistics",
    "classifier_accuracy",
    "device_description",
    "frechet_distance",
    "inception_features",
    "inception_input",
    "load_classifier",
    "locate_fid_inception_weights",
    "locate_lpips_alexnet_weights",
    "predict",
    "psnr",
    "psnr_per_image",
    "reference_accuracies",
    "speedup",
    "ssim",
    "ssim_per_image",
    "statistics_from_features",
    "time_sampling",
    "to_rgb",
    "to_unit_range",
    "train_classifier",
]
