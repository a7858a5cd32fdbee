"""The offline half of Think-Ahead: every user's semantic-ID prefixes, published to Redis."""
