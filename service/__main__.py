"""``python -m service`` / ``thinkahead-serve``: the serving process alone (settings from
``THINKAHEAD_*`` environment variables), for images that carry no offline code."""

from __future__ import annotations

from service.config import Settings
from service.server import run


def main() -> None:
    run(Settings())  # type: ignore[call-arg]


if __name__ == "__main__":
    main()
