"""``python -m edgefl``: the same as the ``edgefl`` command."""
from edgefl.cli.main import main

# The guard matters: the training process (spawn) imports this module as "__mp_main__".
if __name__ == "__main__":
    raise SystemExit(main())
