"""Monitoring: following a submitted run from the laptop over SSH.

`runs` reads and writes the run records (`runs/<run_id>.json`, written at submission), `ssh` is the one
connection to the cluster's login node (`ClusterConnection`), `slurm_parsers` reads what sacct, squeue and
scontrol print, `jobstate` puts a run's job states together, and `tools` is `snowpipe runs|status|logs|fetch|
cancel`. See docs/architecture.md ("Layers", "Cluster runs").
"""
