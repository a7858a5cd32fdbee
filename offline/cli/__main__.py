"""``python -m offline.cli``: the same as the ``thinkahead`` script."""

from offline.cli import app

app()
