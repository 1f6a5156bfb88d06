"""Data: the Penn Action reader, `m2 prepare`, captioners, `m2 tokenize-image`, token shards."""
