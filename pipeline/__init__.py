"""snowpipe: Sentinel-2 snow / cloud / water segmentation, from a laptop to a SLURM cluster."""

__version__ = "0.1.0"
