"""Decoder engines behind one primitive: next-token log-probs over an allowed set."""

from service.engine.base import Engine, EngineError, ScoreRequest, TokenLogprobs

__all__ = ["Engine", "EngineError", "ScoreRequest", "TokenLogprobs"]
