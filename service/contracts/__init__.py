"""What the offline side and the service agree on, imported by both: the token scheme, the
catalog and its prefix trie, manifests, the Redis keyspace and snapshot values, the decoding
constraint, beam search, whole-item scoring and the fused score, co-visitation neighbours, and a
model directory with its ``serving.json``."""
