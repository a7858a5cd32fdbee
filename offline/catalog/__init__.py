"""``thinkahead catalog build``: items -> embeddings -> balanced residual k-means -> semantic IDs.

The artifact it writes is the one ``service.contracts.catalog.Catalog.load`` reads; the entry point
is ``offline.catalog.build.build_catalog``.
"""
