"""Studies: named variants x seeds, each (variant, seed) a normal run directory.

    schema.py     the study file: variants, [grid], [comparisons], [stopping], [export]
    runner.py     run_study: checks, rounds of seeds until resolved, the report
    worker.py     tasks and what a worker process does with them (train, resume, batch, export)
    executors.py  local worker processes;  ray.py: a Ray cluster

The study file's names are re-exported here: `from cnnlab.study import load_study`.
"""

from cnnlab.study.schema import (MARGIN, Comparison, Stopping, Study, comparison_from, decide_all, expand_grid,
                                 export_from, format_level, load_study, next_round, override, seeds_text,
                                 stopping_from, study_from_dict)

__all__ = ["MARGIN", "Comparison", "Stopping", "Study", "comparison_from", "decide_all", "expand_grid", "export_from",
           "format_level", "load_study", "next_round", "override", "seeds_text", "stopping_from", "study_from_dict"]
