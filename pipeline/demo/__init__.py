"""Synthetic Sentinel-2 scenes in the extracted_data layout, with true class maps (`snowpipe demo-data`)."""

from pipeline.demo.scenes import DemoSummary, generate_demo

__all__ = ["DemoSummary", "generate_demo"]
