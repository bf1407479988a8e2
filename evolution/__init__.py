"""The muNet family: system state, store, scoring, parent selection and mutations.

Modules: `system` (components, paths, tasks, locks), `store` (the store interface and
its errors), `sqlite_store` (the embedded default store), `param_files` (atomic
parameter files), `scoring` (scale-controlled score, acceptance), `selection` (parent
selection, task order), `hparams` (the hyperparameter space and mu2Net+ self-tuning
mutation rates), `mutations` (planning and materialising a child path), `candidate`
(training one candidate: masked optimizer, best-validation parameters, compiled steps
reused across candidates), `timing` (where a candidate's wall time goes), `search`
(seeding the root, one task iteration of the muNet / mu2Net+ search, round-robin tasks,
prediction from the store). Method: muNet / mu2Net / mu2Net+ and the multiagent
framework (arXiv 2205.10937, 2205.12755, 2209.07326, 2209.14745).
"""
