"""Data: the Pascal VOCdevkit reader (``voc``) and the synthetic VOC-layout demo dataset (``demo``).

May import ``gradloc.core``; never imports torch.
"""
