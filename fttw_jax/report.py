"""A workdir as pictures: training curves, per-layer sparsity, accuracy vs FLOPs (with
the static control at the same cost), mask heatmap, per-sample cost, which channels
depend on the input, and ``report.md`` tying them together (issues 5, 19).

``write_report(workdir)`` reads the TensorBoard event files (or, without them,
the eval JSONs) for the curves, restores the checkpoint once and runs it over
the test split for the mask statistics, and puts everything in ``W/report/``.
A baseline workdir gets the plots that make sense for a dense model and a note
in place of the mask plots.
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
from etils import epath
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fttw_jax import api, checkpoint, data, evaluate, evaluation, paper_results, static

DPI = 130
COLORS = {'train': '#4C72B0', 'eval': '#DD8452', 'exact': '#C44E52', 'paper': '#8172B3',
          'dense': '#55A868', 'published': '#7F7F7F', 'target': '#222222', 'static': '#937860'}


# ------------------------------------------------------------------ reading

def read_events(workdir) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{tag: (steps, values)} from every TensorBoard event file directly in ``workdir``.

  A resumed run appends new files; a step logged twice keeps its last value.
  """
  files = sorted(str(p) for p in epath.Path(workdir).glob('events.out.tfevents.*'))
  if not files:
    return {}
  import tensorflow as tf  # only here: the rest of the report needs no TF
  series: dict[str, dict[int, float]] = {}
  for record in tf.data.TFRecordDataset(files):
    event = tf.compat.v1.Event.FromString(record.numpy())
    for v in event.summary.value:
      kind = v.WhichOneof('value')
      if kind == 'simple_value':
        value = float(v.simple_value)
      elif kind == 'tensor' and not v.tensor.tensor_shape.dim:
        value = float(tf.make_ndarray(v.tensor))
      else:
        continue
      series.setdefault(v.tag, {})[int(event.step)] = value
  return {tag: (np.array(sorted(s)), np.array([s[k] for k in sorted(s)]))
          for tag, s in series.items()}


def read_eval_jsons(workdir) -> dict[int, dict]:
  """{step: eval dict} of ``W/eval/<step>.json``."""
  folder = epath.Path(workdir) / 'eval'
  if not folder.exists():
    return {}
  return {int(p.stem): json.loads(p.read_text())
          for p in folder.glob('*.json') if p.stem.isdigit()}


def eval_series(evals: dict[int, dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Eval curves from the JSONs, tagged like the event files ('eval/top1', ...)."""
  steps = sorted(evals)
  keys = {k for e in evals.values() for k, v in e.items() if isinstance(v, (int, float))}
  return {f'eval/{k}': (np.array([s for s in steps if k in evals[s]]),
                        np.array([float(evals[s][k]) for s in steps if k in evals[s]]))
          for k in keys}


def baseline_point(init_from: str) -> dict | None:
  """The last eval of ``init_from`` (the dense model this run started from)."""
  if not init_from:
    return None
  try:
    root, _ = checkpoint.resolve(init_from, 'latest')
  except FileNotFoundError:
    return None
  evals = read_eval_jsons(root.parent)
  return evals[max(evals)] if evals else None


def per_sample_stats(model: api.Model, max_examples: int | None = None) -> dict:
  """Labels, per-layer predicted/target active ratios and MACs of every test example."""
  cfg = model.config
  out = {'label': [], 'active': [], 'target': [], 'macs': []}
  layers = [l.name for l in model.profile.masked]
  for batch in data.create_eval_iterator(cfg.dataset, cfg.batch_size,
                                         data_dir=cfg.data_dir or None,
                                         max_examples=max_examples):
    keep = np.asarray(batch['mask']) > 0
    _, aux, macs = model.forward(batch['image'])
    gates = aux['gates']
    out['label'].append(np.asarray(batch['label'])[keep])
    out['macs'].append(np.asarray(macs['exact'])[keep])
    for key, field in (('active', 'mask'), ('target', 'target')):
      cols = [np.asarray(gates[n][field]).mean(axis=-1) for n in layers]
      out[key].append(np.stack(cols, axis=-1)[keep])
  stats = {k: np.concatenate(v) for k, v in out.items()}
  stats['layers'] = layers
  return stats


# ------------------------------------------------------------------ plots

def _save(fig: Figure, path: epath.Path) -> epath.Path:
  FigureCanvasAgg(fig)
  with path.open('wb') as f:
    fig.savefig(f, format='png', dpi=DPI)
  return path


def cooldown_step(config) -> int | None:
  """The step where the mask loss weight drops to 0 and the heads freeze (SPEC 4)."""
  epoch = int(config.cooldown * config.num_epochs)
  if config.stage != 'ftwt' or epoch >= config.num_epochs:
    return None
  return epoch * data.steps_per_epoch(config.dataset, config.batch_size)


def plot_curves(series: dict, gated: bool, cooldown: int | None,
                path: epath.Path) -> epath.Path:
  """Loss, top-1, and for FTWT the mask loss and FLOPs reduction, vs step."""
  panels = [('Loss (cross-entropy + mask)', 'loss', 1.0), ('Top-1 accuracy (%)', 'top1', 100.0)]
  if gated:
    panels += [('Mask loss (BCE, summed over channels)', 'mask_loss', 1.0),
               ('FLOPs reduction (%)', None, 100.0)]
  cols = 2
  rows = -(-len(panels) // cols)
  fig = Figure(figsize=(11, 3.6 * rows), layout='constrained')
  for i, (title, key, scale) in enumerate(panels):
    ax = fig.add_subplot(rows, cols, i + 1)
    if key is None:
      for acc in ('exact', 'paper'):
        tag = f'eval/flops_reduction_{acc}'
        if tag in series:
          s, v = series[tag]
          ax.plot(s, scale * v, marker='o', ms=3, color=COLORS[acc], label=f'eval, {acc} count')
    else:
      for split in ('train', 'eval'):
        tag = f'{split}/{key}'
        if tag in series:
          s, v = series[tag]
          ax.plot(s, scale * v, marker='o' if split == 'eval' else None, ms=3,
                  color=COLORS[split], label=split)
    ax.set_title(title)
    ax.set_xlabel('training step')
    ax.grid(alpha=0.3)
    values = np.concatenate([l.get_ydata() for l in ax.lines]) if ax.lines else np.ones(1)
    if np.all(values > 0) and values.max() > 20 * values.min():
      ax.set_yscale('log')  # e.g. a fresh run's first evals, or CE alone after cooldown
    last = max((np.max(l.get_xdata()) for l in ax.lines if len(l.get_xdata())), default=0)
    if cooldown is not None and 0 < cooldown <= last:
      ax.axvline(cooldown, color='gray', ls=':', lw=1.2, label='cooldown: mask loss off')
    if ax.lines:
      ax.legend()
    else:
      ax.text(0.5, 0.5, 'not logged', ha='center', va='center', transform=ax.transAxes)
  if not gated:
    fig.axes[0].set_title('Loss (cross-entropy)')
  fig.suptitle('Training curves')
  return _save(fig, path)


def _layer_axis(ax, layers: Sequence[str], ylabel: str) -> None:
  """Masked convs along x (execution order), a fraction in [0, 1] along y."""
  ax.set_xticks(np.arange(len(layers)), layers, rotation=60, ha='right',
                rotation_mode='anchor', fontsize=8 if len(layers) < 30 else 6)
  ax.set_ylim(0, 1.22)
  ax.set_yticks(np.linspace(0, 1, 6))
  ax.set_ylabel(ylabel)
  ax.set_xlabel('masked conv (execution order)')


def plot_active_ratio(layers: Sequence[str], predicted: np.ndarray, target: np.ndarray | None,
                      estimate: dict | None, path: epath.Path) -> epath.Path:
  """Per-layer mean active-channel ratio in execution order (bars = applied masks)."""
  x = np.arange(len(layers))
  fig = Figure(figsize=(max(6.0, 0.42 * len(layers) + 2), 4.2), layout='constrained')
  ax = fig.add_subplot()
  ax.bar(x, predicted, color=COLORS['exact'], alpha=0.8, label='applied (predicted) masks')
  if target is not None:
    ax.plot(x, target, ls='none', marker='_', ms=14, mew=2.5, color=COLORS['target'],
            label='target masks of this model')
  if estimate:
    est = [estimate.get(n, np.nan) for n in layers]
    ax.plot(x, est, ls='none', marker='o', ms=5, mfc='none', color=COLORS['dense'],
            label='targets of the dense model (estimate)')
  _layer_axis(ax, layers, 'mean fraction of channels on')
  ax.set_title('Active-channel ratio per layer (test split)')
  ax.grid(axis='y', alpha=0.3)
  ax.legend(loc='upper center', ncols=3, fontsize=8, frameon=False)
  return _save(fig, path)


def plot_accuracy_vs_flops(run: dict, dense: dict | None, published, estimate: dict | None,
                           title: str, path: epath.Path,
                           static: dict | None = None) -> epath.Path:
  """This run (exact and paper counts), its dense start, the static control at the
  same cost (``static.json``) and the paper's points.

  The x axis always spans 0-100 % so that plots of different runs compare."""
  fig = Figure(figsize=(7, 4.8), layout='constrained')
  ax = fig.add_subplot()
  top1 = 100 * run['top1']
  xs = [0.0]
  if 'mask_accuracy' in run:
    for acc, marker in (('exact', 'o'), ('paper', 's')):
      xs.append(100 * run[f'flops_reduction_{acc}'])
      ax.scatter(xs[-1], top1, s=70, marker=marker, color=COLORS[acc], zorder=3,
                 label=f'this run, {acc} count')
  else:
    ax.scatter(0, top1, s=70, marker='D', color=COLORS['dense'], zorder=3,
               label='this run (dense)')
  if static is not None:
    xs.append(100 * static['flops_reduction_exact'])
    ax.scatter(xs[-1], 100 * static['top1'], s=70, marker='X', color=COLORS['static'], zorder=3,
               label='static pruning, same cost (exact)')
  if dense is not None:
    ax.scatter(0, 100 * dense['top1'], s=70, marker='D', color=COLORS['dense'], zorder=3,
               label='dense baseline (init_from)')
  if published:
    ax.scatter([p.flops_reduction for p in published], [p.top1 for p in published], s=45,
               marker='^', color=COLORS['published'], zorder=2, label='paper (its count)')
    for p in published:
      ax.annotate(p.label, (p.flops_reduction, p.top1), textcoords='offset points',
                  xytext=(5, 4), fontsize=7, color=COLORS['published'])
  if estimate is not None:
    ax.axvline(100 * estimate['flops_reduction_exact'], color=COLORS['dense'], ls='--', lw=1,
               label=f"estimated before training (r={estimate['threshold']:g}, exact)")
  if 'target_reduction' in run:
    acc = run['budget_accounting']
    ax.axvline(100 * run['target_reduction'], color=COLORS[acc], ls=':', lw=1.5,
               label=f"budget: target {100 * run['target_reduction']:.1f} % ({acc} count)")
    ax.annotate(f"realized {100 * run[f'flops_reduction_{acc}']:.2f} %",
                (100 * run[f'flops_reduction_{acc}'], top1), textcoords='offset points',
                xytext=(-10, -16), ha='right', fontsize=8, color=COLORS[acc])
  ax.set_xlabel('FLOPs (MACs) reduction vs dense (%)')
  ax.set_ylabel('top-1 accuracy (%)')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc='best')
  ax.margins(y=0.15)
  low, high = ax.get_ylim()
  ax.set_ylim(low, min(high, 100.5))
  ax.set_xlim(min(-5.0, min(xs) - 5), 100)
  return _save(fig, path)


def plot_heatmap(rows: np.ndarray, row_labels: Sequence[str], row_title: str,
                 layers: Sequence[str], overall: np.ndarray, path: epath.Path) -> epath.Path:
  """Mean active ratio per group of test samples x layer (top), and its difference
  from the layer's mean over all samples (bottom: what is specific to a group)."""
  fig = Figure(figsize=(max(6.0, 0.42 * len(layers) + 2.5), 2 * (0.3 * len(row_labels) + 1.6)
                        + 1.2), layout='constrained')
  top, bottom = fig.subplots(2, 1, sharex=True)
  diff = rows - overall[None, :]
  span = max(float(np.max(np.abs(diff))), 0.01)
  panels = ((top, rows, 'viridis', 0.0, 1.0, 'fraction of channels on', 'active-channel ratio'),
            (bottom, diff, 'RdBu_r', -span, span, 'difference', 'difference from the layer mean'))
  for ax, values, cmap, lo, hi, bar, title in panels:
    im = ax.imshow(values, vmin=lo, vmax=hi, cmap=cmap, aspect='auto')
    ax.set_yticks(np.arange(len(row_labels)), row_labels, fontsize=8)
    ax.set_ylabel(row_title)
    ax.set_title(f'{title} by {row_title}', fontsize=10)
    if values.size <= 400:
      mid = 0.5 * (lo + hi)
      for (i, j), v in np.ndenumerate(values):
        if lo < 0 and abs(v) < 0.005:
          continue  # no difference: leave the cell blank
        dark = v < mid if cmap == 'viridis' else abs(v) > 0.6 * span
        ax.text(j, i, f'{v:+.2f}' if lo < 0 else f'{v:.2f}', ha='center', va='center',
                fontsize=6, color='white' if dark else 'black')
    fig.colorbar(im, ax=ax, label=bar)
  bottom.set_xticks(np.arange(len(layers)), layers, rotation=60, ha='right',
                    rotation_mode='anchor', fontsize=8 if len(layers) < 30 else 6)
  bottom.set_xlabel('masked conv (execution order)')
  fig.suptitle('Mask heatmap (test split)')
  return _save(fig, path)


def heatmap_rows(stats: dict, num_classes: int) -> tuple[np.ndarray, list[str], str]:
  """Per class when there are few classes, else per decile of per-sample MACs."""
  if num_classes <= 30:
    classes = [c for c in range(num_classes) if np.any(stats['label'] == c)]
    rows = np.stack([stats['active'][stats['label'] == c].mean(axis=0) for c in classes])
    return rows, [f'{c} (n={int(np.sum(stats["label"] == c))})' for c in classes], 'class'
  order = np.argsort(stats['macs'], kind='stable')
  groups = [g for g in np.array_split(order, 10) if len(g)]
  rows = np.stack([stats['active'][g].mean(axis=0) for g in groups])
  return rows, [f'{10 * i}-{10 * (i + 1)}%' for i in range(len(groups))], 'per-sample cost decile'


def plot_dynamism(dynamism: dict, layers: Sequence[str], path: epath.Path) -> epath.Path:
  """Per layer, the fractions of channels that are on for every test sample, off for
  every one, or input-dependent (stacked bars: applied masks; dots: their targets)."""
  masks, targets = dynamism['mask']['layers'], dynamism['target']['layers']
  layers = [n for n in layers if n in masks]
  x = np.arange(len(layers))
  get = lambda d, k: np.array([d[n][k] for n in layers])
  fig = Figure(figsize=(max(6.0, 0.42 * len(layers) + 2), 4.4), layout='constrained')
  ax = fig.add_subplot()
  bottom = np.zeros(len(layers))
  for key, color, label in (('static_on', COLORS['dense'], 'always on'),
                            ('static_off', '#BBBBBB', 'always off'),
                            ('dynamic', COLORS['exact'], 'input-dependent')):
    v = get(masks, key)
    ax.bar(x, v, bottom=bottom, color=color, label=f'masks: {label}')
    bottom = bottom + v
  ax.plot(x, get(targets, 'dynamic'), ls='none', marker='o', ms=5, color=COLORS['target'],
          label='targets: input-dependent')
  _layer_axis(ax, layers, 'fraction of the layer\'s channels')
  overall = dynamism['mask']['overall']['dynamic']
  ax.set_title(f'Which channels depend on the input (test split; masks {100 * overall:.1f} % '
               f"dynamic, targets {100 * dynamism['target']['overall']['dynamic']:.1f} %)")
  ax.legend(loc='upper center', ncols=4, fontsize=7, frameon=False)
  return _save(fig, path)


STATIC_SHARE = 0.05   # below this share of input-dependent channels a model is called static


def dynamism_sentence(run: dict) -> str:
  """One plain sentence on how input-dependent the masks are (issue 19)."""
  dyn = run['dynamism']
  o, t = dyn['mask']['overall'], dyn['target']['overall']
  layers = dyn['mask']['layers']
  frozen = sum(1 for d in layers.values() if d['dynamic'] == 0)
  share = f"{100 * o['dynamic']:.1f} %"
  tail = (f"{frozen} of {len(layers)} layers give every test sample the same mask; the "
          f"targets the heads were trained on are input-dependent in "
          f"{100 * t['dynamic']:.1f} % of the channels.")
  if o['dynamic'] < STATIC_SHARE:
    return (f'**This model is effectively static**: its masks depend on the input in only '
            f'{share} of the channels (mean pairwise Hamming distance '
            f"{100 * o['hamming']:.2f} % of the channels); {tail}")
  return (f"The masks depend on the input in {share} of the channels (mean pairwise Hamming "
          f"distance {100 * o['hamming']:.2f} % of the channels); {tail}")


def plot_cost_histogram(macs: np.ndarray, dense: float, path: epath.Path) -> epath.Path:
  """Distribution of per-sample exact reduction: how dynamic the pruning is."""
  red = 100 * (1 - macs / dense)
  fig = Figure(figsize=(7, 4), layout='constrained')
  ax = fig.add_subplot()
  ax.hist(red, bins=min(40, max(5, len(np.unique(red)))), color=COLORS['exact'], alpha=0.8)
  ax.axvline(red.mean(), color='black', ls='--', lw=1, label=f'mean {red.mean():.1f} %')
  ax.set_xlabel('per-sample FLOPs reduction, exact count (%)')
  ax.set_ylabel('test samples')
  ax.set_title('Per-sample cost (dynamic pruning)')
  ax.legend()
  ax.grid(alpha=0.3)
  return _save(fig, path)


# ------------------------------------------------------------------ report

def _pct(v) -> str:
  return f'{100 * v:.2f} %'


def static_sentence(result: dict) -> str:
  """The dynamic model against its static control (``static.run``), in words."""
  d, s = result['dynamic'], result['static']
  gap = 100 * (d['top1'] - s['top1'])
  verdict = ('beats' if gap > 0 else 'does not beat')
  return (f"Static control (`--mode=static`, `static.json`): keeping per layer the channels "
          f"the heads switch on most often, at {_pct(s['flops_reduction_exact'])} exact "
          f"reduction (dynamic: {_pct(d['flops_reduction_exact'])}, heads included), gives "
          f"top-1 {_pct(s['top1'])}; the dynamic model ({_pct(d['top1'])}) {verdict} it "
          f"({gap:+.2f} points).")


def summary_rows(run: dict, dense: dict | None, estimate: dict | None,
                 static_run: dict | None = None) -> list[tuple[str, str]]:
  rows = [('checkpoint', f"step {run.get('step')} ({run.get('num_examples')} test examples)"),
          ('top-1', _pct(run['top1'])), ('top-5', _pct(run['top5'])),
          ('FLOPs reduction, exact', _pct(run['flops_reduction_exact'])),
          ('FLOPs reduction, paper count', _pct(run['flops_reduction_paper'])),
          ('mean MACs per sample, exact', f"{run['macs_exact']:,.0f}"),
          ('dense MACs', f"{run['dense_macs']:,}"), ('params', f"{run['params']:,}"),
          ('head params / MACs', f"{run['head_params']:,} / {run['head_macs']:,}")]
  if 'mask_accuracy' in run:
    rows.insert(3, ('mask accuracy', _pct(run['mask_accuracy'])))
  if 'dynamism' in run:
    rows.insert(4, ('input-dependent channels, masks / targets',
                    f"{_pct(run['dynamic_share'])} / {_pct(run['target_dynamic_share'])}"))
  if static_run is not None:
    s = static_run['static']
    rows.append(('static pruning at the same cost: top-1, reduction exact',
                 f"{_pct(s['top1'])}, {_pct(s['flops_reduction_exact'])}"))
  if 'target_reduction' in run:
    acc = run['budget_accounting']
    rows.insert(3, (f'FLOPs budget ({acc} count): target vs realized',
                    f"{_pct(run['target_reduction'])} vs {_pct(run[f'flops_reduction_{acc}'])} "
                    f"(r = {run['threshold']:.4f}, head-logit offset "
                    f"{run['logit_offset']:+.4f})"))
  if estimate is not None:
    rows.append((f"FLOPs reduction estimated from targets (r={estimate['threshold']:g})",
                 f"{_pct(estimate['flops_reduction_exact'])} exact, "
                 f"{_pct(estimate['flops_reduction_paper'])} paper "
                 f"(backbone of `{estimate['source']}`)"))
  if dense is not None:
    rows.append(('dense baseline top-1', _pct(dense['top1'])))
  return rows


def _run_eval(restored: evaluate.Restored, evals: dict, max_examples) -> dict:
  """The eval of the reported step: its JSON when training wrote one (with the
  dynamism metrics, for a gated run), else computed."""
  stored = evals.get(restored.step)
  if stored is not None and (max_examples is None or stored['num_examples'] <= max_examples) \
      and ('dynamism' in stored or not restored.gated):
    return stored
  result = evaluate.evaluate_restored(restored, max_examples)
  evaluation.write_eval_json(restored.workdir, restored.step, result)
  return result


def write_report(workdir, config=None, which: str | int = 'latest',
                 max_examples: int | None = None) -> epath.Path:
  """Write ``W/report/*.png`` and ``W/report/report.md``; return the markdown path.

  ``config`` (optional) must describe the stored experiment; ``max_examples``
  caps the test examples run for the mask statistics (None: the whole split).
  A step without an eval JSON is evaluated first (and its JSON written).
  """
  restored = evaluate.restore(workdir, which, config)
  model = api.Model(restored)
  cfg = restored.config
  out = restored.workdir / 'report'
  out.mkdir(parents=True, exist_ok=True)
  evals = read_eval_jsons(restored.workdir)
  run = _run_eval(restored, evals, max_examples)
  evals[restored.step] = run
  series = read_events(restored.workdir)
  curves_from = 'TensorBoard event files' if series else 'eval JSONs'
  for tag, s in eval_series(evals).items():
    series.setdefault(tag, s)
  dense = baseline_point(cfg.get('init_from') or restored.stored_config.get('init_from'))
  est_path = restored.workdir / 'estimate.json'
  estimate = None
  if est_path.exists():
    saved = json.loads(est_path.read_text())  # a budget's search: the r training starts at
    point = saved['search']['achieved'] if 'search' in saved else saved['configured']
    estimate = dict(point, source=saved['source'])
  published = paper_results.matching(cfg.model, cfg.dataset, cfg.width)
  name = f'{cfg.model} x{cfg.width:g} on {cfg.dataset} ({cfg.stage})'

  cooldown = cooldown_step(restored.stored_config)
  static_run = None
  if restored.gated:
    static_run = static.read(restored.workdir, restored.step)
    if static_run is None or (max_examples is not None
                              and static_run['num_examples'] > max_examples):
      static_run = static.run(restored, max_examples)
      static.write(restored.workdir, static_run)
  images = [('Training curves', plot_curves(series, restored.gated, cooldown,
                                            out / 'curves.png'))]
  images.append(('Accuracy vs FLOPs reduction', plot_accuracy_vs_flops(
      run, dense, published, estimate, f'Accuracy vs FLOPs: {name}',
      out / 'accuracy_vs_flops.png', static_run and static_run['static'])))
  notes = [f'Curves from the {curves_from} in the workdir.']
  if not published:
    notes.append(f'The paper publishes no result for {cfg.model} (width {cfg.width:g}) on '
                 f'{cfg.dataset}; no published points are drawn.')
  if restored.gated:
    stats = per_sample_stats(model, max_examples)
    images.append(('Active channels per layer', plot_active_ratio(
        stats['layers'], stats['active'].mean(axis=0), stats['target'].mean(axis=0),
        estimate and estimate.get('active_ratio'), out / 'active_ratio.png')))
    rows, labels, title = heatmap_rows(stats, int(restored.meta.get('num_classes', 0)
                                                  or data.get_info(cfg.dataset).num_classes))
    images.append(('Mask heatmap', plot_heatmap(rows, labels, title, stats['layers'],
                                                stats['active'].mean(axis=0),
                                                out / 'mask_heatmap.png')))
    images.append(('Per-sample cost', plot_cost_histogram(
        stats['macs'], float(run['dense_macs']), out / 'flops_per_sample.png')))
    images.append(('Input-dependent channels', plot_dynamism(
        run['dynamism'], stats['layers'], out / 'dynamism.png')))
    notes.insert(0, dynamism_sentence(run))
    notes.insert(1, static_sentence(static_run))
  else:
    notes.append('Baseline (dense) run: no masks, so no active-ratio, heatmap or per-sample '
                 'cost plots.')
  md = _markdown(name, restored, summary_rows(run, dense, estimate, static_run), images, notes,
                 out)
  path = out / 'report.md'
  path.write_text(md)
  print(f'report written: {path}')
  return path


def _markdown(name, restored, rows, images, notes, out) -> str:
  lines = [f'# Report: {name}', '', f'Workdir `{restored.workdir}`, checkpoint '
           f'`{restored.path}`.', '', '| | |', '|---|---|']
  lines += [f'| {k} | {v} |' for k, v in rows]
  lines.append('')
  for title, img in images:
    rel = img.relative_to(out)
    lines += [f'## {title}', '', f'[![{title}]({rel})]({rel})', '']
  lines += ['## Notes', ''] + [f'- {n}' for n in notes] + ['']
  return '\n'.join(lines)
