"""Print the README's agreement table: gradloc's CAM methods against pytorch-grad-cam and torchcam
(:mod:`gradloc.cams.agreement`: same model, layer, classes, inputs).

Usage::

    python scripts/agreement.py
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import logging  # noqa: E402

from gradloc.cams.agreement import agreement_rows, resnet_case, tiny_case  # noqa: E402


def main() -> None:
    logging.getLogger("torchcam").setLevel(logging.ERROR)
    rows = agreement_rows("tiny CNN", tiny_case()) + agreement_rows("resnet18 (random)", resnet_case())
    print("Largest difference of gradloc's raw maps from each library's, max |gradloc - lib| / max |lib| "
          "(same model, layer, classes, inputs; `python scripts/agreement.py`):\n")
    print("| method | library | tiny CNN | resnet18 (random), layer4 |")
    print("|---|---|---|---|")
    for method in dict.fromkeys(r["method"] for r in rows):
        for library in ("pytorch-grad-cam", "torchcam"):
            cells = [r for r in rows if r["method"] == method and r["library"] == library]
            if cells:
                print(f"| {method} | {library} | " + " | ".join(f"{r['difference']:.1e}" for r in cells) + " |")


if __name__ == "__main__":
    main()
