"""A study matrix: *config x variant x seed* cells, read from a YAML study file.

A study file names the detectron2 configs, the variants (norm choices and config overrides) and
the seeds; every combination is one cell, trained by ``tools/train_net.py`` into
``<output>/<config stem>/<variant>/seed<k>``::

    configs: [configs/study/mask_rcnn_R_18_FPN_shapes_scratch.yaml]
    seeds: [1, 2, 3]
    variants:
      BN@2:   {norm: BN, overrides: {D2NORM.PRECISE_BN.ENABLED: false}}
      BN@2+PreciseBN: {evaluate: BN@2, recalibrate: true}   # same weights, population statistics
      GN:     {norm: GN}

``norm: X`` sets every norm key of the model (backbone, FPN, box/mask heads, RetinaNet head);
``overrides`` are detectron2 ``KEY: value`` pairs; ``evaluate: V`` makes an *evaluation variant*:
it re-evaluates variant V's final weights (``recalibrate: true`` recomputes the population
statistics first on the training data, Wu & Johnson 2021 Sec. 3; ``recalibrate_on: SOURCE``
recomputes them without labels on the images of SOURCE, a registered dataset or a folder, with
``tools/recalibrate.py``: a new domain, Sec. 5.1), so it costs an evaluation, not a training.

Optional keys of the study file:

- ``arm``: a name recorded with every cell (e.g. ``finetune``, ``scratch``).
- ``workers``: processes per cell (``--num-gpus``; gloo on CPU), default 1. With
  ``SOLVER.REFERENCE_WORLD_SIZE`` equal to it, each worker gets ``IMS_PER_BATCH / workers`` images.
- ``norm_keys``: the config keys ``norm: X`` sets (default :data:`NORM_KEYS`), e.g. only the FPN and
  heads when the backbone stays frozen.
- ``gap``: ``{per_worker: V1, synced: V2}``, two variants whose difference is the problem under study
  (BN on each worker's images vs BN synchronised over all of them); the report gives every variant's
  place between them. Optional ``gate: spread`` (default) or ``gate: paired`` is the rule that decides
  whether the gap exceeds the noise (:class:`d2norm.study.report.Gate`).
"""
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["GATE_RULES", "NORM_KEYS", "Cell", "Study", "StudyFileError", "Variant", "load_study", "read_study"]

NORM_KEYS = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM",
             "MODEL.ROI_MASK_HEAD.NORM", "MODEL.RETINANET.NORM")
_VARIANT_KEYS = {"norm", "overrides", "evaluate", "recalibrate", "recalibrate_on"}
_STUDY_KEYS = {"configs", "seeds", "variants"}
_OPTIONAL_STUDY_KEYS = {"arm", "workers", "norm_keys", "gap"}
_GAP_KEYS = {"per_worker", "synced", "gate"}
GATE_RULES = ("spread", "paired")


class StudyFileError(ValueError):
    """A malformed study file; the message names the file and the key."""


@dataclass(frozen=True)
class Variant:
    """One column of the matrix: config overrides, or an evaluation of another variant's weights."""

    name: str
    overrides: dict = field(default_factory=dict)
    evaluate: str = None
    recalibrate: bool = False
    recalibrate_on: str = None

    @property
    def trains(self):
        return self.evaluate is None


@dataclass(frozen=True)
class Cell:
    """One training (or evaluation) run: a config, a variant and a seed."""

    config: str
    variant: Variant
    seed: int
    arm: str = None
    workers: int = 1

    @property
    def config_stem(self):
        return Path(self.config).stem

    def directory(self, output):
        return Path(output) / self.config_stem / _safe(self.variant.name) / f"seed{self.seed}"

    def opts(self):
        """detectron2 ``KEY VALUE`` overrides of this cell (without OUTPUT_DIR)."""
        pairs = dict(self.variant.overrides)
        pairs["SEED"] = self.seed
        return [str(token) for key, value in pairs.items() for token in (key, _yaml_value(value))]


def _safe(name):
    return re.sub(r"[^A-Za-z0-9@+._-]", "_", name)


def _yaml_value(value):
    """A value as detectron2's ``merge_from_list`` parses it (a Python literal)."""
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(repr(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return value if isinstance(value, str) else repr(value)


def _fail(path, key, message):
    raise StudyFileError(f"{path}: '{key}' {message}")


@dataclass(frozen=True)
class Study:
    """The cells of a study file and the two variants that bound the gap under study (or None)."""

    cells: list
    gap: dict = None


def _variant(path, name, spec, norm_keys=NORM_KEYS):
    where = f"variants.{name}"
    if not isinstance(spec, dict):
        _fail(path, where, f"must be a mapping with keys among {sorted(_VARIANT_KEYS)}, got {spec!r}")
    unknown = set(spec) - _VARIANT_KEYS
    if unknown:
        _fail(path, where, f"has unknown keys {sorted(unknown)}; allowed: {sorted(_VARIANT_KEYS)}")
    overrides = {}
    if "norm" in spec:
        overrides.update({key: spec["norm"] for key in norm_keys})
    extra = spec.get("overrides", {}) or {}
    if not isinstance(extra, dict):
        _fail(path, f"{where}.overrides", f"must map detectron2 keys to values, got {extra!r}")
    overrides.update(extra)
    recalibrate = spec.get("recalibrate", False)
    if not isinstance(recalibrate, bool):
        _fail(path, f"{where}.recalibrate", f"must be true or false, got {recalibrate!r}")
    recalibrate_on = spec.get("recalibrate_on")
    if recalibrate_on is not None and not (isinstance(recalibrate_on, str) and recalibrate_on):
        _fail(path, f"{where}.recalibrate_on", f"must name a dataset or a folder of images, got {recalibrate_on!r}")
    if recalibrate_on is not None and (recalibrate or "evaluate" not in spec):
        _fail(path, f"{where}.recalibrate_on", "needs 'evaluate' and excludes 'recalibrate: true' "
                                               "(the statistics come from one source)")
    return Variant(name, overrides, spec.get("evaluate"), recalibrate, recalibrate_on)


def load_study(path, only_variants=None, only_seeds=None):
    """The cells of the study file at ``path`` (see :func:`read_study`)."""
    return read_study(path, only_variants, only_seeds).cells


def _optional(path, spec):
    arm, workers = spec.get("arm"), spec.get("workers", 1)
    norm_keys, gap = spec.get("norm_keys", NORM_KEYS), spec.get("gap")
    if arm is not None and not isinstance(arm, str):
        _fail(path, "arm", f"must be a name, got {arm!r}")
    if not (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1):
        _fail(path, "workers", f"must be an integer >= 1, got {workers!r}")
    if not (norm_keys and isinstance(norm_keys, (list, tuple)) and all(isinstance(k, str) for k in norm_keys)):
        _fail(path, "norm_keys", f"must be a non-empty list of config keys, got {norm_keys!r}")
    if gap is not None and (not isinstance(gap, dict) or not {"per_worker", "synced"} <= set(gap) <= _GAP_KEYS):
        _fail(path, "gap", f"must be a mapping with the keys ['per_worker', 'synced'] and optionally 'gate', "
                           f"got {gap!r}")
    if gap is not None and gap.get("gate", "spread") not in GATE_RULES:
        _fail(path, "gap.gate", f"= {gap['gate']!r} must be one of {list(GATE_RULES)}")
    return arm, workers, tuple(norm_keys), gap


def read_study(path, only_variants=None, only_seeds=None):
    """The :class:`Study` of the study file at ``path``: its cells seed by seed (so an interrupted study has whole
    seeds), each trained variant directly followed by the variants that evaluate its weights
    (so its ``model_final.pth`` is needed only briefly).

    Args:
        only_variants: names to keep (an evaluation variant keeps the one it evaluates too).
        only_seeds: seeds to keep.
    """
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise StudyFileError(f"{path}: cannot read the study file: {e}") from e
    if not isinstance(spec, dict) or set(spec) - _STUDY_KEYS - _OPTIONAL_STUDY_KEYS or not _STUDY_KEYS <= set(spec):
        raise StudyFileError(f"{path}: a study file is a mapping with the keys {sorted(_STUDY_KEYS)} "
                             f"and optionally {sorted(_OPTIONAL_STUDY_KEYS)}")
    arm, workers, norm_keys, gap = _optional(path, spec)
    configs, seeds = spec["configs"], spec["seeds"]
    if not configs or not all(isinstance(c, str) for c in configs):
        _fail(path, "configs", "must be a non-empty list of config file paths")
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        _fail(path, "seeds", f"must be a non-empty list of integers, got {seeds!r}")
    if not isinstance(spec["variants"], dict) or not spec["variants"]:
        _fail(path, "variants", "must be a non-empty mapping of variant names to settings")
    variants = {str(name): _variant(path, str(name), v, norm_keys) for name, v in spec["variants"].items()}
    for role, name in (gap or {}).items():
        if role != "gate" and name not in variants:
            _fail(path, f"gap.{role}", f"= {name!r} must name a variant: {sorted(variants)}")
    for v in variants.values():
        if not v.trains and (v.evaluate not in variants or not variants[v.evaluate].trains):
            trained = sorted(n for n, w in variants.items() if w.trains)
            _fail(path, f"variants.{v.name}.evaluate", f"= {v.evaluate!r} must name a trained variant: {trained}")
    if only_variants:
        missing = sorted(set(only_variants) - set(variants))
        if missing:
            raise StudyFileError(f"{path}: unknown variants {missing}; the file has {sorted(variants)}")
        keep = set(only_variants) | {variants[n].evaluate for n in only_variants if not variants[n].trains}
        variants = {n: v for n, v in variants.items() if n in keep}
    if only_seeds:
        seeds = [s for s in seeds if s in set(only_seeds)] or list(only_seeds)
    ordered = [w for v in variants.values() if v.trains
               for w in [v] + [e for e in variants.values() if e.evaluate == v.name]]
    cells = [Cell(config, variant, seed, arm, workers) for seed in seeds for config in configs for variant in ordered]
    return Study(cells, gap)
