"""The project's benchmarks (`convergent-bench`): one module per figure or family; README's
figures table is generated from their JSON (`python -m benchmarks.readme`)."""
