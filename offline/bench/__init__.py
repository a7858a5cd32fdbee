"""``thinkahead bench``: think-ahead against full decode, side by side, same model, engine and
machine: quality on the Beauty test split and speed through the running service."""
