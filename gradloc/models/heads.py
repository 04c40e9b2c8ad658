"""Heads that turn ImageNet classifiers into VOC classifiers, and the one function that puts the ImageNet mapping in a
network's classifier slot (the voc heads are attached by gradloc.models.build)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradloc.models.imagenet_voc import imagenet_groups

N_IMAGENET_CLASSES = 1000


class ImageNetToVOC(nn.Module):
    """Log of summed softmax probabilities of groups of ImageNet classes.

    ``s_c = log sum_{i in G_c} softmax(z)_i = logsumexp_{i in G_c} z_i - logsumexp_{j} z_j``, computed with
    two ``logsumexp`` (stable for any logit scale); members outside a group are masked with ``-inf``, which
    contributes exactly 0 to the sum and to the gradient.

    Args:
        groups: for each output class, a non-empty list of ImageNet indices in ``[0, n_inputs)``.
        n_inputs: number of input logits (1000 for ImageNet-1k).
    """

    def __init__(self, groups: Sequence[Sequence[int]], n_inputs: int = N_IMAGENET_CLASSES) -> None:
        super().__init__()
        mask = torch.full((len(groups), n_inputs), float("-inf"))
        for row, group in enumerate(groups):
            if not group or min(group) < 0 or max(group) >= n_inputs:
                raise ValueError(f"group {row} ({list(group)}) must be a non-empty list of indices in "
                                 f"[0, {n_inputs})")
            mask[row, list(group)] = 0.0
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, logits: Tensor) -> Tensor:
        """float[B, n_inputs] logits -> float[B, n_groups] log-probabilities."""
        grouped = torch.logsumexp(logits.unsqueeze(1) + self.mask, dim=-1)
        return grouped - torch.logsumexp(logits, dim=-1, keepdim=True)


class VocImageNetHead(nn.Module):
    """A trained voc head and the ImageNet classifier over the same pooled features, as one log-probability.

    ``s_c = log sigmoid(v_c(f)) + log sum_{i in G_c} softmax(z(f))_i``: the log of the product of the voc
    head's probability and the ImageNet prior of class ``c`` (:class:`ImageNetToVOC`), so a class scores high
    only when both agree. For a class without a positive training image the voc head could only learn
    "absent"; there ``s_c`` is the ImageNet term alone (``use_voc`` False).

    Args:
        voc: the trained ``nn.Linear(n_features, n_classes)``.
        imagenet: the network's ImageNet ``nn.Linear(n_features, 1000)``.
        groups: ImageNet indices of each class (:func:`gradloc.models.imagenet_voc.imagenet_groups`).
        use_voc: bool per class: whether the voc head's term is used.
    """

    def __init__(self, voc: nn.Linear, imagenet: nn.Linear, groups: Sequence[Sequence[int]],
                 use_voc: Sequence[bool]) -> None:
        super().__init__()
        if not voc.out_features == len(groups) == len(use_voc):
            raise ValueError(f"{voc.out_features} voc outputs, {len(groups)} groups, {len(use_voc)} flags")
        self.voc = voc
        self.imagenet = imagenet
        self.to_voc = ImageNetToVOC(groups, imagenet.out_features)
        self.register_buffer("use_voc", torch.as_tensor(list(use_voc), dtype=torch.bool), persistent=False)

    def forward(self, features: Tensor) -> Tensor:
        """float[B, n_features] -> float[B, n_classes] log-probabilities."""
        prior = self.to_voc(self.imagenet(features))
        return prior + torch.where(self.use_voc, F.logsigmoid(self.voc(features)), 0.0)


class ImageNetClassifier(nn.Module):
    """A network's ImageNet classifier followed by :class:`ImageNetToVOC`, put in the classifier's place
    (``set_submodule``), so every other module of the network keeps its name whatever the head.

    Args:
        imagenet: the network's final ``nn.Linear(n_features, 1000)``.
        groups: ImageNet indices of each class (:func:`gradloc.models.imagenet_voc.imagenet_groups`).
    """

    def __init__(self, imagenet: nn.Module, groups: Sequence[Sequence[int]]) -> None:
        super().__init__()
        self.imagenet = imagenet
        self.to_voc = ImageNetToVOC(groups)

    def forward(self, features: Tensor) -> Tensor:
        """float32[B, n_features] -> float32[B, n_classes] log-probabilities."""
        return self.to_voc(self.imagenet(features))


def attach_imagenet_mapping(model: nn.Module, classifier: str, classes: Sequence[str]) -> nn.Module:
    """Replace the 1000-way ImageNet classifier ``classifier`` (a dotted module name) of ``model`` by
    :class:`ImageNetClassifier` (it, then the mapping to ``classes``); every other module
    keeps its name. Returns ``model``, whose ``gradloc_gap_linear`` is then None (log-sum-softmax is not
    linear in the pooled features)."""
    model.set_submodule(classifier, ImageNetClassifier(model.get_submodule(classifier), imagenet_groups(classes)))
    model.gradloc_gap_linear = None
    return model
