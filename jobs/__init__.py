"""Thin job entry points and the `imgfeat` command line."""
