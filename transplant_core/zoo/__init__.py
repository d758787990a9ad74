"""The embedded model family ("zoo"): small real LlamaForCausalLM checkpoints, trained
reproducibly on CPU on synthetic character tasks, that give the transplant method
three settings with a known large gap (see SETTINGS and each model's README.md).

    from transplant_core import zoo
    zoo.build()                      # once, ~8 min on 2 cores; cached, idempotent
    path = zoo.model_dir("v2")       # a plain HF checkpoint directory
    pairs = zoo.task_examples("add", "test")
"""
from .builder import (
    MODEL_NAMES,
    RECIPE,
    RECIPE_VERSION,
    SETTINGS,
    FINE_TUNES,
    build,
    build_deep,
    build_variant,
    format_table,
    is_built,
    load_card,
    model_dir,
    summarize,
    zoo_root,
)
from .errors import ZooError
from .tasks import SPLITS, TASK_NAMES, answer, task_examples

__all__ = [
    "MODEL_NAMES", "TASK_NAMES", "SETTINGS", "SPLITS", "RECIPE", "RECIPE_VERSION", "ZooError",
    "zoo_root", "model_dir", "is_built", "task_examples", "build", "load_card", "summarize",
    "format_table", "answer", "FINE_TUNES", "build_variant", "build_deep",
]
