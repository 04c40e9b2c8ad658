"""Scores: the VOC devkit's AP, mAP and recall (``voc``), CorLoc and the pointing game (``localization``),
MaxBoxAcc (``wsol``), image-classification AP (``classification``), bootstrap intervals (``bootstrap``), score
tables (``tables``) and the devkit's results text format (``devkit``).

May import ``gradloc.core`` and ``gradloc.boxes``; never imports torch.
"""
