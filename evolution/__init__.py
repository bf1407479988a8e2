"""The muNet family: an evolving multitask system, its store, search and agents.

Subpackages, each importing only those listed after it (pyproject.toml's import
contracts): `agents` (a method bound to a task: cycles, views of the store, multipath
routing, baselines, Ray), then `roots` (root models and seeding them into a store),
`export` (the system as a checkpoint, a t5x model, inference) and `report` (tables, the
system's picture), then `search` (one task's search: settings, hyperparameter space,
selection, mutations, scoring, candidates and where they train, the loop), then `store`
(the store interface, its SQLite and PostgreSQL backends, `open_store`), then `system`
(the system as values: components, paths, tasks, architectures, families). The
gin-bound entry points (`evolve`, `demo`, `agent_main`, `ray_main`, `baseline_run`) sit
here on top. Method: muNet / mu2Net / mu2Net+ and the multiagent framework (arXiv
2205.10937, 2205.12755, 2209.07326, 2209.14745).
"""
