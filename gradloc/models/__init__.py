"""Classifiers: the model registry (``zoo``; its torch-free facts in ``registry``), EfficientNet-Lite (``lite``),
the demo CNN (``demo_cnn``), preprocessing (``preprocessing``), VOC heads (``heads``, the ImageNet -> VOC map in
``imagenet_voc``), checkpoints (``checkpoints``) and building a ready classifier (``build``: ``load_model``).

May import ``gradloc.core``, ``gradloc.datasets`` and ``gradloc.scoring``; ``registry`` and ``imagenet_voc``
never import torch, the other modules do.
"""
