"""Whole-scene inference: large windows with a halo, read ahead in threads, and the outputs."""
