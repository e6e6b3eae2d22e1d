"""Adapters that run metagg aggregators inside other frameworks.

- `metagg.integrations.flower`: any metagg aggregator as a Flower strategy
  (`AggregatorStrategy`); needs `pip install 'metagg[flower]'`.

Submodules are imported on demand so that `import metagg` never needs the
optional frameworks.
"""
