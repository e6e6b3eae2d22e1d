"""A Flower app whose server aggregates with a metagg rule (see ../pyproject.toml)."""
