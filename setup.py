"""Build hook: generate the gRPC stubs from proto/ before packaging (metadata is in pyproject)."""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, str(Path(__file__).resolve().parent))


class BuildWithProtos(build_py):
    def run(self) -> None:
        from service.protos import generate

        generate()
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
