"""``python -m stages`` is ``sdip``."""

from stages.cli import main

main()
