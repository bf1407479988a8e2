"""The evolving system as values: components, paths, tasks, architectures, families."""
