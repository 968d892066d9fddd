"""Submission: what turns a config and job specs into a plan and rendered batch jobs.

`jobspec` reads jobs/*.yml, `plan` builds the submission plan (jobs, resources, dependencies, staging) that the
Ansible playbooks execute, `plan_command` is `snowpipe plan`, `local_run` runs a rendered plan on this machine
without SLURM, and `role_docs` documents the Ansible roles' variables for the README. Ansible does the
submitting itself; see docs/architecture.md ("Layers", "Cluster runs").
"""
