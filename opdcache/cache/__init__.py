"""The teacher cache: contract (schema.py), shard I/O (shards.py), synthetic shards (synthetic.py)."""
