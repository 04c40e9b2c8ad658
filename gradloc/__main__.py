"""``python -m gradloc`` runs the command line."""

from gradloc.cli import main

main()
