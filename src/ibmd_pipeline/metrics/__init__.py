"""Evaluation metrics, one module each (import them from their modules):

* :mod:`~ibmd_pipeline.metrics.fid`: Fréchet Inception Distance with pytorch-fid's network;
* :mod:`~ibmd_pipeline.metrics.lpips`: LPIPS (AlexNet, v0.1);
* :mod:`~ibmd_pipeline.metrics.classifier`: the CA classifier, its training and accuracy;
* :mod:`~ibmd_pipeline.metrics.image_quality`: PSNR and SSIM;
* :mod:`~ibmd_pipeline.metrics.speed`: wall-clock sampling speed;
* :mod:`~ibmd_pipeline.metrics.weights`: the verified FID and LPIPS backbone files.

Nothing is imported here, so that a light user (the weights set-up step) does not pay for
torchmetrics and torchvision.
"""
