"""What Python, the batch-script template and the Ansible playbooks agree on, written once.

`formats` owns the small cross-language formats (exit codes, log names, exit markers, dependency flags,
schema versions); `plan` types the submission plan (`plan.json`) and `run_record` the run record
(`runs/<run_id>.json`). The planner hands the formats to the template and the playbooks inside the plan, so
they never restate them (docs/architecture.md, "Where each fact lives").
"""
