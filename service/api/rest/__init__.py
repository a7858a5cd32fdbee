"""The REST adapter (FastAPI), as FastAPI projects lay one out: ``protocol`` (request, response
and error bodies), ``middleware`` (the gate and the body cap), ``router`` (the routes) and
``factory`` (:func:`create_app`)."""

from service.api.rest.factory import create_app

__all__ = ["create_app"]
