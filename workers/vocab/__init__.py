"""Vocabularies as data: versioned tag-description embeddings in Redis (store), the per-replica cache of
loaded versions, the watcher that hot-swaps the active one, the `ramplus vocab` CLI, and the LLM that writes
tag descriptions (`llm`: the chat-completions client; `describe`: the cached generator).
"""
