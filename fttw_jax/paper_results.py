"""The paper's published results (SPEC 7) as data, for reports and experiment configs.

Accuracy is top-1 in %; the FLOPs reduction (in %) is the paper's own count
(``flops_accounting='paper'``). ``threshold`` is the mass r (None for the
dense baseline).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Result:
  dataset: str            # TFDS name, as in configs
  model: str              # registry name, as in configs
  threshold: float | None  # r; None = dense
  mode: str               # 'decoupled' | 'joint' | '' for dense
  top1: float
  flops_reduction: float

  @property
  def label(self) -> str:
    return 'dense' if self.threshold is None else f'r={self.threshold:g} {self.mode}'


def _rows(dataset, model, rows):
  return tuple(Result(dataset, model, *row) for row in rows)


RESULTS: tuple[Result, ...] = (
    _rows('cifar10', 'vgg16_bn', [
        (None, '', 93.82, 0.0), (0.92, 'joint', 93.55, 65.0),
        (0.92, 'decoupled', 93.73, 56.0), (0.85, 'decoupled', 93.19, 73.0),
        (0.88, 'joint', 92.65, 74.0)])
    + _rows('cifar10', 'resnet56', [
        (None, '', 93.66, 0.0), (0.80, 'decoupled', 92.63, 66.0),
        (0.88, 'joint', 92.28, 54.0)])
    + _rows('cifar10', 'mobilenet_v1', [
        (None, '', 90.89, 0.0), (1.00, 'decoupled', 91.06, 78.0),
        (1.00, 'joint', 91.21, 78.0)])
    + _rows('imagenet2012', 'resnet34', [
        (None, '', 73.30, 0.0), (0.97, 'decoupled', 73.25, 25.86),
        (0.95, 'decoupled', 72.79, 37.77), (0.93, 'decoupled', 72.17, 47.42),
        (0.92, 'decoupled', 71.71, 52.24)])
    + _rows('imagenet2012', 'resnet18', [
        (None, '', 69.76, 0.0), (0.91, 'decoupled', 67.49, 51.56)])
    + _rows('imagenet2012', 'mobilenet_v1_imagenet', [
        (None, '', 69.57, 0.0), (1.00, 'decoupled', 69.66, 41.07)])
)


def matching(model: str, dataset: str, width: float = 1.0) -> tuple[Result, ...]:
  """Published rows for this network (full width only: the paper trains no others)."""
  if width != 1.0:
    return ()
  return tuple(r for r in RESULTS if r.model == model and r.dataset == dataset)


def lookup(model: str, dataset: str, threshold: float | None, mode: str = 'decoupled'):
  """The one published row of an experiment, or None."""
  for r in matching(model, dataset):
    if r.threshold == threshold and (threshold is None or r.mode == mode):
      return r
  return None
