"""Build hook: generate the gRPC stubs from proto/ before setuptools collects packages, so they
ship in wheels and editable installs alike (metadata is in pyproject.toml)."""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))


def _generate() -> None:
    from service.api.protos import generate

    generate(ROOT)


class BuildWithProtos(build_py):
    def run(self) -> None:
        _generate()  # regenerate in case proto/ changed since setup.py was loaded
        super().run()


# Before setup(): package discovery runs inside it and must already see service/api/_proto.
_generate()
setup(cmdclass={"build_py": BuildWithProtos})
