"""The scan stage: an image folder walked, probed and written as a dataset manifest."""
