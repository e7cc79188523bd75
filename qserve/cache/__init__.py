"""Paged KV cache: block accounting (BlockPool, KVCacheManager) and storage (kv_cache)."""
