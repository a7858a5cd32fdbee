"""thinkahead online side: contracts shared with the offline side, the recommend core and its
REST/gRPC adapters. Nothing here imports ``offline``."""

__version__ = "0.1.0"
