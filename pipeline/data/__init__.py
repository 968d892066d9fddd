"""Readers and writers for the extracted_data layout, annotated masks and snowpipe's own rasters."""
