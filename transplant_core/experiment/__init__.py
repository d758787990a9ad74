"""The experiment (`transplant experiment`): the paper's tables on one (target, donor,
task) setting, with the controls the paper lacks.

- config.py: the configuration, the workload (models, splits, retained tasks), the
  module sets each method selects
- sweep.py: the model states (each committed, evaluated once, reverted bitwise) and
  their evaluation
- run.py: selection and the run
- numbers.py: the arithmetic of the results document; stats.py: bootstrap intervals
- report.py: the Markdown report and plots
Imports run one way: config <- sweep, stats <- numbers <- report, run."""
from .config import ExperimentConfig, check_methods, resolve_ks
from .run import run

__all__ = ["ExperimentConfig", "check_methods", "resolve_ks", "run"]
