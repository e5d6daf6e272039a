"""The ``sdip`` command line: one thin Click command per DVC stage (stages/cli.py lists them)."""
