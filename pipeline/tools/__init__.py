"""Tools beside the stages: ImageNet classify, the extract benchmark, the demo's photo set."""
