"""Principal-component maps: EigenCAM, and the projection behind ``eigen_smooth`` of the gradient methods.

Both follow pytorch-grad-cam's ``get_2d_projection`` (``utils/svd_on_activations.py``): a stack of ``C`` maps
of ``h x w`` cells is read as ``h * w`` points in ``C`` dimensions, centred per channel, and each cell's map
value is its score on the first principal component, ``p = (M - mean(M)) v_1`` with ``v_1`` the first right
singular vector of the centred ``[h * w, C]`` matrix. NaN values count as 0.

**Sign convention.** A principal component has no sign: the SVD returns ``v_1`` or ``-v_1`` depending on the
LAPACK routine and its inputs, and pytorch-grad-cam leaves it at that, so its map may come out inverted (the
background hot, the object cold). gradloc fixes it: ``p`` is oriented to correlate non-negatively with the
channel sum of the same maps, ``sum_ij p_ij * sum_k X^k_ij >= 0``, i.e. with the map that needs no smoothing
(the total activation for EigenCAM, the weighted channel sum -- Grad-CAM's map before ReLU -- for
``eigen_smooth``): the projection is hot where the un-smoothed map is. When that correlation is exactly 0,
the cell of largest ``|p|`` is made positive (pytorch-grad-cam's ``get_2d_projection_with_sign_correction``).
Agreement with pytorch-grad-cam is therefore up to the sign: gradloc's map equals ``ReLU(s * p_lib)`` with
``s`` the sign this convention picks for the library's own ``p_lib`` (tests/cams/test_agreement.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gradloc.cams.engine import check_class_range, forward_capture


def principal_component_map(stack: Tensor) -> Tensor:
    """First-principal-component scores of the cells of each stack of maps, with gradloc's sign convention.

    Args:
        stack: ``[N, C, h, w]``: N stacks of C maps (e.g. a layer's activations, or its channels times their
            weights).

    Returns:
        ``[N, h, w]`` in the input's dtype (computed in float32 or wider): ``(M - mean(M)) v_1`` per stack with
        ``M = stack[n].reshape(C, h * w).T``, oriented so that it correlates non-negatively with
        ``stack[n].sum(0)`` (module docstring). Not rectified: callers apply the ReLU.
    """
    n, channels, height, width = stack.shape
    points = torch.nan_to_num(stack, nan=0.0).reshape(n, channels, height * width).transpose(1, 2)
    points = points.float() if points.dtype in (torch.float16, torch.bfloat16) else points
    centred = points - points.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    scores = torch.einsum("npc,nc->np", centred, vh[:, 0])  # [N, h*w]
    agreement = (scores * points.sum(dim=2)).sum(dim=1)
    peak = scores.gather(1, scores.abs().argmax(dim=1, keepdim=True))[:, 0]
    sign = torch.where(agreement != 0, agreement.sign(), peak.sign())
    return (scores * sign[:, None]).reshape(n, height, width).to(stack.dtype)


def eigencam(model: nn.Module, images: Tensor, classes: list[int], layer: tuple[str, nn.Module],
             batch_size: int) -> tuple[Tensor, Tensor]:
    """EigenCAM (Muhammad & Yeasin, "Eigen-CAM: Class Activation Map using Principal Components", IJCNN 2020).

    ``L = ReLU((A - mean_ij A) v_1)``: the activations ``A`` of the target layer, read as ``h * w`` points in
    ``C`` dimensions, projected on their first principal component ``v_1`` (:func:`principal_component_map`,
    with its sign convention). One forward pass, no gradients, and **class-agnostic**: every requested class
    gets the same map (the class scores still rank the boxes).

    Agreement: pytorch-grad-cam's ``EigenCAM`` up to the sign it leaves unfixed (module docstring), to float32
    rounding of the SVD.
    """
    activation, scores = forward_capture(model, images, layer, track_grad=False)
    check_class_range(classes, scores.shape[1])
    heat = principal_component_map(activation).relu()
    return heat[:, None].expand(-1, len(classes), -1, -1).contiguous(), scores
