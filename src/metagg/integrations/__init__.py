"""Adapters that run metagg aggregators inside other frameworks.

- `metagg.integrations.flower`: any metagg aggregator as a Flower strategy
  (`AggregatorStrategy`); needs `pip install 'metagg[flower]'`. A complete app:
  examples/flower.
- `metagg.integrations.checks`: the argument and client-count checks the adapters
  run (as `metagg run` checks a config); no framework needed.

Submodules are imported on demand so that `import metagg` never needs the
optional frameworks.
"""
