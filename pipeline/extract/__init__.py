"""The extract stage: decode, the backbone, feature and error shards, featureset readers."""
