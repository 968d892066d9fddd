"""The embedded local SLURM cluster: a development and demo tool, not part of a production submission.

`embedded` starts and stops munged, slurmctld, slurmd and sshd (with accounting also MariaDB and slurmdbd) on
this machine under `.cluster/`, reachable over SSH like a real login node; `embedded_files` renders its
configuration, `embedded_accounting` its accounting database, and `commands` is `snowpipe cluster
up|down|status`. `make demo` and the `cluster`-marked tests submit to it. See docs/architecture.md ("Layers").
"""
