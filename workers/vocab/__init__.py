"""Vocabularies as data: versioned tag-description embeddings in Redis (store), the per-replica cache of
loaded versions, the watcher that hot-swaps the active one, and the `ramplus vocab` CLI.
"""
