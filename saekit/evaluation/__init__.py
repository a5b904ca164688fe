"""Evaluate dictionaries: reconstruction and sparsity on held-out activations, the downstream
cost of splicing them into their model, and (on labelled data such as the testbed) how their
latents line up with known factors.

* :mod:`.metrics`: FVU / explained variance, MSE, cosine, L0, dead and dense latents, density
  histogram, shrinkage, accumulated in one pass;
* :mod:`.splice`: put a dictionary into a model at its hookpoint (with or without the error
  term), or zero-ablate the hookpoint; hooks removed on exit;
* :mod:`.downstream`: CLIP zero-shot and retrieval, next-token loss recovered and KL, diffusion
  sample distance and oracle accuracy, under each condition;
* :mod:`.factors`: per latent and factor value AUROC and best F1, coverage, untracked latents;
* :mod:`.suite`: one pass over a cache for all of the above; :mod:`.report` the JSON report;
  :mod:`.plots` the PNG figures; :mod:`.testbed_tasks` the downstream tasks of the testbed.
"""

from .downstream import (
    CONDITIONS,
    ContrastiveResult,
    DiffusionResult,
    NextTokenResult,
    SpliceSite,
    ZeroShotTask,
    adapter_generator,
    evaluate_contrastive,
    evaluate_diffusion,
    evaluate_next_token,
    pipeline_generator,
)
from .factors import (
    FactorLabels,
    FactorReport,
    FactorScores,
    auroc,
    best_f1,
    labels_from_scenes,
    read_labels,
    sample_activations,
    score_factors,
    write_labels,
)
from .metrics import (
    DensityHistogram,
    LatentStats,
    ReconstructionAccumulator,
    ReconstructionMetrics,
    density_histogram,
    evaluate_reconstruction,
)
from .report import DictionaryEval, EvalReport, read_report, write_report
from .splice import HookHandle, ablate, hook_activation, splice
from .suite import CacheEvaluation, evaluate_on_cache, write_figures

__all__ = [
    "CONDITIONS",
    "CacheEvaluation",
    "ContrastiveResult",
    "DensityHistogram",
    "DictionaryEval",
    "DiffusionResult",
    "EvalReport",
    "FactorLabels",
    "FactorReport",
    "FactorScores",
    "HookHandle",
    "LatentStats",
    "NextTokenResult",
    "ReconstructionAccumulator",
    "ReconstructionMetrics",
    "SpliceSite",
    "ZeroShotTask",
    "ablate",
    "adapter_generator",
    "auroc",
    "best_f1",
    "density_histogram",
    "evaluate_contrastive",
    "evaluate_diffusion",
    "evaluate_next_token",
    "evaluate_on_cache",
    "evaluate_reconstruction",
    "hook_activation",
    "labels_from_scenes",
    "pipeline_generator",
    "read_labels",
    "read_report",
    "sample_activations",
    "score_factors",
    "splice",
    "write_figures",
    "write_labels",
    "write_report",
]
