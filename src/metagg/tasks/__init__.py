"""Tasks: a model + loss + data as pure functions of flat parameters (`metagg.tasks.task`),
and the task distributions learned aggregators are meta-trained and judged on
(`metagg.tasks.families`, imported on its own: it builds run configs, and the config
layer itself imports this package).

    task = Task(model, num_classes=10)
    from metagg.tasks.families import FAMILIES, HELD_OUT, sample_tasks
"""

from metagg.tasks.task import Task, TrustedData, mlp_grad_fn

__all__ = ["Task", "TrustedData", "mlp_grad_fn"]
