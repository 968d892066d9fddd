"""Running the pipeline on SLURM: the embedded local cluster (`embedded`) and the `snowpipe cluster` command."""
