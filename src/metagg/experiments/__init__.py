"""Paper reproductions: `metagg reproduce ji2019` (`metagg.experiments.ji2019`)."""
