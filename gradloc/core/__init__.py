"""The ground floor: what every stage shares and that knows nothing of the stages.

Owns atomic file writes and the restricted unpickler (``files``), the geometry of preprocessing and exact
back-projection (``geometry``), the detection and ground-truth file formats (``formats``), the valid ranges of
τ, IoU and score cut (``ranges``) and provenance (``provenance``: git commit, package versions, content hashes).
Imports nothing of gradloc and never imports torch.
"""
