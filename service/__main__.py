"""``python -m service`` / ``thinkahead-serve``: the serving process with every setting from
``THINKAHEAD_*`` environment variables (``thinkahead serve`` maps flags onto the same settings).
Like all of ``service/``, it imports nothing from ``offline/``; the shipped images carry both
and run ``thinkahead serve``.

``--insecure`` allows serving without API keys on a non-loopback address."""

from __future__ import annotations

import argparse

from service.app import run
from service.config import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="thinkahead-serve", description=__doc__)
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="serve without API keys on a non-loopback bind (otherwise refused)",
    )
    args = parser.parse_args(argv)
    settings = Settings()  # type: ignore[call-arg]
    if args.insecure:
        settings = settings.model_copy(
            update={"auth": settings.auth.model_copy(update={"insecure": True})}
        )
    run(settings)


if __name__ == "__main__":
    main()
