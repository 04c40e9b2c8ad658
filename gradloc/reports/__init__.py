"""What a researcher reads and looks at: sample pictures (``show``, drawn by ``draw``), score curves (``plots``),
run comparisons (``compare``), exports (``export``) and a run's summary (``info``).

May import ``gradloc.run`` and every lower subpackage; never imports torch at import time (``show --guided``
loads the classifier when asked).
"""
