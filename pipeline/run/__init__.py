"""Job files and ``imgfeat run``: every stage in order, only new work."""
