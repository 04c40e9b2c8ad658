"""Loop-based reference: the VOC devkit's Python ``voc_eval`` (py-faster-rcnn ``voc_eval.py``), ported.

This is the executable specification of :func:`gradloc.scoring.voc.evaluate`: the tests and the metrics benchmark
compare the vectorized code with it using ``==``. It stays deliberately close to the original (same
per-detection loop, same numpy expressions, same ``voc_ap``), with four documented changes:

* input comes from gradloc's ``Detections``/``GroundTruth`` instead of annotation files and text lines;
* the score sort is stable (``np.argsort(-confidence, kind="stable")``): among equal scores the detection
  that comes first in the input ranks first (the original's default quicksort leaves that order undefined);
* a class without non-difficult GT returns ``(nan, nan)`` instead of dividing by zero;
* the returned recall is the final recall (0 without detections) instead of the whole curve.

Slow by design: one Python loop over detections. It is the oracle of the tests and of ``scripts/bench_scores.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gradloc.core.formats import Detections, GroundTruth


def voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool = False) -> float:
    """The devkit's ``voc_ap``, unchanged apart from names of builtins."""
    if use_07_metric:
        # 11 point metric
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.0
    else:
        # correct AP calculation: first append sentinel values at the end
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.concatenate(([0.0], prec, [0.0]))
        # compute the precision envelope
        for i in range(mpre.size - 1, 0, -1):
            mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
        # to calculate area under PR curve, look for points where X axis (recall) changes value
        i = np.where(mrec[1:] != mrec[:-1])[0]
        # and sum (\Delta recall) * prec
        ap = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
    return float(ap)


def voc_eval(
    recs: dict[str, list[dict]],
    lines: list[tuple[str, float, list[float]]],
    imagenames: list[str],
    classname: str,
    ovthresh: float,
    use_07_metric: bool,
) -> tuple[float, float]:
    """The devkit's ``voc_eval`` for one class, on parsed annotations and detection lines."""
    # extract gt objects for this class
    class_recs = {}
    npos = 0
    for imagename in imagenames:
        objects = [obj for obj in recs[imagename] if obj["name"] == classname]
        bbox = np.array([x["bbox"] for x in objects], dtype=np.float64).reshape(-1, 4)
        difficult = np.array([x["difficult"] for x in objects]).astype(bool)
        det = [False] * len(objects)
        npos = npos + sum(~difficult)
        class_recs[imagename] = {"bbox": bbox, "difficult": difficult, "det": det}

    image_ids = [x[0] for x in lines]
    confidence = np.array([x[1] for x in lines], dtype=np.float64)
    bb_all = np.array([x[2] for x in lines], dtype=np.float64).reshape(-1, 4)

    # sort by confidence (stable: ties keep input order)
    sorted_ind = np.argsort(-confidence, kind="stable")
    bb_all = bb_all[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]

    # go down dets and mark TPs and FPs
    nd = len(image_ids)
    tp = np.zeros(nd)
    fp = np.zeros(nd)
    for d in range(nd):
        r = class_recs[image_ids[d]]
        bb = bb_all[d, :].astype(float)
        ovmax = -np.inf
        bbgt = r["bbox"].astype(float)

        if bbgt.size > 0:
            # compute overlaps
            # intersection
            ixmin = np.maximum(bbgt[:, 0], bb[0])
            iymin = np.maximum(bbgt[:, 1], bb[1])
            ixmax = np.minimum(bbgt[:, 2], bb[2])
            iymax = np.minimum(bbgt[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
            ih = np.maximum(iymax - iymin + 1.0, 0.0)
            inters = iw * ih

            # union
            uni = (
                (bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                + (bbgt[:, 2] - bbgt[:, 0] + 1.0) * (bbgt[:, 3] - bbgt[:, 1] + 1.0)
                - inters
            )

            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)

        if ovmax > ovthresh:
            if not r["difficult"][jmax]:
                if not r["det"][jmax]:
                    tp[d] = 1.0
                    r["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0

    if npos == 0:
        return float("nan"), float("nan")
    # compute precision recall
    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    rec = tp / float(npos)
    # avoid divide by zero in case the first detection matches a difficult ground truth
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap = voc_ap(rec, prec, use_07_metric)
    return ap, float(rec[-1]) if nd else 0.0


def reference_evaluate(
    dets: Detections, gt: GroundTruth, iou: float, use_07: bool
) -> dict[str, tuple[float, float]]:
    """Score ``dets`` against ``gt`` class by class with the ported devkit loop.

    Returns:
        class name -> (ap, final recall); (nan, nan) for a class without non-difficult GT.
    """
    imagenames = list(gt.image_ids)
    recs: dict[str, list[dict]] = {name: [] for name in imagenames}
    for i in range(len(gt.labels)):
        recs[imagenames[gt.image_index[i]]].append(
            {
                "name": gt.classes[gt.labels[i]],
                "bbox": [float(v) for v in gt.boxes[i]],
                "difficult": int(gt.difficult[i]),
            }
        )
    result = {}
    for c, classname in enumerate(dets.classes):
        lines = [
            (dets.image_ids[dets.image_index[k]], float(dets.scores[k]), [float(v) for v in dets.boxes[k]])
            for k in range(len(dets.labels))
            if dets.labels[k] == c
        ]
        result[classname] = voc_eval(recs, lines, imagenames, classname, iou, use_07)
    return result
