"""`metagg reproduce ji2019`: figures 4-7 of Ji et al. (2019) with the data this machine has
(`runner`: the runs; `report`: CSV, figures and report.md; `settings`: scales and tasks)."""

from metagg.experiments.ji2019.runner import Ji2019, check_seeds_disjoint, reproduce_ji2019
from metagg.experiments.ji2019.settings import CSV_COLUMNS, FIGURES, SCALES, Scale

__all__ = ["CSV_COLUMNS", "FIGURES", "SCALES", "Ji2019", "Scale", "check_seeds_disjoint",
           "reproduce_ji2019"]
