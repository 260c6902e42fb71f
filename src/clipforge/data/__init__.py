"""Training data: raw sources (shards, tables, image folders), and the streams built on them."""
