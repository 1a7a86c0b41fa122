"""Pipeline DAGs and their compile entry point (wiring only: no compute here)."""
