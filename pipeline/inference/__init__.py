"""Whole-scene inference: large windows with a halo, the thesis' patch blend for comparison, outputs."""
